"""What a slice method is built from: the model to load, the anomaly-map post-processing every method shares, and
the method's own settings (each method module declares its ``Settings`` class).

``InferenceSettings`` is the one settings object that evaluation and whole-volume segmentation both build from their
flags, and its construction is their one check (``__post_init__``: the shared settings, then the method's
``check``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Set

from guided_diffusion.architecture import ModelSettings
from guided_diffusion.flags import build, option
from guided_diffusion.loading import CheckpointSettings, ModelSource, resolve_model
from guided_diffusion.methods import postprocess
from guided_diffusion.methods.registry import method_class
from guided_diffusion.runtime import PRECISIONS, check_precision


@dataclass(frozen=True)
class MapSettings:
    """The anomaly map's channels and post-processing (every method)."""

    modality: List[int] = option([0, 3], "input channels averaged into the anomaly map (BraTS: 0 FLAIR, 3 T2; "
                                 "ATLAS: 0)")
    median_filter: bool = option(True, "median-filter the anomaly map (false: upstream's switch to skip it)")
    median_kernel: int = option(postprocess.DEFAULT_MEDIAN_KERNEL, "median window in pixels (odd; upstream 5)")
    cc_filter_size: int = option(-1, "drop mask components of at most this many pixels (-1: upstream's 40 px at "
                                 "128 px, scaled with the image area)")

    def __post_init__(self) -> None:
        if len(self.modality) == 0 or len(set(self.modality)) != len(self.modality):
            raise ValueError(f"--modality must list distinct channel indices, got {list(self.modality)}")
        postprocess.check_median_kernel(self.median_kernel)

    @property
    def kernel(self) -> int:
        """The median window in effect (1: no filter)."""
        return self.median_kernel if self.median_filter else 1

    def component_size(self, image_size: int) -> int:
        return postprocess.component_size(self.cc_filter_size, image_size)


@dataclass(frozen=True)
class ComputeSettings:
    """How the model calls run."""

    precision: str = option("fp32", "autocast precision of the model calls (bf16 is faster on recent GPUs)",
                            choices=tuple(PRECISIONS))
    seed: int = option(0, "seed of the slice order and of the noise")
    compile: bool = option(False, "AnoFPDM: run the model through torch.compile (the same function; the first call of "
                           "each shape pays the compilation)")
    channels_last: bool = option(False, "AnoFPDM: run the convolutions in the channels-last memory layout (the same "
                                 "function)")
    max_rows: int = option(-1, "AnoFPDM: rows per model call (-1: chosen for the device; 0: every row in one call; N: "
                           "the conditional and the null rows in separate calls of at most N)")

    def __post_init__(self) -> None:
        if self.max_rows < -1:
            raise ValueError(f"--max_rows must be -1 (chosen for the device), 0 (one call) or >= 1, got {self.max_rows}")


@dataclass(frozen=True)
class InferenceSettings:
    """Everything a slice method is built from (see the module docstring)."""

    method: str
    dataset: str  # brats | atlas (--name)
    source: ModelSource
    maps: MapSettings = field(default_factory=MapSettings)
    options: Any = None  # the method's own settings (``method_class(method).Settings``)
    compute: ComputeSettings = field(default_factory=ComputeSettings)  # precision, seed, how the model calls run

    def __post_init__(self) -> None:
        check_precision(self.compute.precision)
        channels = self.source.model.in_channels
        if channels is not None and any(not 0 <= m < channels for m in self.maps.modality):
            raise ValueError(f"--modality {list(self.maps.modality)} out of range for the model's {channels} input "
                             f"channels (--in_channels, from {self.source.flags_source})")
        cls = method_class(self.method)
        if self.options is None:
            object.__setattr__(self, "options", cls.Settings())
        cls.check(self)

    @property
    def precision(self) -> str:
        return self.compute.precision

    @property
    def seed(self) -> int:
        return self.compute.seed

    @property
    def image_size(self) -> int:
        return int(self.source.model.image_size)

    @property
    def in_channels(self) -> int:
        return int(self.source.model.in_channels)

    @property
    def grid_steps(self) -> int:
        """Steps of the diffusion grid the methods run on (respaced with --timestep_respacing)."""
        m = self.source.model
        if not m.timestep_respacing:
            return m.diffusion_steps
        from guided_diffusion.diffusion.respace import space_timesteps

        return len(space_timesteps(m.diffusion_steps, m.timestep_respacing))

    @property
    def component_size(self) -> int:
        return self.maps.component_size(self.image_size)


def inference_from_flags(values: Mapping[str, Any], given: Set[str], *, method: str, dataset: str,
                         data_dir: str = "", note: Optional[Callable[[str], None]] = None) -> InferenceSettings:
    """The one way evaluation and segmentation turn their flags into ``InferenceSettings`` (and so their one check).

    ``values``: every parsed flag; ``given``: those set on the command line or by a preset; ``data_dir``: where the
    data's shape comes from for a checkpoint folder without config.json.
    """
    from guided_diffusion.data.loaders import data_shape
    from guided_diffusion.methods.base import ResolveContext

    cls = method_class(method)
    source = resolve_model(build(CheckpointSettings, values), build(ModelSettings, values), given,
                           data_shape=(lambda: data_shape(data_dir)) if data_dir else None, note=note)
    options = cls.resolve(cls.read_settings(values),
                          ResolveContext(frozenset(given), source.model.in_channels, source.model.image_size))
    compute = build(ComputeSettings, values)
    if source.model.use_fp16:  # upstream's switch, through autocast here
        if compute.precision == "bf16":
            raise ValueError("--use_fp16 true asks for fp16 but --precision is bf16: pass one of them")
        compute = dataclasses.replace(compute, precision="fp16")
        source = ModelSource(source.checkpoint, source.model.replace(use_fp16=False), source.config_file)
    return InferenceSettings(method, dataset, source, build(MapSettings, values), options, compute)
