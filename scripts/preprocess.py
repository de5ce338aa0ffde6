"""Preprocess raw BraTS 2021 / ATLAS v2.0 NIfTI volumes into AnoFPDM's slice format (see guided_diffusion.data.preprocess).

    python scripts/preprocess.py --source data/BraTS21 --name brats --mod all --image_size 128 --workers 4
"""

import argparse
import sys

from guided_diffusion.data.preprocess import MODALITIES, preprocess
from guided_diffusion.errors import entry_point


@entry_point
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-s", "--source", required=True, help="folder with one sub-folder per subject (or ATLAS BIDS tree)")
    p.add_argument("--name", default="brats", choices=["brats", "atlas"], help="data set layout")
    p.add_argument("-m", "--mod", default="all", choices=["all", *MODALITIES],
                   help="channels to keep: all = [flair, t1, t1ce, t2] (ATLAS: t1)")
    p.add_argument("--first", type=int, default=0, help="drop the first N slices of each volume (0: none)")
    p.add_argument("--last", type=int, default=0, help="drop the last M slices of each volume (0: none)")
    p.add_argument("--output", default="",
                   help="output folder (default: <source>/../preprocessed_data_{mod}_{first}{last}_{image_size})")
    p.add_argument("--image_size", type=int, default=128, help="slices are resized to image_size x image_size")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--min_val_lesion_subjects", type=int, default=0,
                   help="put at least this many subjects with a lesion into validation when the split is made "
                        "(0: upstream's split; small data sets may otherwise get none, and AnoFPDM needs one)")
    p.add_argument("--orientation", default="",
                   help="orientation scans are brought into before slicing, e.g. LPS (empty: the data set's own, BraTS "
                        "LPS, ATLAS RAS; 'stored': slice the array as stored, as upstream)")
    args = p.parse_args()
    summary = preprocess(args.source, name=args.name, mod=args.mod, first=args.first, last=args.last,
                         output=args.output or None, image_size=args.image_size, workers=args.workers,
                         min_val_lesion=args.min_val_lesion_subjects, orientation=args.orientation)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
