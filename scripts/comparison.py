"""`anofpdm compare`: the paper's comparison table at a small size."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("compare", sys.argv[1:], prog="scripts/comparison.py"))
