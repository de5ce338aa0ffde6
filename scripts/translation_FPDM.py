"""AnoFPDM anomaly segmentation: validation (thresholds), test, metrics, pictures.

One process:   python scripts/translation_FPDM.py --data_dir DATA --model_dir LOGS --ema True --w 2 ...
Several GPUs:  torchrun --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint localhost:12358 \
                   scripts/translation_FPDM.py ...
Results go to $OPENAI_LOGDIR (metrics.json, metrics.csv, per_slice.csv, panels.png); a rerun resumes.
Flags follow upstream AnoFPDM; see the README and guided_diffusion/evaluation/translation.py.
"""

import sys

from guided_diffusion.evaluation.translation import main

if __name__ == "__main__":
    main()
    sys.exit(0)
