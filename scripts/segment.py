"""Upstream-style name for `anofpdm segment` (whole NIfTI volumes)."""

import sys

from guided_diffusion.commands import run

if __name__ == "__main__":
    sys.exit(run("segment", sys.argv[1:], prog="scripts/segment.py"))
