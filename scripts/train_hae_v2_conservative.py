"""Upstream's train_hae_v2_conservative.py: scripts/train.py with --unet_ver fixed to hae_v2_conservative."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import main  # noqa: E402

if __name__ == "__main__":
    main(unet_ver="hae_v2_conservative")
