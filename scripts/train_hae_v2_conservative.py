"""Upstream's train_hae_v2_conservative.py: `anofpdm train` with --unet_ver hae_v2_conservative fixed."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:], unet_ver="hae_v2_conservative", prog="scripts/train_hae_v2_conservative.py"))
