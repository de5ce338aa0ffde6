"""Classifier-guided DDIM anomaly segmentation (upstream's translation_CLF.py): noise each slice to --sample_steps,
decode with DDIM toward healthy, the noise prediction corrected by the noisy-image classifier (--clf_dir, --clf_num,
--classifier_scale), threshold the squared error (tuned on pixel-labelled validation slices), metrics and panels.

    python scripts/translation_CLF.py --data_dir DATA --model_dir logs/clf_guided --clf_dir logs/clf \
        --sample_steps 200 --classifier_scale 1000 --modality 0 3 ...
Same driver, flags and outputs as scripts/translation_FPDM.py (--method clf_guided); see the README.
"""

import sys

from guided_diffusion.evaluation.translation import main

if __name__ == "__main__":
    main(method="clf_guided")
    sys.exit(0)
