"""Alias of translation_FPDM.py with --unet_ver hae_v2_conservative --use_hae True (the name upstream configs use)."""

import sys

from guided_diffusion.evaluation.translation import main

if __name__ == "__main__":
    main(unet_ver="hae_v2_conservative")
    sys.exit(0)
