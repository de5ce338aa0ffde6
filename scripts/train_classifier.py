"""Train the noisy-image classifier of classifier-guided sampling; see ``guided_diffusion/training/classifier_cli.py``
and the README.

    python scripts/train_classifier.py --data_dir DATA --image_size 128 --in_channels 4 --batch_size 64 ...
    torchrun --nproc-per-node 2 --master-port 12370 scripts/train_classifier.py ...
"""

from guided_diffusion.training.classifier_cli import main

if __name__ == "__main__":
    main()
