"""Train a diffusion UNet (classifier-free guided, plain class-conditional or unconditional); see ``guided_diffusion/training/train_cli.py`` and the README.

    python scripts/train.py --data_dir DATA --unet_ver hae_v2_conservative --use_hae True ...
    torchrun --nproc-per-node 2 --master-port 12356 scripts/train.py ...
"""

from guided_diffusion.training.train_cli import main

if __name__ == "__main__":
    main()
