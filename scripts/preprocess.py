"""Upstream's name for `anofpdm preprocess` (NIfTI volumes -> slices)."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("preprocess", sys.argv[1:], prog="scripts/preprocess.py"))
