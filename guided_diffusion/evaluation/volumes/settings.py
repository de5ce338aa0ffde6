"""The whole-volume segmentation's settings: the subjects, how their slices are prepared and written, the method's
``InferenceSettings`` and where its hyper-parameters come from (a file, or the evaluation's validation pass)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

from guided_diffusion.data import geometry as geo
from guided_diffusion.data import preprocess as pp
from guided_diffusion.evaluation.settings import DataSettings, ValidationSettings
from guided_diffusion.flags import option
from guided_diffusion.methods.settings import InferenceSettings

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class VolumeSettings:
    """The subjects and how their slices are prepared (as preprocessing did) and written."""

    input: List[str] = option([], "subject folders (BraTS <P>/<P>_flair.nii.gz ..., ATLAS <P>/<P>_T1w.nii.gz or a "
                              "BIDS sub-* folder) or data set roots holding them", metavar="FOLDER")
    files: List[str] = option([], "one subject as explicit files: flair=F t1=F t1ce=F t2=F [seg=F] (ATLAS: t1=F "
                              "[seg=F]); its name is --id", metavar="KEY=PATH")
    id: str = option("", "the name of the --files subject (it names the output files)")
    subjects_csv: str = option("", "a CSV of subjects: an id column and one column per modality (and seg)")
    mod: str = option("all", "modalities the model was trained on: all = flair, t1, t1ce, t2 (ATLAS: t1)",
                      choices=("all",) + tuple(pp.MODALITIES))
    first: int = option(0, "drop the first N slices of each volume, as preprocessing did (0: none)")
    last: int = option(0, "drop the last M slices of each volume, as preprocessing did (0: none)")
    batch_size: int = option(16, "slices per forward pass and process")
    zero_healthy_slices: bool = option(True, "empty the mask on slices classified healthy")
    overlay_slices: int = option(4, "axial slices shown in <id>_overlay.png (0: no picture)")
    panel_modality: int = option(-1, "input channel shown in the overlay (-1: the first of --modality)")
    orientation: str = option("", "orientation scans are sliced in, as preprocessing's (empty: the data set's own, "
                              "BraTS LPS, ATLAS RAS; 'stored': the array as stored, as upstream)")
    raw_map: bool = option(False, "write the model's map everywhere (upstream's), not zero outside the brain")

    def __post_init__(self) -> None:
        if not (self.input or self.files or self.subjects_csv):
            raise ValueError("no subjects: pass --input FOLDER..., --files KEY=PATH... or --subjects_csv FILE")
        if self.files and not self.id:
            raise ValueError("--files needs --id NAME (the subject's name, used for the output file names)")
        if self.id and not SAFE_ID.match(self.id):
            raise ValueError(f"--id {self.id!r}: use letters, digits and . _ + - only (it names the output files)")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size (slices per forward) must be >= 1, got {self.batch_size}")
        if self.first < 0 or self.last < 0:
            raise ValueError(f"--first/--last must be >= 0, got {self.first}/{self.last}")
        if self.overlay_slices < 0:
            raise ValueError(f"--overlay_slices must be >= 0, got {self.overlay_slices}")


def _check_output_apart(output: str, v: VolumeSettings) -> None:
    """``--output`` must not be or lie in an ``--input`` folder, nor be the folder of a ``--files`` scan: a rerun would
    take the results there for a subject's scans (and lose the finished ones). An output folder holding the input
    folders is fine (e.g. ``--output .``)."""
    out = Path(output).expanduser().resolve()
    inputs = [(f"--input {e}", Path(e).expanduser().resolve()) for e in v.input]
    inputs += [(f"--files {f}", Path(f.partition("=")[2]).expanduser().resolve().parent) for f in v.files]
    for flag, folder in inputs:
        if out == folder or folder in out.parents:
            raise ValueError(f"--output {output} overlaps {flag}: results written among the scans would be read as a "
                             "subject's files on the next run, and finished results would be lost. Use an --output "
                             "outside the input folders")


def channel_names(dataset: str, mod: str) -> Tuple[str, ...]:
    """The modalities the model takes, in channel order, as preprocessing stacks them."""
    if dataset == "atlas":
        return ("t1",)
    return tuple(pp.MODALITIES) if mod == "all" else (mod,)


@dataclass(frozen=True)
class SegmentSettings:
    """One whole-volume segmentation run (``volumes.run``)."""

    volumes: VolumeSettings
    inference: InferenceSettings
    data: DataSettings = field(default_factory=DataSettings)  # the validation pass's data (--data_dir)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    output: str = ""
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        v, name = self.volumes, self.data.name
        if name == "atlas" and v.mod not in ("all", "t1"):
            raise ValueError(f"ATLAS has only T1w images: --mod must be t1 (or all), got {v.mod!r}")
        if not self.output:
            raise ValueError("--output is required: the folder the NIfTI results, JSON and pictures go to")
        _check_output_apart(self.output, v)
        names = channel_names(name, v.mod)
        source = self.inference.source
        if self.inference.in_channels != len(names):
            if source.config_file is None:  # the channel count is the command line's, not the checkpoint's record
                raise ValueError(
                    f"--in_channels {self.inference.in_channels} (from the flags or the preset: --model_dir "
                    f"{source.checkpoint.model_dir} has no config.json to say what the checkpoint takes) but --name "
                    f"{name} --mod {v.mod} gives {len(names)} channel(s) ({', '.join(names)}): pass --in_channels "
                    f"{len(names)} for a checkpoint trained on {', '.join(names)}")
            raise ValueError(f"the model takes --in_channels {self.inference.in_channels} channels "
                             f"({source.config_file}) but --name {name} --mod {v.mod} gives {len(names)} "
                             f"({', '.join(names)}): pass the --mod the model was trained on")
        val = self.validation
        if not val.hyperparams_file and val.num_batches_val != 0:
            if not self.data.data_dir or not os.path.isdir(os.path.join(self.data.data_dir, "npy_val")):
                raise ValueError("the hyper-parameters come from --hyperparams_file (an evaluation run's "
                                 "hyperparams.json) or from a validation pass on --data_dir (a preprocessed folder "
                                 f"with npy_val/); got --data_dir {self.data.data_dir!r}")
        geo.resolve_orientation(v.orientation, name)  # a ValueError naming --orientation
        if not 0 <= self.panel_modality < self.inference.in_channels:
            raise ValueError(f"--panel_modality {v.panel_modality} out of range for the model's "
                             f"{self.inference.in_channels} input channels")

    @property
    def panel_modality(self) -> int:
        p = self.volumes.panel_modality
        return p if p != -1 else self.inference.maps.modality[0]

    @property
    def orientation(self) -> str:
        """The orientation the scans are sliced in (the data set's own unless --orientation says)."""
        return geo.resolve_orientation(self.volumes.orientation, self.data.name)

    @property
    def channels(self) -> Tuple[str, ...]:
        return channel_names(self.data.name, self.volumes.mod)
