"""bench/gpu_check.sh: the plan (dry run) fits the time budget, and a CPU smoke run of every stage writes the file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=600)


def test_plan_covers_every_variant_within_eight_minutes(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = _run(str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    stages = re.findall(r"^\[(\w+)\] limit (\d+) s: (.*)$", proc.stdout, flags=re.M)
    names = [s[0] for s in stages]
    assert names == ["info", "cuda_tests", "memory_hae_v2_conservative", "memory_hae_v2", "memory_v2",
                     "memory_hae_lite", "memory_hae", "table"]
    assert sum(int(s[1]) for s in stages) <= 8 * 60
    commands = dict((s[0], s[2]) for s in stages)
    assert "pytest -q -m cuda" in commands["cuda_tests"]
    bench = commands["memory_hae_v2"]
    assert "--budget-gib 70" in bench and "--translation-batch 64" in bench and "fp32\\,bf16" in bench
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_without_cuda_the_gpu_mode_says_so(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = _run(str(tmp_path / "out"))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--smoke" in proc.stderr


@pytest.mark.slow
def test_cpu_smoke_run_writes_the_results_file(tmp_path):
    proc = _run(str(tmp_path / "out"), "--smoke", SMOKE_VARIANTS="v2", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    for stage in ("info", "cuda_tests", "memory_v2", "table"):
        assert re.search(rf"^\| {stage} \| ok \| \d+ \|$", text, flags=re.M), stage
    assert "| torch " in text and "skipped" in text  # versions and the CUDA tests' summary
    row = next(line for line in text.splitlines() if line.startswith("| v2 | reference |"))
    assert float(row.split("|")[-2].split()[0]) > 0  # translation slices per second
