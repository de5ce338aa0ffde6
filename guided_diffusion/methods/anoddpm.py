"""AnoDDPM (Wyatt et al., CVPR-W 2022): partial noising and unconditional denoising of each slice.

Upstream ``scripts/translation_HEALTHY.py``: x_S = q_sample(x0, S-1, ε) with Gaussian or simplex ε
(``--noise_type``), then the reconstruction from step S-1 down to 0 with the unconditional model (trained on healthy
slices only), x̂0 clipped to [-1, 1] at every step:

* ``--use_ddpm True`` (upstream's default): ancestral DDPM steps whose noise is of the same type (simplex noise per
  step when ``--noise_type simplex``), with the model's variance (fixed-large for upstream's AnoDDPM models);
* ``--use_ddpm False``: DDIM with η = 0 (deterministic given x_S).

The map, threshold and post-processing are the reconstruction baselines' (``methods/reconstruction.py``).
A classifier-free model may be given instead of an unconditional one: its null-embedding prediction is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from guided_diffusion.diffusion.noise import NOISE_TYPES, check_noise_type
from guided_diffusion.flags import option
from guided_diffusion.methods.base import (
    BatchContext,
    autocast_dtype,
    has_null_embedding,
    is_class_conditional,
    model_fn,
)
from guided_diffusion.methods.reconstruction import (
    ReconstructionMethod,
    ReconstructionSettings,
    check_sample_steps,
    loaded_model,
    run_counted,
)


@dataclass(frozen=True)
class AnoDDPMSettings(ReconstructionSettings):
    """AnoDDPM's flags (upstream ``translation_HEALTHY.py``'s names and defaults)."""

    use_ddpm: bool = option(True, "ancestral DDPM reconstruction (upstream); false: DDIM with eta 0")
    noise_type: str = option("gaussian", "noise of the partial noising: gaussian (AnoDDPM G) or simplex (AnoDDPM S)",
                             choices=NOISE_TYPES)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_noise_type(self.noise_type)


def reconstruct_anoddpm(model, diffusion, x0: torch.Tensor, ctx: BatchContext, *, sample_steps: int,
                        noise_type: str = "gaussian", use_ddpm: bool = True) -> torch.Tensor:
    """x̂ from x_S = q_sample(x0, S-1, ε): DDPM (per-step noise of ``noise_type``) or DDIM η=0 down to step 0.

    ``model`` is a ``model_fn(x, t)`` returning eps (and variance channels if learned).
    """
    t = torch.full((x0.shape[0],), sample_steps - 1, dtype=torch.long, device=x0.device)
    x_t = diffusion.q_sample(x0, t, noise=ctx.noise_like(x0, noise_type, t))
    if use_ddpm:
        steps = diffusion.p_sample_loop_progressive(model, x0.shape, noise=x_t, clip_denoised=True,
                                                    t_start=sample_steps - 1, noise_fn=ctx.noise_fn(noise_type))
    else:
        steps = diffusion.ddim_sample_loop_progressive(model, x0.shape, noise=x_t, clip_denoised=True,
                                                       t_start=sample_steps - 1, eta=0.0)
    return run_counted(steps, ctx)["sample"]


class AnoDDPM(ReconstructionMethod):
    name = "anoddpm"
    Settings = AnoDDPMSettings
    # upstream's AnoDDPM model: the unconditional v1 UNet (its configs pass --unet_ver v1 --num_classes 0)
    shared_defaults = {"unet_ver": "v1", "num_classes": 0}

    @classmethod
    def check(cls, s) -> None:
        super().check(s)
        m = s.source.model
        if m.class_cond and not m.clf_free:
            raise ValueError("anoddpm reconstructs unconditionally: --num_classes 0 (the unconditional AnoDDPM model) "
                             f"or a classifier-free model (its null prediction); got --num_classes {m.num_classes} "
                             f"--clf_free false (from {s.source.flags_source})")

    def __init__(self, model: torch.nn.Module, diffusion, *, sample_steps: int, noise_type: str = "gaussian",
                 use_ddpm: bool = True, checkpoint: Optional[str] = None, precision: str = "fp32", **common: Any):
        super().__init__(**common)
        check_noise_type(noise_type)
        check_sample_steps(sample_steps, diffusion)
        if is_class_conditional(model) and not has_null_embedding(model):
            raise ValueError(
                "anoddpm reconstructs unconditionally, but the model is class-conditional without a null embedding "
                f"(--num_classes {model.num_classes} --clf_free False{'; ' + checkpoint if checkpoint else ''}): "
                "use the unconditional AnoDDPM model (upstream: --unet_ver v1 --num_classes 0) or a classifier-free one")
        self.model, self.diffusion = model, diffusion
        self.sample_steps, self.noise_type, self.use_ddpm = sample_steps, noise_type, use_ddpm
        self.checkpoint, self.precision = checkpoint, precision
        self._fn = model_fn(model, null=True, dtype=autocast_dtype(precision)) if is_class_conditional(model) \
            else model_fn(model, dtype=autocast_dtype(precision))

    @classmethod
    def build(cls, s, device: torch.device) -> "AnoDDPM":
        model, diffusion, path = loaded_model(s, device, what="anoddpm (--model_dir)")
        o = s.options
        return cls(model, diffusion, sample_steps=o.sample_steps, noise_type=o.noise_type, use_ddpm=o.use_ddpm,
                   checkpoint=path, precision=s.precision, **cls.common_kwargs(s))

    def settings(self) -> Dict[str, Any]:
        return {**self.common_settings(), "sample_steps": self.sample_steps, "noise_type": self.noise_type,
                "use_ddpm": self.use_ddpm, "precision": self.precision,
                "null_prediction": is_class_conditional(self.model)}

    def checkpoints(self) -> List[str]:
        return [self.checkpoint] if self.checkpoint else []

    def steps_per_batch(self, split: str) -> int:
        return self.sample_steps

    def reconstruct(self, x0: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return reconstruct_anoddpm(self._fn, self.diffusion, x0.float(), ctx, sample_steps=self.sample_steps,
                                   noise_type=self.noise_type, use_ddpm=self.use_ddpm)
