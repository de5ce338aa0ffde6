"""Models, diffusions and classifiers from upstream's flags (guided-diffusion's ``create_*`` and ``*_defaults``), and the
one check of those flags."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from guided_diffusion.models import unet
from guided_diffusion.models.classifier import EncoderUNetModel

UNET_VERSIONS = {
    "v2": unet.UNetModel,
    "hae": unet.HAEUNetModel,
    "hae_lite": unet.HAEUNetModelLite,
    "hae_v2": unet.HAEUNetModelV2,
    "hae_v2_conservative": unet.HAEUNetModelV2Conservative,
    "v1": unet.UNetModelV1,  # the original AnoFPDM's baselines (AnoDDPM, classifier-guided DM)
}

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def diffusion_defaults() -> Dict:
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def model_and_diffusion_defaults() -> Dict:
    """Upstream's defaults. Note ``use_hae`` defaults to False there too: HAE variants need --use_hae True."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        in_channels=3,
        num_classes=2,
        unet_ver="v2",
        clf_free=True,
        use_hae=False,
        bottleneck_ratio=0.25,
        memory_optimization=True,
        zero_threshold=1e-6,
        label_only_with_uncond=False,
        **diffusion_defaults(),
    )


def classifier_defaults() -> Dict:
    """Upstream's classifier flags. ``unet_ver`` v1 is the only classifier (upstream's configs pass
    it); ``out_channels`` (the number of classes) defaults to 2, healthy / unhealthy (upstream: 1000)."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
        in_channels=3,
        out_channels=2,
        unet_ver="v1",
    )


def classifier_and_diffusion_defaults() -> Dict:
    return {**classifier_defaults(), **diffusion_defaults()}


def parse_channel_mult(channel_mult: str, image_size: int) -> Tuple[float, ...]:
    if channel_mult == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {image_size}; known sizes: "
                f"{sorted(DEFAULT_CHANNEL_MULT)}. Pass --channel_mult, e.g. '1,2,2,2'"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    try:
        return tuple(int(m) for m in channel_mult.split(","))
    except ValueError:
        raise ValueError(f"channel_mult must be comma-separated integers, got {channel_mult!r}") from None


def parse_attention_resolutions(attention_resolutions: str, image_size: int) -> Tuple[int, ...]:
    """Feature-map sizes in pixels ("32,16,8") -> downsample factors (image_size // r)."""
    try:
        sizes = [int(r) for r in str(attention_resolutions).split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"attention_resolutions must be comma-separated integers, got {attention_resolutions!r}") from None
    return tuple(image_size // r for r in sizes)


def out_channels_for(in_channels: int, learn_sigma: bool) -> int:
    """Upstream's rule: 1- and 4-channel inputs keep their channels, others predict 3."""
    base = in_channels if in_channels in (1, 4) else 3
    return base * 2 if learn_sigma else base


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    in_channels: int = 3,
    num_classes: int = 2,
    unet_ver: str = "v2",
    clf_free: bool = True,
    use_hae: bool = False,
    bottleneck_ratio: float = 0.25,
    memory_optimization: bool = True,
    zero_threshold: float = 1e-6,
    label_only_with_uncond: bool = False,
):
    if unet_ver not in UNET_VERSIONS:
        raise ValueError(f"unknown unet_ver {unet_ver!r}; valid: {', '.join(UNET_VERSIONS)}")
    if class_cond and num_classes < 1:
        raise ValueError(f"class_cond needs num_classes >= 1, got {num_classes}")
    kwargs = {}
    if unet_ver == "v1":
        kwargs["label_only_with_uncond"] = label_only_with_uncond
    elif label_only_with_uncond:
        raise ValueError(f"label_only_with_uncond is upstream v1's label rule; unet_ver {unet_ver!r} always uses the label")
    if unet_ver not in ("v1", "v2"):
        kwargs["use_hae"] = use_hae
    if unet_ver in ("hae_v2", "hae_v2_conservative"):
        kwargs["bottleneck_ratio"] = bottleneck_ratio
    if unet_ver == "hae_v2_conservative":
        kwargs.update(memory_optimization=memory_optimization, zero_threshold=zero_threshold)
    mult = parse_channel_mult(channel_mult, image_size)
    if image_size % 2 ** (len(mult) - 1):
        raise ValueError(f"image_size {image_size} is not divisible by 2^{len(mult) - 1} (channel_mult {mult})")
    return UNET_VERSIONS[unet_ver](
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=out_channels_for(in_channels, learn_sigma),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=mult,
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        clf_free=clf_free,
        **kwargs,
    )


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
):
    from guided_diffusion.diffusion import gaussian_diffusion as gd
    from guided_diffusion.diffusion.respace import SpacedDiffusion, space_timesteps

    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def _checked_flags(kwargs: Dict, defaults: Dict, what: str) -> Dict:
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown {what} flags: {sorted(unknown)}")
    flags = {**defaults, **kwargs}
    check_model_flags(flags)
    return flags


