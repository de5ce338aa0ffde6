"""Upstream's name for `anofpdm train-classifier` (the noisy-image classifier of classifier-guided DDIM)."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("train-classifier", sys.argv[1:], prog="scripts/train_classifier.py"))
