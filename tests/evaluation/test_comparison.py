"""The comparison command (config/run_comparison.sh, guided_diffusion/evaluation/comparison.py).

End to end at toy scale (the quickstart's data stage on 20 small synthetic volumes, 32 px slices, every model trained
for one step, every method on a 10-step grid), then the same command again, which must reuse everything. The
table, the pixel-label mark and the picture are checked against values read independently from each run's files;
the aggregation over seeds against hand-computed means and sample standard deviations.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.commands import compare
from guided_diffusion.evaluation import comparison as cmp

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "config" / "run_comparison.sh"

TOY_ENV = {
    # the quickstart's data stage, as tests/commands/test_quickstart.py shrinks it (32 px: the classifier's smallest size)
    "SUBJECTS": "20", "SYNTH_SHAPE": "40 40 24", "IMAGE_SIZE": "32", "WORKERS": "1",
    # the comparison
    "CHANNEL_MULT": "1,2", "ATTENTION_RESOLUTIONS": "8", "TRAIN_STEPS": "1", "TRAIN_BATCH": "4",
    "PREVIEW_STEPS": "0", "RESPACING": "ddim10",
    "FORWARD_STEPS": "3", "ANODDPM_GAUSSIAN_STEPS": "3", "ANODDPM_SIMPLEX_STEPS": "2", "CLF_STEPS": "2",
    "DDIB_STEPS": "3", "EVAL_BATCH": "8", "TEST_BATCHES": "1", "VAL_BATCHES": "2", "NUM_SLICES": "3",
}
# what each method is (the paper's Table 1): the baselines' thresholds are tuned with pixel labels, AnoFPDM's are not
PIXEL_LABELS = {"anoddpm_gaussian": True, "anoddpm_simplex": True, "clf_guided": True, "ddib": True, "anofpdm": False}
LABELS = {"anoddpm_gaussian": "AnoDDPM (G)", "anoddpm_simplex": "AnoDDPM (S)", "clf_guided": "DDIM clf",
          "ddib": "DDIM clf-free (DDIB)", "anofpdm": "AnoFPDM (DDIM)"}


def _run(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT_DIR=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", **TOY_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd="/", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"comparison failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _csv_rows(path: Path) -> dict:
    with open(path, newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def _slice_files(folder: Path) -> list:
    with open(folder / "per_slice.csv", newline="") as f:
        files = list(dict.fromkeys(r["file"] for r in csv.DictReader(f)))
    out = []
    for name in files:
        with np.load(folder / "batches" / name) as z:
            out += list(z["slice_file"])
    return out


def _last_completion(log: Path) -> str:
    return [ln for ln in log.read_text().splitlines() if "evaluation complete" in ln][-1]


def test_comparison_end_to_end_and_rerun(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "cmp"
    first = _run(out)
    assert "data stage" in first.stderr and len(list((out / "raw").glob("BraTS2021_*"))) == 20

    # every row, with the values of its own metrics.json
    rows = _csv_rows(out / "comparison.csv")
    assert list(rows) == list(LABELS)  # the paper's order
    md = (out / "comparison.md").read_text()
    for method, row in rows.items():
        metrics = json.loads((out / "seed0" / "eval" / method / "metrics.json").read_text())
        assert metrics["method"] == ("anoddpm" if method.startswith("anoddpm") else method)
        for setup in ("mixed", "unhealthy"):
            for m in ("dice", "iou", "auprc"):
                assert float(row[f"{setup}_{m}_mean"]) == pytest.approx(metrics[setup][m], rel=1e-12), (method, setup, m)
                assert row[f"{setup}_{m}_sd"] == ""  # one seed: no sd
            assert row[f"{setup}_slices"] == str(metrics[setup]["n_slices"])
        # the pixel-label mark: what the method is, and what its metrics.json says
        assert metrics["pixel_labels_used"] is PIXEL_LABELS[method]
        assert row["pixel_labels_used"] == str(PIXEL_LABELS[method]) and row["label"] == LABELS[method]
        cells = [f"{100 * metrics[s][m]:.1f}" for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc")]
        mark = "✓" if PIXEL_LABELS[method] else "✗"
        assert f"| {LABELS[method]} | {mark} | " + " | ".join(cells) + " |" in md
        assert row["seeds"] == "1"
    # the same test slices for every method (read from the batch files), one batch of 8
    slices = {m: _slice_files(out / "seed0" / "eval" / m) for m in LABELS}
    assert all(s == slices["anofpdm"] for s in slices.values()) and len(slices["anofpdm"]) == 8
    # DDIB read AnoFPDM's model; the classifier-guided run its classifier
    ddib = json.loads((out / "seed0" / "eval" / "ddib" / "metrics.json").read_text())
    assert ddib["checkpoint"] == str(out / "seed0" / "models" / "anofpdm" / "ema_0.995_000001.pt")
    clf = json.loads((out / "seed0" / "eval" / "clf_guided" / "metrics.json").read_text())
    assert str(out / "seed0" / "models" / "classifier" / "model000001.pt") in clf["checkpoints"]

    # the picture: input, ground truth and one column per method; per slice a map row and a mask row
    with Image.open(out / "comparison.png") as img:
        width, height = img.size
    tile = 32 * 5  # 32 px slices enlarged to at least 140 px
    assert width == (2 + 5) * tile
    assert height == 18 + 3 * (2 * tile + 3)  # header, then 3 slices (NUM_SLICES)
    assert "comparison.png (7 columns" in md
    printed = first.stdout
    assert "Comparison on" in printed and f"| {LABELS['anofpdm']} | ✗ |" in printed

    # the same command again: nothing is trained or computed again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "seed0" / "models").glob("*/model000001.pt")}
    assert len(stamps) == 5
    second = _run(out)
    assert "(complete, reused)" in second.stderr and "20 subjects" not in second.stderr + second.stdout
    assert second.stderr.count("final checkpoint found, reused") == 5
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for method in LABELS:
        line = _last_completion(out / "seed0" / "eval" / method / "log.txt")
        assert "{'val': 0, 'test': 0} computed, {'val': 2, 'test': 1} reused" in line, (method, line)
    assert _csv_rows(out / "comparison.csv") == rows


# ---- the table over seeds, the picture's slices, collected runs (no training) ----


def _fake_run(folder: Path, method: str, values: dict, pixel: bool, slices: list, labels: list) -> Path:
    """A finished evaluation folder: metrics.json, per_slice.csv and one test batch file."""
    folder.mkdir(parents=True)
    metrics = {"method": method, "pixel_labels_used": pixel, "accuracy": 0.5, "settings": {"w": 2.0},
               "hyperparams": {"threshold": 0.25}}
    for setup in ("mixed", "unhealthy"):
        metrics[setup] = {m: values.get((setup, m)) for m in ("dice", "iou", "auprc")}
        metrics[setup]["n_slices"] = len(labels) if setup == "mixed" else sum(labels)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    n, size = len(slices), 8
    gt = np.zeros((n, 1, size, size), bool)
    for i, lab in enumerate(labels):
        gt[i, 0, : 2 + i, :2] = bool(lab)
    (folder / "batches").mkdir()
    np.savez(folder / "batches" / "test_ws1_r0_b00000.npz", slice_file=np.array(slices), gt=gt, label=np.array(labels),
             panel_input=np.zeros((n, 1, size, size), np.float16), anomaly_map_0=np.random.rand(n, 1, size, size),
             mask_0=gt.copy())
    with open(folder / "per_slice.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "index", "label", "gt_pixels"])
        for i, lab in enumerate(labels):
            w.writerow(["test_ws1_r0_b00000.npz", i, lab, int(gt[i].sum())])
    return folder


SLICES = [f"patient_{p}/slice_{z}.npz" for p, z in ((1, 3), (1, 4), (2, 7), (2, 8))]


def test_mean_and_sd_over_seeds_and_the_mark(tmp_path):
    a = _fake_run(tmp_path / "a0", "anoddpm", {("unhealthy", "dice"): 0.5, ("mixed", "dice"): 0.8}, True, SLICES,
                  [1, 1, 0, 0])
    b = _fake_run(tmp_path / "a1", "anoddpm", {("unhealthy", "dice"): 0.7, ("mixed", "dice"): 0.9,
                                                ("unhealthy", "auprc"): 0.4}, True, SLICES, [1, 1, 0, 0])
    f = _fake_run(tmp_path / "f0", "anofpdm", {("unhealthy", "dice"): 0.6}, False, SLICES, [1, 1, 0, 0])
    runs = {"anoddpm_simplex": [cmp.Run.read("anoddpm_simplex", a), cmp.Run.read("anoddpm_simplex", b)],
            "anofpdm": [cmp.Run.read("anofpdm", f)]}
    rows = {r["method"]: r for r in cmp.table_rows(runs)}
    r = rows["anoddpm_simplex"]
    assert r["unhealthy_dice_mean"] == pytest.approx(0.6) and r["unhealthy_dice_sd"] == pytest.approx(0.02 ** 0.5)
    assert r["mixed_dice_mean"] == pytest.approx(0.85) and r["mixed_dice_sd"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert r["unhealthy_auprc_mean"] == pytest.approx(0.4) and r["unhealthy_auprc_sd"] is None  # one value
    assert r["mixed_iou_mean"] is None and r["seeds"] == 2 and r["pixel_labels_used"] is True
    assert rows["anofpdm"]["pixel_labels_used"] is False and rows["anofpdm"]["unhealthy_dice_sd"] is None
    table = cmp.format_table(list(rows.values()))
    assert "| AnoDDPM (S) | ✓ | 85.0 ± 7.1 | n/a | n/a | 60.0 ± 14.1 | n/a | 40.0 |" in table
    assert "| AnoFPDM (DDIM) | ✗ | n/a | n/a | n/a | 60.0 | n/a | n/a |" in table
    # runs of one method that disagree on the mark are an error
    c = _fake_run(tmp_path / "a2", "anoddpm", {}, False, SLICES, [1, 1, 0, 0])
    with pytest.raises(ValueError, match="pixel_labels_used differs"):
        cmp.table_rows({"anoddpm_simplex": [cmp.Run.read("x", a), cmp.Run.read("x", c)]})


def test_from_runs_writes_the_table_and_picture_and_refuses_different_slices(tmp_path):
    a = _fake_run(tmp_path / "ddib", "ddib", {("unhealthy", "dice"): 0.25}, True, SLICES, [1, 1, 0, 0])
    f = _fake_run(tmp_path / "fpdm", "anofpdm", {("unhealthy", "dice"): 0.5}, False, SLICES, [1, 1, 0, 0])
    out = tmp_path / "out"
    assert compare.main(["--output", str(out), "--num_slices", "3", "--from_runs", f"anofpdm={f}", f"ddib={a}"]) == 0
    rows = _csv_rows(out / "comparison.csv")
    assert list(rows) == ["ddib", "anofpdm"]  # the paper's order, whatever the command line's
    assert float(rows["ddib"]["unhealthy_dice_mean"]) == 0.25 and rows["ddib"]["pixel_labels_used"] == "True"
    with Image.open(out / "comparison.png") as img:
        assert img.size == ((2 + 2) * 8 * 18, 18 + 3 * (2 * 8 * 18 + 3))  # 8 px tiles enlarged 18x to >= 140 px
    # a run on other slices cannot share a table
    g = _fake_run(tmp_path / "other", "anofpdm", {}, False, SLICES[::-1], [0, 0, 1, 1])
    with pytest.raises(SystemExit) as exc:  # a user error: one message, exit code 2
        compare.main(["--output", str(out), "--from_runs", f"anofpdm={g}", f"ddib={a}"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="did not evaluate the same test slices"):
        cmp.check_same_slices({"anofpdm": [cmp.Run.read("anofpdm", g)], "ddib": [cmp.Run.read("ddib", a)]})
    with pytest.raises(ValueError, match="cannot read .*metrics.json"):
        cmp.Run.read("ddib", tmp_path / "missing")


def test_picked_slices_are_large_lesions_then_healthy_ones():
    rows = [{"label": lab, "gt_pixels": str(px)} for lab, px in
            [("1", 5), ("0", 0), ("1", 50), ("1", 20), ("0", 0), ("1", 40), ("1", 1), ("1", 30), ("0", 0)]]
    # unhealthy by size: 50 (row 2), 40 (5), 30 (7), 20 (3), 5 (0), 1 (6); the larger half is rows 2, 5, 7
    assert cmp.pick_slices(rows, 6) == [2, 5, 7, 3, 1, 4]  # four unhealthy (more than the larger half), two healthy
    assert cmp.pick_slices(rows, 3) == [2, 7, 1]  # two unhealthy spread over the larger half, one healthy
    assert cmp.pick_slices(rows, 0) == []


def test_bad_flags_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--output", str(tmp_path), "--data_dir", str(tmp_path / "nowhere")])
    assert "has no npy_test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--output", str(tmp_path), "--seeds", "1", "1"])
    assert "distinct" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        compare.main(["--output", str(tmp_path), "--from_runs", "anofpdm"])
    assert exc.value.code == 2 and "METHOD=DIR" in capsys.readouterr().err


def test_plan_for_one_channel_atlas_data(tmp_path):
    """Without running anything: every stage is a command over its ATLAS preset, with the small sizes appended, and
    builds the settings it says (parsed here as the command would)."""
    from guided_diffusion.commands import evaluate, train, train_classifier

    for split in ("train", "test"):
        (tmp_path / "data" / f"npy_{split}" / "patient_1").mkdir(parents=True)
        np.savez(tmp_path / "data" / f"npy_{split}" / "patient_1" / "slice_5.npz", x=np.zeros((1, 1, 32, 32)),
                 y=np.zeros((1, 1, 32, 32), np.float32))
    out = tmp_path / "out"
    s = compare.build(compare.CompareSettings, compare.create_parser().parse_args(
        ["--name", "atlas", "--seeds", "3", "--methods", "clf_guided", "anofpdm", "--train_steps", "40"]))
    plan = compare.make_plan(s, str(tmp_path / "data"), out)
    assert [st.name for st in plan.stages] == ["train anofpdm", "train clf_guided", "train classifier",
                                               "evaluate clf_guided", "evaluate anofpdm"]
    stages = {st.name: st for st in plan.stages}
    for st in plan.stages:
        assert option(st.argv, "--preset").startswith("atlas-") and option(st.argv, "--seed") == "3"
    fpdm_train = train.parse(stages["train anofpdm"].argv)[0]
    assert fpdm_train.output == str(out / "seed3" / "models" / "anofpdm")
    assert (fpdm_train.model.image_size, fpdm_train.model.in_channels, fpdm_train.model.num_channels) == (32, 1, 32)
    assert (fpdm_train.loop.batch_size, fpdm_train.loop.max_steps, fpdm_train.loop.resume_checkpoint) == (16, 40,
                                                                                                          "auto")
    assert fpdm_train.training.w == [30.0] and fpdm_train.image_dir == str(out / "seed3" / "models" / "anofpdm" /
                                                                              "images")
    clf = train_classifier.parse(stages["train classifier"].argv)[0]
    assert (clf.training.iterations, clf.classifier.classifier_width, clf.classifier.in_channels) == (40, 32, 1)
    ev = stages["evaluate clf_guided"].argv
    assert option(ev, "--model_dir") == str(out / "seed3" / "models" / "clf_guided")
    assert option(ev, "--clf_dir") == str(out / "seed3" / "models" / "classifier") and option(ev, "--clf_num") == "40"
    assert option(ev, "--sample_steps") == "10" and "--classifier_scale" not in ev  # ATLAS's s, from the preset
    assert option(ev, "--modality") == "0" and option(ev, "--timestep_respacing") == "ddim50"
    fp = stages["evaluate anofpdm"].argv
    assert option(fp, "--forward_steps") == "15" and option(fp, "--model_num") == "40" and "--w" not in fp
    values = vars(evaluate.create_parser("anofpdm", compare_preset("atlas-anofpdm-v2")).parse_args(fp[2:]))
    assert values["w"] == 30.0 and values["num_batches"] == -1  # ATLAS's w


def compare_preset(name: str) -> dict:
    from guided_diffusion import presets

    return presets.values_for(name, "evaluate")


def option(argv: list, flag: str) -> str:
    return argv[argv.index(flag) + 1]


def last(argv: list, flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]
