"""Upstream's name for `anofpdm train` (train a diffusion UNet); see `anofpdm train --help`."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:], prog="scripts/train.py"))