NOISE_SCHEDULES = ("linear", "cosine")
CLASSIFIER_POOLS = ("attention", "adaptive")


def check_model_flags(flags: Dict[str, Any]) -> None:
    """Out-of-range or malformed model / diffusion / classifier flags: a ValueError naming the flag and the value.

    The one check of these flags; every factory here calls it, and the command lines call it before any work.
    Only the keys present are checked (a diffusion model's or a classifier's flags).
    """
    def at_least(key: str, low: int) -> None:
        if key in flags and not (isinstance(flags[key], (int, float)) and flags[key] >= low):
            raise ValueError(f"--{key} must be >= {low}, got {flags[key]!r}")

    for key in ("image_size", "num_channels", "in_channels", "diffusion_steps", "classifier_width", "out_channels"):
        at_least(key, 1)
    for key in ("num_res_blocks", "num_classes", "classifier_depth"):
        at_least(key, 0)
    if flags.get("num_head_channels", -1) == -1:
        at_least("num_heads", 1)
    elif flags["num_head_channels"] < 1:
        raise ValueError(f"--num_head_channels must be -1 (use --num_heads) or >= 1, got {flags['num_head_channels']}")
    if flags.get("num_heads_upsample", -1) not in (-1,) and flags["num_heads_upsample"] < 1:
        raise ValueError(f"--num_heads_upsample must be -1 (as --num_heads) or >= 1, got {flags['num_heads_upsample']}")
    if "dropout" in flags and not 0 <= flags["dropout"] < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {flags['dropout']}")
    if "bottleneck_ratio" in flags and not 0 < flags["bottleneck_ratio"] <= 1:
        raise ValueError(f"--bottleneck_ratio must be in (0, 1], got {flags['bottleneck_ratio']}")
    if "noise_schedule" in flags and flags["noise_schedule"] not in NOISE_SCHEDULES:
        raise ValueError(f"--noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got {flags['noise_schedule']!r}")
    if "classifier_pool" in flags and flags["classifier_pool"] not in CLASSIFIER_POOLS:
        raise ValueError(f"--classifier_pool must be one of {', '.join(CLASSIFIER_POOLS)}, got "
                         f"{flags['classifier_pool']!r}")
    if "unet_ver" in flags and flags["unet_ver"] not in UNET_VERSIONS:
        raise ValueError(f"unknown --unet_ver {flags['unet_ver']!r}; valid: {', '.join(UNET_VERSIONS)}")
    for key in ("attention_resolutions", "classifier_attention_resolutions"):
        if key in flags:
            try:
                sizes = [int(r) for r in str(flags[key]).split(",") if r.strip()]
            except ValueError:
                raise ValueError(f"--{key} must be comma-separated feature-map sizes in pixels (e.g. 32,16,8), "
                                 f"got {flags[key]!r}") from None
            if any(r < 1 for r in sizes):
                raise ValueError(f"--{key} sizes must be >= 1, got {flags[key]!r}")
    if flags.get("channel_mult"):
        try:
            mult = [int(m) for m in str(flags["channel_mult"]).split(",")]
        except ValueError:
            raise ValueError(f"--channel_mult must be comma-separated integers (e.g. 1,2,2,2), got "
                             f"{flags['channel_mult']!r}") from None
        if any(m <= 0 for m in mult):
            raise ValueError(f"--channel_mult entries must be >= 1, got {flags['channel_mult']!r}")
    if flags.get("timestep_respacing") and "diffusion_steps" in flags:
        from guided_diffusion.diffusion.respace import space_timesteps

        try:
            space_timesteps(int(flags["diffusion_steps"]), str(flags["timestep_respacing"]))
        except ValueError as exc:
            raise ValueError(f"--timestep_respacing {flags['timestep_respacing']!r} with --diffusion_steps "
                             f"{flags['diffusion_steps']}: {exc if 'literal' not in str(exc) else 'malformed'} (use "
                             "'' for every step, 'ddimN', or comma-separated section counts such as '250' or "
                             "'10,15,20')") from None


