"""Upstream's alias of translation_FPDM.py with --unet_ver hae_v2_conservative fixed."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], unet_ver="hae_v2_conservative", prog="scripts/translation_FPDM_hae_v2_conservative.py"))
