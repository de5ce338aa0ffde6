"""bench/gpu_check.sh: the plan (dry run) fits the time budget, and a CPU smoke run of every stage writes the file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=600)


def test_plan_covers_every_variant_and_the_loop_within_ten_minutes(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = _run(str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    stages = re.findall(r"^\[(\w+)\] limit (\d+) s: (.*)$", proc.stdout, flags=re.M)
    names = [s[0] for s in stages]
    assert names == ["info", "cuda_tests", "memory_hae_v2_conservative", "memory_hae_v2", "memory_v2",
                     "memory_hae_lite", "memory_hae", "anofpdm_loop", "table"]
    assert sum(int(s[1]) for s in stages) <= 570  # one device session call is limited to 600 s
    commands = dict((s[0], s[2]) for s in stages)
    assert "pytest -q -m cuda" in commands["cuda_tests"]
    for fused in ("memory_hae_v2_conservative", "memory_v2"):
        bench = commands[fused]
        assert "--budget-gib 70" in bench and "--translation-batch 64" in bench and "fp32\\,bf16" in bench
    # the upstream-style attention materialises 8 x 4416^2 matrices: one repeat, a smaller translation batch,
    # and the largest-batch search only for hae_v2 (Conservative's yardstick)
    assert "--repeats 1" in commands["memory_hae_v2"] and "--budget-gib 70" in commands["memory_hae_v2"]
    assert "--translation-batch 16" in commands["memory_hae"] and "--budget-gib" not in commands["memory_hae"]
    loop = commands["anofpdm_loop"]
    assert "bench/translation_loop.py" in loop and "hae_v2_conservative\\,v2" in loop and "--batch 64" in loop
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_largest_batch_search_on_a_known_memory_line():
    """memory_speed.largest_batch_under: the exact answer in a handful of steps, whether the line from batches 1 and
    2 predicts it too high or too low."""
    sys.path.insert(0, str(REPO / "bench"))
    from memory_speed import largest_batch_under

    for base, per_sample, extra, budget in ((10.0, 3.0, 0.0, 100.0), (10.0, 3.0, 0.05, 100.0),
                                            (10.0, 3.0, -0.005, 100.0), (5.0, 1.0, 0.0, 4.0), (5.0, 1.0, 0.0, 6.5)):
        calls = []

        def peak(n):  # weights + activations, slightly convex or concave with `extra`
            calls.append(n)
            return base + per_sample * n + extra * n * n

        expected = max([0] + [n for n in range(1, 200) if base + per_sample * n + extra * n * n <= budget])
        assert largest_batch_under(budget, peak) == expected, (base, per_sample, extra, budget)
        assert len(calls) <= 12


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
    for stage in ("info", "cuda_tests", "memory_v2", "anofpdm_loop", "table"):
        assert re.search(rf"^\| {stage} \| ok \| \d+ \|$", text, flags=re.M), stage
    assert "| torch " in text and "skipped" in text  # versions and the CUDA tests' summary
    row = next(line for line in text.splitlines() if line.startswith("| v2 | fused |"))
    assert float(row.split("|")[-2].split()[0]) > 0  # translation slices per second
    loop = next(line for line in text.splitlines() if line.startswith("| v2 | fp32 | default |"))
    assert float(loop.split("|")[-2]) > 0  # the AnoFPDM loop: slice-steps per second
