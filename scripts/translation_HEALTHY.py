"""Upstream's name for `anofpdm evaluate --method anoddpm` (AnoDDPM)."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], method="anoddpm", prog="scripts/translation_HEALTHY.py"))
