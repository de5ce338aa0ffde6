"""Upstream's train_hae_v2_conservative.py: scripts/train.py with --unet_ver hae_v2_conservative --use_hae True fixed."""

from guided_diffusion.training.train_cli import main

if __name__ == "__main__":
    main(unet_ver="hae_v2_conservative")