def _diffusion_from_flags(args: Dict):
    return create_gaussian_diffusion(
        steps=args["diffusion_steps"],
        learn_sigma=args["learn_sigma"],
        noise_schedule=args["noise_schedule"],
        use_kl=args["use_kl"],
        predict_xstart=args["predict_xstart"],
        rescale_timesteps=args["rescale_timesteps"],
        rescale_learned_sigmas=args["rescale_learned_sigmas"],
        timestep_respacing=args["timestep_respacing"],
    )


def create_model_and_diffusion(**kwargs):
    """``create_model_and_diffusion(**model_and_diffusion_defaults())`` -> (model, diffusion)."""
    args = _checked_flags(kwargs, model_and_diffusion_defaults(), "model/diffusion")
    diffusion_keys = diffusion_defaults()
    model = create_model(**{k: v for k, v in args.items() if k not in diffusion_keys or k == "learn_sigma"})
    return model, _diffusion_from_flags(args)


def create_classifier(
    image_size: int,
    classifier_use_fp16: bool = False,
    classifier_width: int = 128,
    classifier_depth: int = 2,
    classifier_attention_resolutions: str = "32,16,8",
    classifier_use_scale_shift_norm: bool = True,
    classifier_resblock_updown: bool = True,
    classifier_pool: str = "attention",
    in_channels: int = 3,
    out_channels: int = 2,
    unet_ver: str = "v1",
) -> EncoderUNetModel:
    """Upstream ``create_classifier``: channel_mult follows image_size, 64 channels per head, no dropout."""
    if unet_ver != "v1":
        raise ValueError(
            f"unet_ver {unet_ver!r}: the classifier is upstream's unet_v1.EncoderUNetModel (its configs pass "
            "--unet_ver v1); no other classifier is offered"
        )
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"the classifier's channel_mult follows image_size (upstream create_classifier); image_size "
            f"{image_size} is not one of {sorted(DEFAULT_CHANNEL_MULT)}"
        )
    if out_channels < 2:
        raise ValueError(f"the classifier needs out_channels (number of classes) >= 2, got {out_channels}")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=out_channels,
        num_res_blocks=classifier_depth,
        attention_resolutions=parse_attention_resolutions(classifier_attention_resolutions, image_size),
        channel_mult=DEFAULT_CHANNEL_MULT[image_size],
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def create_classifier_and_diffusion(**kwargs):
    """``create_classifier_and_diffusion(**classifier_and_diffusion_defaults())`` -> (classifier, diffusion)."""
    args = _checked_flags(kwargs, classifier_and_diffusion_defaults(), "classifier/diffusion")
    classifier = create_classifier(**{k: v for k, v in args.items() if k in classifier_defaults()})
    return classifier, _diffusion_from_flags(args)
