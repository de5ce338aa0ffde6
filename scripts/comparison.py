"""The paper's comparison table (Table 1) on one data set: train or reuse the models of AnoDDPM (G, S), DDIM +
classifier, DDIM classifier-free (DDIB) and AnoFPDM at a small size, run every method on the same test slices, write
comparison.md / comparison.csv / comparison.png. See guided_diffusion/evaluation/comparison.py and the README.

    python scripts/comparison.py --out runs/comparison [--data_dir DATA] [--seeds 0 1 2]
"""

import sys

from guided_diffusion.evaluation.comparison import main

if __name__ == "__main__":
    sys.exit(main())
