"""Training objectives: what one step of ``TrainLoop`` minimises, given a model and a microbatch.

An objective turns ``(model, x, cond)`` into per-sample losses (``StepLosses``); the loop does everything else
(microbatches, DDP, autocast, grad scaling and clipping, EMA, logging, checkpoints, exact resume).

- ``DiffusionObjective``: the denoising loss of a diffusion (``diffusion.training_losses``) at timesteps from a
  schedule sampler, optionally with classifier-free label dropout and a custom noise (AnoDDPM simplex noise).
- ``ClassifierObjective``: the noisy-image classifier of classifier guidance (Dhariwal & Nichol; upstream
  ``scripts/train_classifier.py``): cross-entropy of ``classifier(q_sample(x0, t), t)`` against the slice label,
  t uniform.

A new objective subclasses ``TrainingObjective`` and implements ``__call__`` (and ``evaluate`` for validation).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from guided_diffusion.diffusion.noise import NoiseFn
from guided_diffusion.diffusion.resample import ScheduleSampler, UniformSampler


class StepLosses(NamedTuple):
    """Per-sample results of one microbatch (each tensor ``[b]``)."""

    loss: torch.Tensor  # what the step minimises: the loop takes its mean over the batch
    metrics: Dict[str, torch.Tensor]  # logged as means since the last log (and per quarter of t when t is set)
    t: Optional[torch.Tensor] = None  # timesteps of the rows, for the per-quarter logs (None: no quarters)


class TrainingObjective:
    """Base class. ``num_timesteps`` (or None) sizes the per-quarter logs; ``diffusion`` (or None) is what the
    loop's preview grids sample with."""

    num_timesteps: Optional[int] = None
    diffusion: Any = None
    noise_fn: Optional[NoiseFn] = None
    samples_images = False  # the model is a diffusion model the loop can draw preview grids from
    classifier_free = False  # class-conditional previews use classifier-free guidance

    def __call__(self, model: Callable, x: torch.Tensor, cond: Dict[str, torch.Tensor]) -> StepLosses:
        raise NotImplementedError

    def probe_kwargs(self, model: torch.nn.Module, cond: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
        """Keyword arguments of the model calls that, together, reach every parameter this objective trains
        (one row of ``cond``); the loop uses them to decide DDP's ``find_unused_parameters``."""
        return [{}]

    def evaluate(self, model: Callable, batch: Any, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Per-sample validation metrics of one validation batch; randomness only from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} has no validation")


class DiffusionObjective(TrainingObjective):
    """``diffusion.training_losses`` at t from ``schedule_sampler`` (uniform by default), weighted by its
    importance weights.

    :param threshold: classifier-free label-drop probability, passed to the model as ``threshold`` whenever the
        batch has labels (-1: never drop, e.g. the class-conditional model of classifier guidance).
    :param noise_fn: ``noise_fn(x, t)`` for the noise of x_t and the ε target (None: Gaussian).
    """

    def __init__(
        self,
        diffusion: Any,
        schedule_sampler: Optional[ScheduleSampler] = None,
        threshold: float = -1.0,
        noise_fn: Optional[NoiseFn] = None,
    ):
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_timesteps
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.threshold = threshold
        self.noise_fn = noise_fn

    samples_images = True

    @property
    def classifier_free(self) -> bool:  # type: ignore[override]
        return self.threshold > 0

    def __call__(self, model: Callable, x: torch.Tensor, cond: Dict[str, torch.Tensor]) -> StepLosses:
        kwargs: Dict[str, Any] = dict(cond)
        if "y" in kwargs:
            kwargs["threshold"] = self.threshold
        t, weights = self.schedule_sampler.sample(x.shape[0], x.device)
        losses = self.diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise_fn=self.noise_fn)
        if hasattr(self.schedule_sampler, "update_with_local_losses"):
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        return StepLosses(losses["loss"].float() * weights, {k: v.detach().float() * weights for k, v in losses.items()}, t)

    def probe_kwargs(self, model: torch.nn.Module, cond: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
        if "y" not in cond or getattr(model, "num_classes", None) is None:
            return [{}]
        y = cond["y"]
        if self.classifier_free:  # all labels kept, all dropped
            return [dict(y=y, threshold=1.0), dict(y=y, threshold=1e-12)]
        return [dict(y=y, threshold=self.threshold)]


class ClassifierObjective(TrainingObjective):
    """Cross-entropy of a noisy-image classifier ``model(x_t, t) -> logits`` against ``cond["y"]``.

    ``noised=True`` (upstream's default): x_t = diffusion.q_sample(x0, t) with Gaussian noise, t from
    ``schedule_sampler`` (uniform over the diffusion's steps), and the classifier sees the original-grid t;
    ``noised=False``: clean inputs at t = 0. Logs ``loss`` and ``acc`` (top-1 accuracy).
    """

    def __init__(self, diffusion: Any, schedule_sampler: Optional[ScheduleSampler] = None, noised: bool = True):
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_timesteps
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.noised = noised

    def _logits(self, model: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the diffusion maps respaced t to the original steps (and rescales them) exactly as when sampling
        return self.diffusion._wrap_model(model)(x, t).float()

    @staticmethod
    def _labels(cond: Dict[str, torch.Tensor], n_classes: int) -> torch.Tensor:
        if "y" not in cond:
            raise ValueError("classifier training needs slice labels (batches with cond['y'])")
        y = cond["y"].long()
        if y.numel() and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"label {int(y.max())} out of range for a classifier with {n_classes} outputs")
        return y

    def _terms(self, logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss = F.cross_entropy(logits, y, reduction="none")
        return {"loss": loss, "acc": (logits.argmax(dim=-1) == y).float()}

    def __call__(self, model: Callable, x: torch.Tensor, cond: Dict[str, torch.Tensor]) -> StepLosses:
        if self.noised:
            t, weights = self.schedule_sampler.sample(x.shape[0], x.device)
            x = self.diffusion.q_sample(x, t)
        else:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            weights = torch.ones(x.shape[0], device=x.device)
        logits = self._logits(model, x, t)
        terms = self._terms(logits, self._labels(cond, logits.shape[-1]))
        return StepLosses(terms["loss"] * weights, {k: v.detach() for k, v in terms.items()},
                          t if self.noised else None)

    def evaluate(self, model: Callable, batch: Any, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Validation batches are ``(x, mask, label)`` (val/test loaders) or ``(x, {"y": label})``."""
        x, label = (batch[0], batch[2]) if len(batch) == 3 else (batch[0], batch[1]["y"])
        device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else x.device
        x, label = x.to(device), torch.as_tensor(label).to(device)
        n = x.shape[0]
        if self.noised:
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator).to(device)
            noise = torch.randn(x.shape, generator=generator).to(device=device, dtype=x.dtype)
            x = self.diffusion.q_sample(x, t, noise)
        else:
            t = torch.zeros(n, dtype=torch.long, device=device)
        logits = self._logits(model, x, t)
        return self._terms(logits, self._labels({"y": label}, logits.shape[-1]))
