"""`anofpdm synth`: a BraTS-like synthetic data set."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("synth", sys.argv[1:], prog="scripts/make_synthetic_brats.py"))
