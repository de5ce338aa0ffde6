"""What a model is built from, as typed settings: the diffusion model's flags and the noisy-image classifier's.

These are upstream's flags (``model_and_diffusion_defaults`` / ``classifier_and_diffusion_defaults`` in
``factory``) with upstream's defaults, and exactly what a checkpoint folder's ``config.json`` records under
``"flags"``. Three are resolved rather than given: ``image_size`` and ``in_channels`` (None: the data's or
config.json's), ``use_hae`` (None: whether ``unet_ver`` is an HAE variant) and ``class_cond`` (None: upstream's rule,
``num_classes > 0``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from guided_diffusion.factory import (
    CLASSIFIER_POOLS,
    NOISE_SCHEDULES,
    UNET_VERSIONS,
    check_model_flags,
    classifier_and_diffusion_defaults,
    model_and_diffusion_defaults,
)
from guided_diffusion.flags import option

HAE_VERSIONS = tuple(v for v in UNET_VERSIONS if v.startswith("hae"))

# Flags that choose how a model computes or trains, not what its weights mean: a consumer may set them freely
# whatever config.json records (e.g. evaluation runs the forward process on a respaced grid).
RUNTIME_FLAGS = frozenset({"timestep_respacing", "use_checkpoint", "use_fp16", "classifier_use_fp16",
                           "memory_optimization", "zero_threshold", "dropout"})

_M = model_and_diffusion_defaults()
_C = classifier_and_diffusion_defaults()


def is_hae(unet_ver: str) -> bool:
    """Whether ``unet_ver`` has HAE blocks (upstream's configs pass ``--use_hae True`` for these)."""
    return unet_ver in HAE_VERSIONS


def _diffusion(key: str, help: str, **kw: Any) -> Any:
    return option(_M[key], help, **kw)


@dataclass(frozen=True)
class DiffusionSettings:
    """The diffusion process (upstream's flag names; ``factory.diffusion_defaults``)."""

    learn_sigma: bool = _diffusion("learn_sigma", "the model also predicts the variance (the classifier-guided DM)")
    diffusion_steps: int = _diffusion("diffusion_steps", "steps of the diffusion process T")
    noise_schedule: str = _diffusion("noise_schedule", "beta schedule", choices=NOISE_SCHEDULES)
    timestep_respacing: str = _diffusion("timestep_respacing", "run on a sub-grid of the steps: '' (all), 'ddimN' or "
                                         "section counts such as '250'")
    use_kl: bool = _diffusion("use_kl", "variational-bound loss (learned sigma)")
    predict_xstart: bool = _diffusion("predict_xstart", "the model predicts x0 instead of the noise")
    rescale_timesteps: bool = _diffusion("rescale_timesteps", "feed timesteps rescaled to 0..1000")
    rescale_learned_sigmas: bool = _diffusion("rescale_learned_sigmas", "rescaled MSE loss for learned sigma")

    def diffusion_flags(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in DIFFUSION_KEYS}


DIFFUSION_KEYS = tuple(f.name for f in dataclasses.fields(DiffusionSettings))


@dataclass(frozen=True)
class ModelSettings(DiffusionSettings):
    """A diffusion UNet and its diffusion process (upstream's flag names; config.json's "flags")."""

    unet_ver: str = option(_M["unet_ver"], "UNet variant: v2 (AnoFPDM), hae, hae_lite, hae_v2, hae_v2_conservative "
                           "(HAE V2's function and weights at a fifth of the memory), v1 (the baselines')",
                           choices=tuple(UNET_VERSIONS))
    image_size: Optional[int] = option(None, "slice size in pixels (default: the data's, or config.json's)")
    in_channels: Optional[int] = option(None, "input channels (default: the data's: BraTS 4, ATLAS 1)")
    num_channels: int = option(_M["num_channels"], "base channel count of the UNet")
    num_res_blocks: int = option(_M["num_res_blocks"], "residual blocks per resolution")
    channel_mult: str = option(_M["channel_mult"], "channel multiplier per resolution, e.g. 1,2,2 (default: "
                               "upstream's for the image size)")
    attention_resolutions: str = option(_M["attention_resolutions"], "feature-map sizes (pixels) with attention, "
                                        "e.g. 32,16,8")
    num_heads: int = option(_M["num_heads"], "attention heads (when --num_head_channels is -1)")
    num_head_channels: int = option(_M["num_head_channels"], "channels per attention head (-1: use --num_heads)")
    num_heads_upsample: int = option(_M["num_heads_upsample"], "heads in the decoder (-1: as --num_heads)")
    use_scale_shift_norm: bool = option(_M["use_scale_shift_norm"], "FiLM-style scale and shift from the embedding")
    resblock_updown: bool = option(_M["resblock_updown"], "residual blocks for up- and down-sampling")
    use_new_attention_order: bool = option(_M["use_new_attention_order"], "split q, k, v before the heads (v1)")
    dropout: float = option(_M["dropout"], "dropout probability in the residual blocks")
    num_classes: int = option(_M["num_classes"], "classes of the label (2: healthy/unhealthy; 0: unconditional)")
    class_cond: Optional[bool] = option(None, "class-conditional model (default: --num_classes > 0)")
    clf_free: bool = option(_M["clf_free"], "classifier-free conditioning with a null embedding (false: a plain "
                            "class-conditional v1, the classifier-guided DM)")
    use_hae: Optional[bool] = option(None, "HAE blocks (default: for the hae* variants)")
    bottleneck_ratio: float = option(_M["bottleneck_ratio"], "HAE V2 bottleneck MLP ratio")
    label_only_with_uncond: bool = option(_M["label_only_with_uncond"], "v1: read the label only with uncond=True, as "
                                          "upstream's v1 did (for checkpoints trained that way)")
    memory_optimization: bool = option(_M["memory_optimization"], "hae_v2_conservative: never form the D x D class "
                                       "tokens (false: the materialised reference)")
    zero_threshold: float = option(_M["zero_threshold"], "hae_v2_conservative: |c| below this is a null row")
    use_checkpoint: bool = option(_M["use_checkpoint"], "activation checkpointing (less memory, more compute)")
    use_fp16: bool = option(_M["use_fp16"], "upstream's fp16 switch: same as --precision fp16", hidden=True)

    def __post_init__(self) -> None:
        if self.use_hae is None:
            object.__setattr__(self, "use_hae", is_hae(self.unet_ver))
        if self.class_cond is None:
            object.__setattr__(self, "class_cond", self.num_classes > 0)
        check_model_flags({k: v for k, v in self.flags().items() if v is not None})
        if is_hae(self.unet_ver) and not self.use_hae:
            raise ValueError(f"--unet_ver {self.unet_ver} needs --use_hae true (its HAE blocks), got --use_hae false")

    @property
    def resolved(self) -> bool:
        """Whether the data's shape is known (``image_size`` and ``in_channels``)."""
        return self.image_size is not None and self.in_channels is not None

    def flags(self) -> Dict[str, Any]:
        """The factory's (and config.json's) flags."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelSettings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ClassifierSettings:
    """The noisy-image classifier of classifier-guided sampling (upstream's ``classifier_*`` flags)."""

    image_size: Optional[int] = option(None, "slice size in pixels (default: the data's, or config.json's)")
    in_channels: Optional[int] = option(None, "input channels (default: the data's)")
    out_channels: int = option(_C["out_channels"], "classes of the classifier (healthy / unhealthy)")
    classifier_width: int = option(_C["classifier_width"], "the classifier's base channel count")
    classifier_depth: int = option(_C["classifier_depth"], "residual blocks per resolution")
    classifier_attention_resolutions: str = option(_C["classifier_attention_resolutions"],
                                                   "feature-map sizes (pixels) with attention")
    classifier_use_scale_shift_norm: bool = option(_C["classifier_use_scale_shift_norm"], "FiLM-style norm")
    classifier_resblock_updown: bool = option(_C["classifier_resblock_updown"], "residual up/down-sampling")
    classifier_pool: str = option(_C["classifier_pool"], "output pooling", choices=CLASSIFIER_POOLS)
    classifier_use_fp16: bool = option(_C["classifier_use_fp16"], "upstream's fp16 switch (--precision fp16)",
                                       hidden=True)

    def __post_init__(self) -> None:
        check_model_flags({k: v for k, v in self.flags().items() if v is not None})

    @property
    def resolved(self) -> bool:
        return self.image_size is not None and self.in_channels is not None

    def flags(self) -> Dict[str, Any]:
        """The classifier's factory flags (``classifier_defaults`` keys; ``unet_ver`` is always v1)."""
        return {**dataclasses.asdict(self), "unet_ver": "v1"}

    def replace(self, **changes: Any) -> "ClassifierSettings":
        return dataclasses.replace(self, **changes)
