"""AnoDDPM anomaly segmentation (upstream's translation_HEALTHY.py): noise each slice to --sample_steps with Gaussian
or simplex noise (--noise_type), reconstruct with the unconditional model (DDPM --use_ddpm True, or DDIM), threshold
the squared error (tuned on pixel-labelled validation slices), metrics and panels.

    python scripts/translation_HEALTHY.py --data_dir DATA --model_dir logs/anoddpm_simplex --ema True \
        --sample_steps 200 --noise_type simplex --use_ddpm True --modality 0 3 ...
Same driver, flags and outputs as scripts/translation_FPDM.py (--method anoddpm); see the README.
"""

import sys

from guided_diffusion.evaluation.translation import main

if __name__ == "__main__":
    main(method="anoddpm")
    sys.exit(0)
