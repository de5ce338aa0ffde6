"""Upstream's name for `anofpdm evaluate` (AnoFPDM by default; any --method); see `anofpdm evaluate --help`."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], prog="scripts/translation_FPDM.py"))
