"""Classifier-guided DDIM reconstruction ("DDIM clf", Wolleb et al., MICCAI 2022).

Upstream ``scripts/translation_CLF.py``: x_S = q_sample(x0, S-1, ε) with Gaussian ε, then DDIM (η = 0) from step
S-1 down to 0 toward "healthy" (y = 0), the noise prediction corrected by the noisy-image classifier as in
guided-diffusion's ``condition_score`` (Song et al.'s score conditioning):

    ε̂ = ε − √(1 − ᾱ_t) · s · ∇ₓ log p(y = 0 | x_t, t),      s = ``--classifier_scale``

with x̂0 clipped to [-1, 1] *before* the correction and not after it (as upstream). Here the correction is a
wrapper around the model (:func:`classifier_guided`, k-diffusion style), so the diffusion's ordinary DDIM loop runs
it; the classifier sees the same timestep values as the model.

The guided diffusion model is upstream's class-conditional v1 (``--unet_ver v1 --num_classes 2 --clf_free
False``); it is called with the label y = 0, the class the classifier pulls toward, so both push toward healthy.
Upstream's v1 ignored the label (it is read only with ``uncond=True``, which nothing passed); checkpoints trained
that way carry an untrained ``label_emb`` and need ``--label_only_with_uncond True`` (saved with the model flags),
which reproduces upstream's call exactly. An unconditional model is accepted too (guidance of an unconditional
DM, as Dhariwal & Nichol), and a classifier-free one gets its healthy-conditional prediction.

The classifier comes from ``--clf_dir`` (``model{step:06d}.pt``, ``--clf_num``; upstream always loaded the
non-EMA file) with the ``classifier_*`` flags, ``--image_size`` and ``--in_channels`` (the data's) and
``--out_channels`` (classes). It is evaluated in float32 (its input gradient is the guidance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.architecture import ClassifierSettings
from guided_diffusion.flags import build, option
from guided_diffusion.loading import ClassifierSource, resolve_classifier
from guided_diffusion.methods.base import (
    ResolveContext,
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

HEALTHY = 0


@dataclass(frozen=True)
class ClfGuidedSettings(ReconstructionSettings):
    """Classifier-guided DDIM's flags (upstream ``translation_CLF.py``): the classifier's folder and step, the scale.

    ``classifier`` holds the classifier's architecture flags (``architecture.ClassifierSettings``, shown for this
    method only); ``source`` is filled once the classifier's folder has been read (``ClassifierGuided.resolve``).
    """

    clf_dir: str = option("", "folder of the noisy-image classifier's checkpoints (model*.pt, config.json)")
    clf_num: str = option("", "classifier checkpoint step (default: the newest readable one)")
    classifier_scale: float = option(100.0, "guidance scale s (upstream's configs: BraTS 1000, ATLAS 500)")
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    source: Optional[ClassifierSource] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.classifier_scale < 0:
            raise ValueError(f"--classifier_scale must be >= 0, got {self.classifier_scale}")


def model_timestep_alpha_bar(diffusion) -> Callable[[torch.Tensor], torch.Tensor]:
    """ᾱ at the timestep *values the model receives* (original steps of a respaced grid, rescaled if asked)."""
    abar = torch.as_tensor(np.asarray(diffusion.alphas_cumprod), dtype=torch.float64)
    tmap = getattr(diffusion, "timestep_map", None)
    steps = int(getattr(diffusion, "original_num_steps", len(abar)))
    table = torch.full((steps,), float("nan"), dtype=torch.float64)
    table[tmap if tmap is not None else torch.arange(len(abar))] = abar
    rescale = bool(getattr(diffusion, "rescale_timesteps", False))

    def at(t: torch.Tensor) -> torch.Tensor:
        idx = (t.double() * steps / 1000.0).round().long() if rescale else t.long()
        return table.to(t.device)[idx]

    return at


def log_prob_gradient(classifier: Callable, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """∇ₓ log softmax(classifier(x, t))[label] per row (float32)."""
    with torch.enable_grad():
        x_in = x.detach().float().requires_grad_(True)
        logp = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        picked = logp.gather(1, label.reshape(-1, 1).to(logp.device)).sum()
        return torch.autograd.grad(picked, x_in)[0]


def classifier_guided(model: Callable, classifier: Callable, diffusion, label: int, scale: float,
                      *, clip_xstart: bool = True) -> Callable:
    """Wrap ``model(x, t, **kw) -> eps[, var]`` into the classifier-guided eps of ``condition_score``.

    ε̂ = ε_c − √(1 − ᾱ_t) · scale · ∇ₓ log p(label | x, t), where ε_c is ε re-derived from the x̂0 clipped to
    [-1, 1] (``clip_xstart``, upstream's order); run the sampling loop with ``clip_denoised=False`` so the corrected
    x̂0 is not clipped again. Learned-variance channels pass through unchanged.
    """
    alpha_bar = model_timestep_alpha_bar(diffusion)

    def guided(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = model(x, t, **kwargs)
        c = x.shape[1]
        eps, rest = out[:, :c], out[:, c:]
        a = alpha_bar(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        if clip_xstart:
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        y = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
        eps = eps - (1 - a).sqrt() * scale * log_prob_gradient(classifier, x, t, y).to(eps.dtype)
        return torch.cat([eps, rest], dim=1) if rest.shape[1] else eps

    return guided


class ClassifierGuided(ReconstructionMethod):
    name = "clf_guided"
    Settings = ClfGuidedSettings
    option_groups = (ClassifierSettings,)
    # upstream's guided DM: v1, class-conditional without a null embedding, learned sigma; EMA weights by default
    shared_defaults = {"unet_ver": "v1", "clf_free": False, "learn_sigma": True, "ema": True}

    @classmethod
    def read_settings(cls, values: Any) -> ClfGuidedSettings:
        return build(ClfGuidedSettings, values, classifier=build(ClassifierSettings, values))

    @classmethod
    def resolve(cls, options: ClfGuidedSettings, context: ResolveContext) -> ClfGuidedSettings:
        source = resolve_classifier(options.clf_dir, options.clf_num, options.classifier, set(context.given),
                                    (context.in_channels, context.image_size))
        return dataclasses.replace(options, classifier=source.settings, source=source)

    @classmethod
    def check(cls, s) -> None:
        super().check(s)
        if s.options.classifier.out_channels < 2:
            raise ValueError(f"--out_channels (the classifier's classes) must be >= 2, got "
                             f"{s.options.classifier.out_channels}")

    def __init__(self, model: torch.nn.Module, diffusion, classifier: torch.nn.Module, *, sample_steps: int,
                 classifier_scale: float, checkpoints: Optional[List[str]] = None, precision: str = "fp32",
                 healthy_label: int = HEALTHY, **common: Any):
        super().__init__(**common)
        check_sample_steps(sample_steps, diffusion)
        n_out = getattr(classifier, "out_channels", None)
        if n_out is not None and not 0 <= healthy_label < n_out:
            raise ValueError(f"the classifier has {n_out} classes; the healthy label {healthy_label} is not one of them")
        if classifier_scale < 0:
            raise ValueError(f"--classifier_scale must be >= 0, got {classifier_scale}")
        self.model, self.diffusion, self.classifier = model, diffusion, classifier
        self.sample_steps, self.classifier_scale, self.healthy_label = sample_steps, float(classifier_scale), healthy_label
        self._checkpoints, self.precision = list(checkpoints or []), precision
        dtype = autocast_dtype(precision)
        base = model_fn(model, label=healthy_label, dtype=dtype) if is_class_conditional(model) \
            else model_fn(model, dtype=dtype)
        self._fn = classifier_guided(base, classifier, diffusion, healthy_label, self.classifier_scale)

    @classmethod
    def build(cls, s, device: torch.device) -> "ClassifierGuided":
        o = s.options
        model, diffusion, path = loaded_model(s, device, what="clf_guided diffusion model (--model_dir)")
        try:
            if o.source is None:
                raise ValueError("the classifier's folder was not read (ClassifierGuided.resolve)")
            classifier, clf_path = o.source.load(device)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            raise type(e)(f"clf_guided classifier (--clf_dir): {e}") from None
        return cls(model, diffusion, classifier, sample_steps=o.sample_steps, classifier_scale=o.classifier_scale,
                   checkpoints=[path, clf_path], precision=s.precision, **cls.common_kwargs(s))

    def settings(self) -> Dict[str, Any]:
        return {**self.common_settings(), "sample_steps": self.sample_steps,
                "classifier_scale": self.classifier_scale, "healthy_label": self.healthy_label,
                "model_label": self.healthy_label if is_class_conditional(self.model) else None,
                "label_only_with_uncond": bool(getattr(self.model, "label_only_with_uncond", False)),
                "clf_free_model": has_null_embedding(self.model), "precision": self.precision}

    def checkpoints(self) -> List[str]:
        return list(self._checkpoints)

    def steps_per_batch(self, split: str) -> int:
        return self.sample_steps

    def reconstruct(self, x0: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        x0 = x0.float()
        t = torch.full((x0.shape[0],), self.sample_steps - 1, dtype=torch.long, device=x0.device)
        x_t = self.diffusion.q_sample(x0, t, noise=ctx.randn_like(x0))
        steps = self.diffusion.ddim_sample_loop_progressive(self._fn, x0.shape, noise=x_t, clip_denoised=False,
                                                            t_start=self.sample_steps - 1, eta=0.0)
        return run_counted(steps, ctx)["sample"]
