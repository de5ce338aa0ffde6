"""Timestep samplers for training (importance sampling over t)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Tuple, Union

import numpy as np
import torch as th
import torch.distributed as dist


SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """"uniform" (what AnoFPDM uses) or "loss-second-moment" (Improved DDPM importance sampling)."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler {name!r} (use 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """A distribution over timesteps; `sample` returns t and the weights that keep the loss unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, one per diffusion step."""

    def sample(self, batch_size: int, device: Union[str, th.device]) -> Tuple[th.Tensor, th.Tensor]:
        """(t int64 [batch_size], weights float32 [batch_size]) with weights = 1 / (T * p(t))."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights = th.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossSecondMomentResampler(ScheduleSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last `history_per_term` losses, uniform until warm.

    Call `update_with_local_losses(t, losses)` after each step; losses are gathered across ranks when
    torch.distributed is initialised.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_local_losses(self, local_ts: th.Tensor, local_losses: th.Tensor) -> None:
        ts: List[int] = local_ts.detach().cpu().tolist()
        losses: List[float] = local_losses.detach().float().cpu().tolist()
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (ts, losses))
            ts = [t for part in gathered for t in part[0]]
            losses = [x for part in gathered for x in part[1]]
        self.update_with_all_losses(ts, losses)

    def update_with_all_losses(self, ts: List[int], losses: List[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]  # drop the oldest
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
