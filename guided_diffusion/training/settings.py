"""The training commands' settings: the data, the loop (``TrainLoop``), the preview grids and the model.

``TrainSettings`` trains a diffusion UNet: classifier-free guided (``--num_classes 2``, the default), plain
class-conditional (``--num_classes 2 --clf_free false``: the model a noisy-image classifier guides) or unconditional
(``--num_classes 0``, e.g. AnoDDPM on healthy slices with ``--mixed false --n_unhealthy_patients 0``), with Gaussian
or simplex noise. ``ClassifierTrainSettings`` trains that classifier. Batch sizes are global (all processes).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import List, Optional

from guided_diffusion.architecture import ClassifierSettings, DiffusionSettings, ModelSettings
from guided_diffusion.diffusion.noise import NOISE_TYPES, check_noise_type
from guided_diffusion.diffusion.resample import SCHEDULE_SAMPLERS
from guided_diffusion.flags import option
from guided_diffusion.runtime import PRECISIONS
from guided_diffusion.training.train_util import parse_ema_rates

DEFAULT_THRESHOLD = 0.1  # classifier-free label drop (upstream's default -1 crashed class-conditional training)


@dataclass(frozen=True)
class TrainDataSettings:
    """The preprocessed training slices."""

    name: str = option("brats", "data set: brats or atlas", choices=("brats", "atlas"))
    data_dir: str = option("", "preprocessed data folder (npy_train/, written by the preprocess command)")
    mixed: bool = option(True, "train on healthy and unhealthy slices (false: healthy slices only, e.g. AnoDDPM)")
    ret_lab: bool = option(True, "give the model the slice labels (class-conditional models)")
    n_unhealthy_patients: int = option(-1, "use at most this many patients with a lesion (-1: all)")
    n_healthy_patients: int = option(-1, "use at most this many patients without a lesion (-1: all)")
    num_workers: int = option(4, "data-loading worker processes (0: in the main process)")
    split: str = option("train", "upstream's flag: the split to train on", hidden=True)
    training: bool = option(True, "upstream's flag (unused)", hidden=True)

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("--data_dir is required (the folder holding npy_train/)")
        if not os.path.isdir(self.data_dir):
            raise ValueError(f"--data_dir {self.data_dir} does not exist or is not a folder")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0 (0: off), got {self.num_workers}")


@dataclass(frozen=True)
class LoopSettings:
    """The optimisation loop (``TrainLoop``) both training commands share."""

    batch_size: int = option(16, "global batch (all processes together)")
    batch_per_process: int = option(0, "rows per process: the global batch becomes this times the processes "
                                    "unless --batch_size is given (0: unused)")
    microbatch: int = option(-1, "split each process's batch into chunks of this size (-1: no split)")
    lr: float = option(1e-4, "learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_anneal_steps: int = option(0, "anneal the learning rate linearly to 0 over this many steps (0: constant)")
    ema_rate: str = option("0.9999", "EMA rates of the weights, comma-separated (\"\": none)")
    log_interval: int = option(100, "log the losses every N steps")
    save_interval: int = option(100, "save checkpoints every N steps")
    resume_checkpoint: str = option("auto", "checkpoint to resume from: auto (the newest in --output of this run's "
                                    "model), a path, or \"\" (start fresh; refused where checkpoints exist)")
    max_steps: int = option(0, "stop after this many optimiser steps (0: --total_epochs decides)")
    precision: str = option("fp32", "autocast precision (bf16 / fp16 with a grad scaler)", choices=tuple(PRECISIONS))
    grad_clip: float = option(0.0, "clip the gradient norm at this value (0: off)")
    seed: int = option(0, "seed of the weights, the data order and the noise")
    schedule_sampler: str = option("uniform", "how timesteps are drawn", choices=tuple(SCHEDULE_SAMPLERS))
    find_unused_parameters: str = option("auto", "DDP's find_unused_parameters: auto, true or false",
                                         choices=("auto", "true", "false", "True", "False"))
    tensorboard: bool = option(False, "also write the logged values as TensorBoard event files to <output>/tb "
                               "(needs the tensorboard package: pip install -e \".[tensorboard]\")")
    compile: bool = option(False, "run the training step through torch.compile (the same function; the first step "
                           "pays the compilation)")
    fp16_scale_growth: float = option(1e-3, "upstream's fp16 flag (the grad scaler is torch's here)", hidden=True)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for flag in ("log_interval", "save_interval"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("weight_decay", "grad_clip", "max_steps", "lr_anneal_steps", "batch_per_process"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0 (0: off), got {getattr(self, flag)}")
        parse_ema_rates(self.ema_rate)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard true needs the tensorboard package, which is not installed: "
                             "pip install tensorboard (or the project's extra: pip install -e \".[tensorboard]\"), "
                             "or drop --tensorboard")

    @property
    def ema_rates(self) -> List[float]:
        return parse_ema_rates(self.ema_rate)


@dataclass(frozen=True)
class DiffusionTrainingSettings:
    """What a diffusion training step minimises, and its preview grids."""

    threshold: Optional[float] = option(None, f"classifier-free label-drop probability (default: {DEFAULT_THRESHOLD} "
                                        "for classifier-free models; none for the others)")
    noise_type: str = option("gaussian", "noise of the forward process: gaussian, or simplex (AnoDDPM S)",
                             choices=NOISE_TYPES)
    total_epochs: int = option(1000, "epochs over the training slices (--max_steps may stop earlier)")
    w: List[float] = option([2.0], "guidance weights of the preview grids, e.g. 1 1.8 2 3", comma_list=True)
    sample_shape: Optional[List[int]] = option(None, "preview grid shape N C H W (default: 12 images of the model's "
                                               "shape)")
    preview_steps: int = option(50, "DDIM steps of each preview grid (0: no previews)")
    ddpm_sampling: bool = option(False, "previews by DDPM sampling instead of DDIM")
    image_dir: str = option("", "folder of the preview grids (default: <output>/images)")

    def __post_init__(self) -> None:
        check_noise_type(self.noise_type)
        if self.total_epochs < 1:
            raise ValueError(f"--total_epochs must be >= 1, got {self.total_epochs}")
        if self.preview_steps < 0:
            raise ValueError(f"--preview_steps must be >= 0 (0: off), got {self.preview_steps}")


@dataclass(frozen=True)
class TrainSettings:
    """One diffusion training run (``training.run.train``)."""

    data: TrainDataSettings
    model: ModelSettings  # shape resolved
    loop: LoopSettings = field(default_factory=LoopSettings)
    training: DiffusionTrainingSettings = field(default_factory=DiffusionTrainingSettings)
    output: str = "."
    world_size: int = 1

    def __post_init__(self) -> None:
        m, t = self.model, self.training
        _check_batches(self.loop, self.world_size)
        if not m.class_cond:
            if t.threshold not in (None, -1):
                raise ValueError(f"--threshold {t.threshold} drops class labels, but --num_classes 0 trains an "
                                 "unconditional model: omit --threshold")
        elif not self.data.ret_lab:
            raise ValueError("a class-conditional model (--num_classes > 0) needs labels: --ret_lab true")
        elif m.clf_free:
            if t.threshold is not None and not 0 < t.threshold <= 1:
                raise ValueError(f"--threshold {t.threshold}: classifier-free training (--clf_free true) drops "
                                 "labels with this probability and needs 0 < threshold <= 1 (the presets use 0.1)")
        else:  # plain class-conditional (the classifier-guided DM): the label is always seen
            if m.unet_ver != "v1":
                raise ValueError(f"--clf_free false (a plain class-conditional model, the classifier-guided DM) "
                                 f"exists for --unet_ver v1 only, not {m.unet_ver}")
            if t.threshold not in (None, -1):
                raise ValueError(f"--threshold {t.threshold} drops labels for classifier-free training, but "
                                 "--clf_free false trains a plain class-conditional model (the one a classifier "
                                 "guides): omit --threshold, or pass --clf_free true")
        shape = self.sample_shape
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"--sample_shape must be four positive ints N C H W, got {shape}")
        if tuple(shape[1:]) != (m.in_channels, m.image_size, m.image_size):
            raise ValueError(f"--sample_shape {shape} must match the model's {m.in_channels} channels and "
                             f"{m.image_size} px (N {m.in_channels} {m.image_size} {m.image_size})")

    @property
    def label_drop(self) -> float:
        """The label-drop probability in effect (-1: none)."""
        m, t = self.model, self.training
        if m.class_cond and m.clf_free:
            return DEFAULT_THRESHOLD if t.threshold is None else float(t.threshold)
        return -1.0

    @property
    def ret_lab(self) -> bool:
        return self.data.ret_lab and bool(self.model.class_cond)

    @property
    def sample_shape(self) -> List[int]:
        given = self.training.sample_shape
        return list(given) if given else [12, int(self.model.in_channels), int(self.model.image_size),
                                          int(self.model.image_size)]

    @property
    def image_dir(self) -> str:
        return self.training.image_dir or os.path.join(self.output, "images")


@dataclass(frozen=True)
class ClassifierTrainingSettings:
    """What a classifier training step sees, and its validation."""

    noised: bool = option(True, "train on x_t = q_sample(x0, t) with t drawn (false: clean inputs at t = 0)")
    iterations: int = option(150000, "optimiser steps")
    anneal_lr: bool = option(False, "anneal the learning rate linearly to 0 over --iterations")
    val_data_dir: str = option("", "folder with npy_val/ for validation (default: --data_dir)")
    eval_interval: int = option(5000, "validate every N steps (0: never)")
    val_batches: int = option(1, "validation batches per evaluation")
    num_mix: int = option(10, "upstream's flag (unused there too)", hidden=True)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        if self.eval_interval < 0 or self.val_batches < 1:
            raise ValueError(f"--eval_interval must be >= 0 (0: no validation) and --val_batches >= 1, got "
                             f"{self.eval_interval} and {self.val_batches}")
        if self.val_data_dir and not os.path.isdir(self.val_data_dir):
            raise ValueError(f"--val_data_dir {self.val_data_dir} does not exist or is not a folder")


@dataclass(frozen=True)
class ClassifierTrainSettings:
    """One classifier training run (``training.run.train_classifier``)."""

    data: TrainDataSettings
    classifier: ClassifierSettings  # shape resolved
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    training: ClassifierTrainingSettings = field(default_factory=ClassifierTrainingSettings)
    output: str = "."
    world_size: int = 1

    def __post_init__(self) -> None:
        _check_batches(self.loop, self.world_size)
        if not self.data.mixed:
            raise ValueError("--mixed false selects healthy slices only; the classifier needs both classes: "
                             "--mixed true")
        if not self.training.noised and self.loop.schedule_sampler != "uniform":
            raise ValueError(f"--schedule_sampler {self.loop.schedule_sampler} draws timesteps, but --noised false "
                             "trains on clean inputs at t = 0")

    def flags(self) -> dict:
        """config.json's flags (``classifier_and_diffusion_defaults`` keys)."""
        return {**self.classifier.flags(), **self.diffusion.diffusion_flags()}

    @property
    def image_dir(self) -> str:
        return os.path.join(self.output, "images")


def _check_batches(loop: LoopSettings, world: int) -> None:
    if loop.batch_size % world:
        raise ValueError(f"--batch_size {loop.batch_size} (global) must be a positive multiple of the number of "
                         f"processes ({world})")
    if loop.microbatch > 0 and loop.microbatch > loop.batch_size // world:
        raise ValueError(f"--microbatch {loop.microbatch} exceeds the per-process batch {loop.batch_size // world}")
