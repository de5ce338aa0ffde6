"""Write a BraTS-2021-like synthetic data set (240x240x155, flair/t1/t1ce/t2/seg) from nilearn's MNI152 templates.

    python scripts/make_synthetic_brats.py --output data/synth_brats --num_subjects 24 --healthy_fraction 0.25
    python scripts/make_synthetic_brats.py --output data/synth_small --preset small --seed 3

See ``guided_diffusion/data/synthetic.py`` for the flags (presets, lesion size, contrast, count, volume shape).
"""

import sys

from guided_diffusion.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
