"""Upstream's name for `anofpdm evaluate --method clf_guided` (classifier-guided DDIM)."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], method="clf_guided", prog="scripts/translation_CLF.py"))
