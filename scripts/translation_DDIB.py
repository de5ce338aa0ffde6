"""Upstream's name for `anofpdm evaluate --method ddib` (DDIM classifier-free)."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], method="ddib", prog="scripts/translation_DDIB.py"))
