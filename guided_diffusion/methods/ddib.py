"""DDIB / classifier-free DDIM reconstruction ("DDIM clf-free", Sanchez et al.) on the AnoFPDM checkpoint.

Upstream ``scripts/translation_DDIB.py`` (after Su et al.'s dual diffusion implicit bridges): encode x0 by DDIM
inversion with the null embedding, then decode with DDIM (η = 0) and classifier-free guidance toward healthy,
ε̃ = (1 + w) ε(x, t, y = 0) − w ε(x, t, ∅), ``--w`` (upstream BraTS 1.1, ATLAS 1.3), from ``--sample_steps`` S.

Here (default) the inversion is exact in its levels: from the clean image (ᾱ = 1) to step 0, then step by step to
S-1, each step using ε at the latent's own level (``diffusion.ddim_reverse_sample_loop``), without clipping x̂0
(the inversion follows the model's ODE; clipping would move the latent off it); the decoding starts at S-1, the
level of the latent, and clips x̂0 as every sampler here does. S encoding steps (1 forward each) and S decoding
steps (one batched forward of conditional and null rows each).

Upstream (``--legacy_ddib True``): the input is taken as the latent of step 0, S inversion steps with x̂0 clipped
lead to level S, and decoding starts at step S-1, one level below (spec upstream-baselines §3, §8). With upstream's
full 1000-step grid the level mismatch is one step in S (ᾱ differs by about 1 %); on a respaced grid it is one coarse
step, so the flag matters for reproducing old numbers mostly there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from guided_diffusion.flags import option
from guided_diffusion.methods.base import (
    BatchContext,
    autocast_dtype,
    autocast_model,
    has_null_embedding,
    model_fn,
    require_classifier_free,
)
from guided_diffusion.methods.reconstruction import (
    ReconstructionMethod,
    ReconstructionSettings,
    check_sample_steps,
    loaded_model,
    run_counted,
)

HEALTHY = 0


@dataclass(frozen=True)
class DDIBSettings(ReconstructionSettings):
    """DDIB's flags (upstream ``translation_DDIB.py``)."""

    w: float = option(1.1, "healthy guidance weight of the decoding (upstream: BraTS 1.1, ATLAS 1.3)")
    legacy_ddib: bool = option(False, "upstream's inversion: the input as the step-0 latent, decoding one level "
                               "below the latent (reproduces upstream's numbers)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.w < 0:
            raise ValueError(f"--w {self.w}: the healthy guidance weight must be >= 0 (upstream BraTS 1.1, ATLAS 1.3)")


def ddib_encode(null_model, diffusion, x0: torch.Tensor, sample_steps: int, ctx: Optional[BatchContext] = None,
                *, legacy: bool = False) -> torch.Tensor:
    """The DDIM latent of ``x0`` decoded from step ``sample_steps - 1`` (see the module docstring).

    ``null_model(x, t)`` returns the null-embedding eps.
    """
    if not legacy:
        return run_counted(diffusion.ddim_encode_latents(null_model, x0, sample_steps, clip_denoised=False), ctx)
    latent = x0
    for i in range(sample_steps):  # upstream: x0 as the level-0 latent, S steps to level S, x̂0 clipped
        with torch.no_grad():
            eps = diffusion.p_mean_variance(null_model, latent, i, clip_denoised=True)["eps"]
            latent = diffusion.ddim_reverse_step_from_eps(latent, i, eps)
        if ctx is not None:
            ctx.step()
    return latent


class DDIB(ReconstructionMethod):
    name = "ddib"
    Settings = DDIBSettings

    @classmethod
    def check(cls, s) -> None:
        super().check(s)
        require_classifier_free(s.source.model, "ddib", f" (from {s.source.flags_source})")

    def __init__(self, model: torch.nn.Module, diffusion, *, sample_steps: int, w: float, legacy_ddib: bool = False,
                 checkpoint: Optional[str] = None, precision: str = "fp32", healthy_label: int = HEALTHY,
                 **common: Any):
        super().__init__(**common)
        if not has_null_embedding(model):
            raise ValueError(
                "ddib needs the classifier-free guided model (AnoFPDM's checkpoint: class-conditional with a null "
                "embedding, --num_classes 2 --clf_free True)"
                f"{'; ' + checkpoint if checkpoint else ''} is "
                f"{'unconditional' if getattr(model, 'num_classes', None) is None else 'class-conditional without a null embedding (--clf_free False)'}")
        if w < 0:
            raise ValueError(f"--w must be >= 0 (the healthy guidance weight; upstream BraTS 1.1, ATLAS 1.3), got {w}")
        check_sample_steps(sample_steps, diffusion)
        self.model, self.diffusion = model, diffusion
        self.sample_steps, self.w, self.legacy, self.healthy_label = sample_steps, float(w), bool(legacy_ddib), healthy_label
        self.checkpoint, self.precision = checkpoint, precision
        dtype = autocast_dtype(precision)
        self._null = model_fn(model, null=True, dtype=dtype)
        self._model = autocast_model(model, dtype)  # called with cond and null rows by the guided sampler

    @classmethod
    def build(cls, s, device: torch.device) -> "DDIB":
        model, diffusion, path = loaded_model(s, device, what="ddib (--model_dir)")
        o = s.options
        return cls(model, diffusion, sample_steps=o.sample_steps, w=o.w, legacy_ddib=o.legacy_ddib, checkpoint=path,
                   precision=s.precision, **cls.common_kwargs(s))

    def settings(self) -> Dict[str, Any]:
        return {**self.common_settings(), "sample_steps": self.sample_steps, "w": self.w,
                "legacy_ddib": self.legacy, "healthy_label": self.healthy_label, "precision": self.precision}

    def checkpoints(self) -> List[str]:
        return [self.checkpoint] if self.checkpoint else []

    def steps_per_batch(self, split: str) -> int:
        return 2 * self.sample_steps

    def reconstruct(self, x0: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        x0 = x0.float()
        latent = ddib_encode(self._null, self.diffusion, x0, self.sample_steps, ctx, legacy=self.legacy)
        y = torch.full((x0.shape[0],), self.healthy_label, dtype=torch.long, device=x0.device)
        steps = self.diffusion.ddim_sample_loop_progressive(self._model, x0.shape, noise=latent, clip_denoised=True,
                                                            t_start=self.sample_steps - 1, eta=0.0,
                                                            model_kwargs={"y": y}, guidance_w=self.w)
        return run_counted(steps, ctx)["sample"]
