"""The evaluation run's settings: which slices (data, validation, test), what it writes, and the method's
``InferenceSettings``. The whole-volume segmentation command shares the data and validation settings (its
hyper-parameters can come from the same validation pass)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from guided_diffusion.flags import option
from guided_diffusion.methods.settings import InferenceSettings
from guided_diffusion.metrics import AUPRC_POOLINGS, PR_POOLINGS

DATASETS = ("brats", "atlas")


@dataclass(frozen=True)
class DataSettings:
    """The preprocessed slices and how they are drawn."""

    name: str = option("brats", "data set: brats or atlas (the data's layout and the presets' defaults)",
                       choices=DATASETS)
    data_dir: str = option("", "preprocessed data folder (npy_val/, npy_test/, written by the preprocess command)")
    use_weighted_sampler: bool = option(False, "class-balanced validation/test order (upstream's option)")
    num_workers: int = option(0, "data-loading worker processes (0: in the main process)")

    def __post_init__(self) -> None:
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ValueError(f"--data_dir {self.data_dir!r} is not a folder (expected the one holding npy_val/, "
                             "npy_test/)")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ValidationSettings:
    """Where the hyper-parameters come from: a validation pass, or a file."""

    batch_size_val: int = option(100, "validation slices per batch, over all processes")
    num_batches_val: int = option(-1, "validation batches (-1: the whole split; 0: no validation, the values of "
                                  "--hyperparams_file)")
    val_slices: int = option(0, "validation slices to use: sets --num_batches_val to cover them (0: unused)")
    hyperparams_file: str = option("", "hyperparams.json of an earlier run with the same settings (skips "
                                   "validation)")
    accept_hyperparams: bool = option(False, "use --hyperparams_file even where the settings it was fitted with "
                                      "(--w, steps, respacing, checkpoint...) differ from this run's")

    def __post_init__(self) -> None:
        if self.num_batches_val < -1:
            raise ValueError(f"--num_batches_val must be >= 0 or -1 (whole val split), got {self.num_batches_val}")
        if self.batch_size_val < 1:
            raise ValueError(f"--batch_size_val must be >= 1, got {self.batch_size_val}")
        if self.val_slices < 0:
            raise ValueError(f"--val_slices must be >= 0, got {self.val_slices}")
        if self.hyperparams_file and not os.path.isfile(self.hyperparams_file):
            raise ValueError(f"--hyperparams_file {self.hyperparams_file!r} does not exist")
        if self.accept_hyperparams and not self.hyperparams_file:
            raise ValueError("--accept_hyperparams true accepts a --hyperparams_file fitted with other settings; no "
                             "--hyperparams_file is given")


@dataclass(frozen=True)
class TestSettings:
    """The test pass and what it writes."""

    batch_size: int = option(32, "test slices per batch, over all processes")
    num_batches: int = option(-1, "test batches (-1: the whole test split)")
    test_slices: int = option(0, "test slices to evaluate: sets --num_batches to cover them (0: unused)")
    batch_per_process: int = option(0, "slices per batch and process: the global batch sizes become this times the "
                                    "processes, unless given (0: unused)")
    num_panels: int = option(8, "slices shown in panels.png (unhealthy first)")
    panel_modality: int = option(-1, "input channel shown in the pictures (-1: the first of --modality)")
    save_data: bool = option(False, "also write every slice's arrays (per_slice_arrays.npz)")
    auprc_pooling: str = option("global", "AUPRC over all test pixels (global) or upstream's mean over batches "
                                "(batch)", choices=AUPRC_POOLINGS)
    pr_pooling: str = option("global", "pixel precision/recall over all test pixels (global) or upstream's per-batch "
                             "ratios averaged (mixed: mean over batches; unhealthy: weighted by unhealthy slices)",
                             choices=PR_POOLINGS)
    image_dir: str = option("", "folder for the pictures (default: --output)")
    dynamic_clip: bool = option(False, "upstream's flag; only false is supported", hidden=True)
    threshold: float = option(-1.0, "upstream's training flag, unused at inference", hidden=True)

    def __post_init__(self) -> None:
        if self.dynamic_clip:
            raise ValueError("--dynamic_clip true is not supported (upstream's configs use false)")
        if self.num_batches == 0 or self.num_batches < -1:
            raise ValueError(f"--num_batches must be >= 1 or -1 (whole test split), got {self.num_batches}")
        for flag in ("batch_size", "num_panels", "test_slices", "batch_per_process"):
            low = 1 if flag == "batch_size" else 0
            if getattr(self, flag) < low:
                raise ValueError(f"--{flag} must be >= {low}, got {getattr(self, flag)}")


def batches_for(slices: int, batch_size: int) -> int:
    """Batches of ``batch_size`` that cover ``slices`` slices."""
    return max(1, math.ceil(slices / batch_size))


@dataclass(frozen=True)
class EvaluationSettings:
    """One evaluation run (``evaluation.driver``)."""

    inference: InferenceSettings
    data: DataSettings = field(default_factory=DataSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    test: TestSettings = field(default_factory=TestSettings)
    output: str = "."
    resume: bool = True
    progress: bool = True
    world_size: int = 1

    def __post_init__(self) -> None:
        if not self.data.data_dir:
            raise ValueError("--data_dir is required: the preprocessed folder holding npy_val/, npy_test/")
        for flag, value in (("batch_size", self.test.batch_size), ("batch_size_val", self.validation.batch_size_val)):
            if value < self.world_size:
                raise ValueError(f"--{flag} {value} is global and must be >= the number of processes "
                                 f"({self.world_size})")
        channels = self.inference.in_channels
        if not 0 <= self.panel_modality < channels:
            raise ValueError(f"--panel_modality {self.test.panel_modality} out of range for the model's {channels} "
                             "input channels")

    @property
    def panel_modality(self) -> int:
        return self.test.panel_modality if self.test.panel_modality != -1 else self.inference.maps.modality[0]

    @property
    def image_dir(self) -> str:
        return self.test.image_dir or self.output
