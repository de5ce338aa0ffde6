"""Timestep respacing: run a diffusion on a subset of the original steps (e.g. "ddim50" or "10,20,30")."""

from __future__ import annotations

from typing import Callable, Iterable, List, Set, Union

import numpy as np
import torch as th

from guided_diffusion.diffusion.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> Set[int]:
    """The original steps to keep.

    section_counts: "" (keep all), "ddimN" (N evenly strided steps starting at 0, as in the DDIM paper),
    or a comma list / sequence of counts, one per equal section of the original steps, each section
    taking that many steps evenly spaced (end points included), e.g. space_timesteps(300, [10, 15, 20]).
    """
    if isinstance(section_counts, str):
        if section_counts == "":
            return set(range(num_timesteps))
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    section_counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        if count < 1:
            raise ValueError(f"section counts must be >= 1, got {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(frac_stride * j) for j in range(count)]
        start += size
    return set(kept)


class _WrappedModel:
    """Calls the model with original-grid timesteps (optionally rescaled to [0, 1000))."""

    def __init__(self, model: Callable, timestep_map: th.Tensor, rescale_timesteps: bool, original_num_steps: int):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x: th.Tensor, ts: th.Tensor, **kwargs):
        new_ts = self.timestep_map.to(ts.device)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of a base process built from kwargs["betas"].

    alphas_cumprod at the kept steps equal the base ones; every model call (sampling, training, guided_eps,
    inversion) receives the ORIGINAL step index. timestep_map[i] is the original step of respaced step i.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = len(base.betas)
        if not self.use_timesteps or not all(0 <= s < self.original_num_steps for s in self.use_timesteps):
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {self.original_num_steps})")
        timestep_map: List[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        self.timestep_map = th.tensor(timestep_map, dtype=th.long)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)

    def _wrap_model(self, model: Callable) -> Callable:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)
