"""DDIB / classifier-free DDIM reconstruction (upstream's translation_DDIB.py) on the AnoFPDM checkpoint: DDIM
inversion to --sample_steps with the null embedding, decoding with healthy guidance --w, threshold the squared error
(tuned on pixel-labelled validation slices), metrics and panels.

    python scripts/translation_DDIB.py --data_dir DATA --model_dir logs/clf_free_guided --ema True \
        --sample_steps 450 --w 1.1 --modality 0 3 ...
Same driver, flags and outputs as scripts/translation_FPDM.py (--method ddib); see the README.
"""

import sys

from guided_diffusion.evaluation.translation import main

if __name__ == "__main__":
    main(method="ddib")
    sys.exit(0)
