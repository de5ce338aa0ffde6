"""The one-command quickstart (config/run_quickstart.sh) end to end at toy scale, and its report helper.

The toy run shrinks every stage through the script's variables (20 small synthetic volumes, 16 px slices, two
training steps, three forward steps), then runs the same command again to check that it resumes: training is
skipped and the translation reuses its finished batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion.commands.quickstart import final_checkpoint_exists, format_report, read_metrics

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "config" / "run_quickstart.sh"

TOY_ENV = {
    "SUBJECTS": "20",  # the smallest count whose 75/5/20 split has a validation subject
    "SYNTH_SHAPE": "40 40 24",
    "IMAGE_SIZE": "16",
    "CHANNEL_MULT": "1,2",
    "ATTENTION": "8",
    "TRAIN_STEPS": "2",
    "TRAIN_BATCH": "4",
    "RESPACING": "ddim10",
    "FORWARD_STEPS": "3",
    "EVAL_BATCH": "8",
    "VAL_BATCHES": "2",
    "TEST_BATCHES": "1",
    "NUM_PANELS": "2",
    "WORKERS": "1",
    "EVAL_PROCS": "1",
    "INSTALL": "never",
}


def _run(out_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT_DIR=str(out_dir), PYTHON=sys.executable, OMP_NUM_THREADS="1", **TOY_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd="/", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"quickstart failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_quickstart_end_to_end_and_resume(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "qs"
    first = _run(out)

    # every stage wrote its outputs under OUT_DIR
    assert len(list((out / "raw").glob("BraTS2021_*"))) == 20
    for split in ("train", "val", "test"):
        assert any((out / "data" / f"npy_{split}").iterdir()), split
    assert final_checkpoint_exists(str(out / "model"), 2, "0.995")
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    for setup in ("mixed", "unhealthy"):
        assert {"dice", "iou", "auprc"} <= set(metrics[setup])
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["settings"]["forward_steps"] == 3 and metrics["settings"]["modality"] == [0, 3]
    # the quickstart's own post-processing defaults reach the method (not the driver's upstream 5 / 0.90 / 0.98)
    settings = metrics["settings"]
    assert (settings["median_kernel"], settings["quantile_a"], settings["quantile_b"]) == (3, 0.93, 0.99)
    assert metrics["checkpoint"].endswith("ema_0.995_000002.pt")
    assert (out / "results" / "panels.png").stat().st_size > 0
    # the closing block is printed with the numbers of metrics.json
    assert "AnoFPDM quickstart" in first.stdout
    assert f"{100 * metrics['accuracy']:.1f} %" in first.stdout

    # a second call resumes: nothing is regenerated or retrained, test batches are reused
    model_mtime = (out / "model" / "model000002.pt").stat().st_mtime
    second = _run(out)
    assert "20 subjects already in" in second.stdout + second.stderr
    assert "checkpoint found" in second.stderr and "skipped" in second.stderr
    assert (out / "model" / "model000002.pt").stat().st_mtime == model_mtime
    log = (out / "results" / "log.txt").read_text()
    assert "'test': 1} reused" in log
    assert json.loads((out / "results" / "metrics.json").read_text())["unhealthy"] == metrics["unhealthy"]


def test_report_formatting_and_stage_checks(tmp_path):
    metrics = {
        "mixed": {"dice": 0.5, "iou": 0.25, "auprc": None, "n_slices": 64},
        "unhealthy": {"dice": 0.625, "iou": 0.4, "auprc": 0.75, "n_slices": 20},
        "accuracy": 0.875,
        "checkpoint": "/x/ema_0.995_001500.pt",
        "settings": {"w": 2.0, "forward_steps": 60, "modality": [0, 3]},
    }
    text = format_report(metrics, str(tmp_path), seconds=90)
    assert "mixed         50.0    25.0      n/a  64" in text
    assert "unhealthy     62.5    40.0     75.0  20" in text
    assert "accuracy 87.5 %" in text and "ema_0.995_001500.pt" in text and "1.5 min" in text
    assert "pictures" not in text  # no panels.png yet

    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "panels.png").write_bytes(b"png")
    assert "pictures:" in format_report(read_metrics(str(tmp_path)), str(tmp_path))
    from guided_diffusion.errors import UserError

    with pytest.raises(UserError, match="cannot read"):
        read_metrics(str(tmp_path / "missing"))

    torch.save({"w": torch.zeros(2)}, tmp_path / "model000010.pt")
    assert not final_checkpoint_exists(str(tmp_path), 10, "0.995")
    (tmp_path / "ema_0.995_000010.pt").write_bytes(b"PK\x03\x04 truncated")  # a killed copy: not finished
    assert not final_checkpoint_exists(str(tmp_path), 10, "0.995")
    torch.save({"w": torch.zeros(2)}, tmp_path / "ema_0.995_000010.pt")
    assert final_checkpoint_exists(str(tmp_path), 10, "0.995")


def test_training_length_and_ema_rate_come_from_the_preset_unless_given():
    from guided_diffusion import presets
    from guided_diffusion.commands.quickstart import QuickstartSettings, with_preset_training

    train = presets.get("quickstart").for_command("train")
    s = with_preset_training(QuickstartSettings())
    assert (s.train_steps, s.ema_rate) == (train["max_steps"], train["ema_rate"])
    given = with_preset_training(QuickstartSettings(train_steps=7, ema_rate="0.9"))
    assert (given.train_steps, given.ema_rate) == (7, "0.9")
