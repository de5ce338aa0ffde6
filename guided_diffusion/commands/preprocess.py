"""``anofpdm preprocess``: BraTS 2021 / ATLAS v2.0 NIfTI volumes into the slice format of training and evaluation.

Each subject's volumes are scaled per channel (99th percentile), cut to the brain's slice range, resized to
--image_size² and written as npy_{train,val,test}/patient_<P>/slice_<z>.npz (upstream's format), with the split in
data_splits/. Rerun after an interruption: finished subjects are kept. Example:

    anofpdm preprocess --source data/BraTS2021_Training_Data --output data/brats128 --image_size 128 --workers 4
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Sequence

from guided_diffusion.commands import common
from guided_diffusion.data.preprocess import DATASETS, MODALITIES
from guided_diffusion.errors import entry_point
from guided_diffusion.flags import add_options, build, option, output_folder


@dataclass(frozen=True)
class PreprocessFlags:
    """The preprocessing flags (checked by ``data.preprocess.preprocess``)."""

    source: str = option("", "folder with one sub-folder per subject (BraTS), or an ATLAS tree (flattened or BIDS)")
    name: str = option("brats", "data set layout", choices=DATASETS)
    mod: str = option("all", "channels to keep: all = flair, t1, t1ce, t2 (ATLAS: t1)", choices=("all",) + MODALITIES)
    first: int = option(0, "drop the first N slices of each volume (0: none)")
    last: int = option(0, "drop the last M slices of each volume (0: none)")
    image_size: int = option(128, "slices are resized to image_size x image_size (paper: 128)")
    workers: int = option(1, "parallel worker processes (about one per core)")
    min_val_lesion_subjects: int = option(0, "put at least this many subjects with a lesion into validation when the "
                                          "split is made (0: upstream's split; AnoFPDM needs one)")
    orientation: str = option("", "orientation scans are brought into before slicing, e.g. LPS (empty: the data set's "
                              "own, BraTS LPS, ATLAS RAS; 'stored': slice the array as stored, as upstream)")
    progress: bool = option(True, "progress bar")


def create_parser(prog: str = "anofpdm preprocess") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    add_options(p, PreprocessFlags)
    p.add_argument("-s", dest="source", help=argparse.SUPPRESS)  # upstream's short flags
    p.add_argument("-m", dest="mod", help=argparse.SUPPRESS)
    common.add_output_flag(p, "the slice folder (default: <source>/../preprocessed_data_<mod>_<first><last>_<size>)")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm preprocess") -> int:
    """Command-line entry point; 1 when some subjects failed (named on stderr and in preprocess_summary.json)."""
    from guided_diffusion.data.preprocess import preprocess

    args = create_parser(prog).parse_args(argv)
    f = build(PreprocessFlags, args)
    if not f.source:
        raise ValueError("--source is required: the folder of the raw subjects")
    summary = preprocess(f.source, name=f.name, mod=f.mod, first=f.first, last=f.last,
                         output=output_folder(args.output, None, env=None) or None, image_size=f.image_size,
                         workers=f.workers, progress=f.progress, min_val_lesion=f.min_val_lesion_subjects,
                         orientation=f.orientation)
    return 1 if summary["errors"] else 0
