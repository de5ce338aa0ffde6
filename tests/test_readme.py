"""The README's "Try it in a few minutes" block, run as written, so that it cannot rot.

The block (the bash fence after ``<!-- readme-quick-start -->``) runs in an empty temporary folder with this checkout's
package (``anofpdm`` is a shim for ``python -m guided_diffusion`` with the checkout first on PYTHONPATH, so the test
needs no install) and one CPU thread. It must exit 0 and print every line the README shows after
``<!-- readme-quick-start-output -->``, with any number in place of each figure (figures move with the machine's
floating point; the words, the order of the fields and the counts of slices and subjects are what the README claims).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK_MARK = "<!-- readme-quick-start -->"
OUTPUT_MARK = "<!-- readme-quick-start-output -->"
NUMBER = r"(?:-?\d+(?:\.\d+)?(?:e-?\d+)?|None|n/a)"


def fenced_block(text: str, mark: str, language: str) -> str:
    """The body of the ```<language> fence that follows the line ``mark``."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == mark]
    assert len(starts) == 1, f"README.md must hold {mark} exactly once"
    fence = starts[0] + 1
    assert lines[fence].strip() == f"```{language}", f"{mark} must be followed by a ```{language} fence"
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    return "\n".join(lines[fence + 1:end]) + "\n"


def line_pattern(line: str) -> "re.Pattern[str]":
    """``line`` with each number replaced by any number (or None / n/a), the rest literal."""
    parts = re.split(r"\d+(?:\.\d+)?", line.strip())
    return re.compile(r"^\s*" + NUMBER.join(re.escape(p) for p in parts) + r"\s*$", re.M)


def test_fenced_block_and_line_pattern_helpers():
    text = "intro\n<!-- m -->\n```bash\necho 1\necho 2\n```\nafter\n"
    assert fenced_block(text, "<!-- m -->", "bash") == "echo 1\necho 2\n"
    pattern = line_pattern("mixed: dice 0.7748, n_slices 64")
    assert pattern.search("x\nmixed: dice 0.1, n_slices 64\n")
    assert pattern.search("mixed: dice None, n_slices 7")
    assert not pattern.search("mixed: iou 0.1, n_slices 64")  # the words are literal


@pytest.mark.slow
def test_readme_quick_start_block_runs_as_written(tmp_path):
    pytest.importorskip("nilearn")  # the synthetic data (the demo extra)
    text = README.read_text(encoding="utf-8")
    block = fenced_block(text, BLOCK_MARK, "bash")
    expected = [line for line in fenced_block(text, OUTPUT_MARK, "text").splitlines() if line.strip()]
    assert "anofpdm" in block and expected

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "anofpdm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m guided_diffusion "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    for var in ("OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)

    start = time.monotonic()
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                          text=True, timeout=1200)
    minutes = (time.monotonic() - start) / 60
    assert proc.returncode == 0, f"the README block failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for line in expected:
        assert line_pattern(line).search(proc.stdout), f"the README shows {line!r}, the block did not print it:\n" \
                                                       f"{proc.stdout[-4000:]}"
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr  # redirected: plain progress lines, no bars
    for path in ("demo/results/metrics.json", "demo/results/panels.png",
                 "demo/segment/BraTS2021_00013_anomaly_map.nii.gz", "demo/segment/BraTS2021_00013_anomaly_mask.nii.gz",
                 "demo/segment/BraTS2021_00013_overlay.png"):
        assert (work / path).is_file(), path
    print(f"README block: {minutes:.1f} min")
