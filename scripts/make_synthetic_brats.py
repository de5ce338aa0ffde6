"""Write a BraTS-2021-like synthetic data set (240x240x155, flair/t1/t1ce/t2/seg) from nilearn's MNI152 templates.

    python scripts/make_synthetic_brats.py --output data/synth_brats --num_subjects 24 --healthy_fraction 0.25
"""

import argparse
import sys

from guided_diffusion.data.synthetic import make_synthetic_brats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the subject folders (BraTS raw layout)")
    p.add_argument("--num_subjects", type=int, default=24)
    p.add_argument("--healthy_fraction", type=float, default=0.25, help="share of subjects without a tumour")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    args = p.parse_args()
    try:
        names = make_synthetic_brats(args.output, num_subjects=args.num_subjects,
                                     healthy_fraction=args.healthy_fraction, seed=args.seed, workers=args.workers)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(names)} subjects in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
