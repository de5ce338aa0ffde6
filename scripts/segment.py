"""Whole-volume anomaly segmentation: NIfTI scans in, anomaly map and mask NIfTI on the scan's own grid out.

    python scripts/segment.py --model_dir logs/clf_free_guided --ema True --w 2 --forward_steps 600 \
        --hyperparams_file logs/.../hyperparams.json --input data/new_scans --output results/segment ...
    torchrun --nproc-per-node 2 scripts/segment.py ...        # subjects spread over processes

See guided_diffusion/evaluation/volumes/ and the README ("Whole volumes").
"""

import sys

from guided_diffusion.evaluation.volumes.cli import main

if __name__ == "__main__":
    sys.exit(main())
