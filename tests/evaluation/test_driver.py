"""The one evaluation driver with every method: outputs, the pixel-label marker, the content-keyed cache, entry points."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.commands import evaluate
from guided_diffusion.script_util import classifier_defaults, create_classifier, create_model_and_diffusion, \
    model_and_diffusion_defaults
from test_translation import SIZE, _tiny_flags, _write_checkpoint, _write_dataset

REPO = Path(__file__).resolve().parents[2]
V1 = (f"--image_size {SIZE} --num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1,2 --attention_resolutions 16,8 "
      "--in_channels 4 --unet_ver v1").split()
CLF = ("--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 --out_channels 2").split()
COMMON = "--batch_size 4 --num_batches -1 --batch_size_val 4 --num_batches_val -1 --modality 0 3 --progress False"




def _save_random(model, path):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("driver")
    _write_dataset(root / "data")
    _write_checkpoint(root / "model_v2", "v2")
    kw = {**model_and_diffusion_defaults(), "image_size": SIZE, "num_channels": 32, "num_res_blocks": 1,
          "channel_mult": "1,1,1,2", "attention_resolutions": "16,8", "in_channels": 4, "unet_ver": "v1"}
    _save_random(create_model_and_diffusion(**{**kw, "num_classes": 0, "class_cond": False})[0],
                 root / "anoddpm" / "model000005.pt")
    _save_random(create_model_and_diffusion(**{**kw, "num_classes": 2, "class_cond": True, "clf_free": False,
                                               "learn_sigma": True})[0], root / "guided" / "ema_0.9999_000005.pt")
    flags = {**classifier_defaults(), "image_size": SIZE, "in_channels": 4, "classifier_width": 32,
             "classifier_depth": 1, "classifier_attention_resolutions": "8"}
    _save_random(create_classifier(**flags), root / "clf" / "model000003.pt")
    return root


def _argv(ws, method):
    data = f"--data_dir {ws / 'data'} ".split()
    if method == "anoddpm":
        return data + f"--model_dir {ws / 'anoddpm'} --sample_steps 3 --noise_type simplex".split() + V1 + ["--num_classes", "0"]
    if method == "clf_guided":
        return (data + f"--model_dir {ws / 'guided'} --clf_dir {ws / 'clf'} --sample_steps 3 --classifier_scale 50"
                .split() + V1 + ["--num_classes", "2"] + CLF)
    if method == "ddib":
        return data + f"--model_dir {ws / 'model_v2'} --ema True --sample_steps 3 --w 1.1".split() + _tiny_flags("v2")
    return data + f"--model_dir {ws / 'model_v2'} --ema True --w 2 --forward_steps 2".split() + _tiny_flags("v2")


def _run(ws, log_dir, monkeypatch, method, extra="", entry=None):
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    argv = _argv(ws, method) + COMMON.split() + extra.split()
    if entry is None:
        argv += ["--method", method]
    return evaluate.main(argv, method=entry)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["anoddpm", "clf_guided", "ddib"])
def test_each_baseline_end_to_end_through_the_driver(ws, tmp_path, monkeypatch, method):
    log_dir = tmp_path / "logs"
    summary = _run(ws, log_dir, monkeypatch, method, extra="--save_data True --num_panels 3", entry=method)
    assert summary["computed"] == {"val": 2, "test": 2} and summary["method"] == method
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["pixel_labels_used"] is True
    assert metrics["mixed"]["n_slices"] == 8 and metrics["unhealthy"]["n_slices"] == 4
    hyper = json.loads((log_dir / "hyperparams.json").read_text())
    assert hyper["pixel_labels_used"] is True and 0.01 <= hyper["threshold"] <= 0.69 and hyper["n_val"] == 8
    assert metrics["hyperparams"]["threshold"] == hyper["threshold"]
    assert metrics["settings"]["sample_steps"] == 3 and metrics["settings"]["world_size"] == 1
    rows = _csv(log_dir / "metrics.csv")
    assert [r["setup"] for r in rows] == ["mixed", "unhealthy"]
    assert all(r["method"] == method and r["pixel_labels_used"] == "True" for r in rows)
    assert float(rows[1]["dice"]) == pytest.approx(metrics["unhealthy"]["dice"])
    per_slice = _csv(log_dir / "per_slice.csv")
    assert len(per_slice) == 8 and all(float(r["threshold"]) == pytest.approx(hyper["threshold"]) for r in per_slice)
    # the mask is the thresholded map: the slice label is "any pixel above the threshold" (before the filter)
    with np.load(log_dir / "per_slice_arrays.npz") as arrays:
        above = (arrays["anomaly_map"] >= np.float32(hyper["threshold"])).reshape(8, -1).any(1)
        assert np.array_equal(arrays["pred_label"], above.astype(np.int64))
        assert arrays["reconstruction"].shape == (8, 4, SIZE, SIZE)
        assert not (arrays["pred_mask_all"] & (arrays["anomaly_map"] < np.float32(hyper["threshold"]))).any()
    assert (log_dir / "panels.png").read_bytes()[:4] == b"\x89PNG"


def test_anofpdm_outputs_say_no_pixel_labels(ws, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs"
    _run(ws, log_dir, monkeypatch, "anofpdm")
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["method"] == "anofpdm" and metrics["pixel_labels_used"] is False
    assert json.loads((log_dir / "hyperparams.json").read_text())["pixel_labels_used"] is False
    assert all(r["pixel_labels_used"] == "False" for r in _csv(log_dir / "metrics.csv"))
    # AnoFPDM's validation files hold no pixel labels at all
    for f in (log_dir / "batches").glob("val_*.npz"):
        with np.load(f) as z:
            assert "gt" not in z.files


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_cache_is_reused_and_keyed_by_content(ws, tmp_path, monkeypatch):
    data, model_dir = tmp_path / "data", tmp_path / "model"
    _copy_tree(ws / "data", data)
    _copy_tree(ws / "anoddpm", model_dir)
    ckpt = model_dir / "model000005.pt"
    state = torch.load(ckpt, weights_only=True)
    torch.save(dict(state), ckpt)  # the replacement below is saved the same way, so it has the same size
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "logs"))

    def run():
        argv = (f"--data_dir {data} --model_dir {model_dir} --sample_steps 3 --use_ddpm False".split() + V1
                + ["--num_classes", "0"] + COMMON.split() + ["--num_panels", "0"])
        return evaluate.main(argv, method="anoddpm")

    first = run()
    assert first["computed"] == {"val": 2, "test": 2}
    again = run()
    assert again["computed"] == {"val": 0, "test": 0} and again["reused"] == {"val": 2, "test": 2}
    assert again["metrics"]["mixed"] == first["metrics"]["mixed"]

    # a test slice regenerated in place: same name, same size, the modification time set back
    f = sorted((data / "npy_test").glob("*/slice_*.npz"))[0]
    st = os.stat(f)
    with np.load(f) as z:
        x, y = z["x"].copy(), z["y"].copy()
    x[..., 8:16, 8:16] = x.max()  # a bright square the model has never seen there
    np.savez_compressed(f, x=x, y=y)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = run()
    assert changed["computed"] == {"val": 0, "test": 2}  # every test batch (the split's manifest changed)
    assert changed["metrics"]["mixed"]["auprc"] != first["metrics"]["mixed"]["auprc"]

    # the checkpoint replaced by another of the same size and modification time
    st = os.stat(ckpt)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, ckpt)
    assert os.stat(ckpt).st_size == st.st_size
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    replaced = run()
    assert replaced["computed"] == {"val": 2, "test": 2}


def test_baseline_without_validation_needs_a_threshold(ws, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:  # a user error: one message, exit code 2
        _run(ws, tmp_path / "a", monkeypatch, "anoddpm", extra="--num_batches_val 0")
    assert exc.value.code == 2 and re.search("--opt_thr T or --hyperparams_file.*0.08", capsys.readouterr().err)
    out = _run(ws, tmp_path / "b", monkeypatch, "anoddpm", extra="--num_batches_val 0 --opt_thr 0.3 --num_panels 0")
    assert out["computed"] == {"val": 0, "test": 2} and out["hyperparams"]["threshold"] == 0.3
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"threshold": 0.2}))
    out = _run(ws, tmp_path / "c", monkeypatch, "anoddpm", extra=f"--num_batches_val 0 --hyperparams_file {hp}")
    assert out["hyperparams"]["source"] == f"file {hp}" and out["hyperparams"]["threshold"] == 0.2


@pytest.mark.parametrize("method, extra, message", [
    ("clf_guided", "--clf_dir /nonexistent", "--clf_dir '/nonexistent' is not a folder"),
    ("ddib", "--num_classes 0", "ddib needs the classifier-free guided model: --num_classes"),
    ("ddib", "--w -1", "--w -1"),
    ("anoddpm", "--sample_steps 1001", "--sample_steps must lie in"),
    ("anoddpm", "--noise_type perlin", "--noise_type: invalid choice: 'perlin'"),
    ("anoddpm", "--num_classes 2 --clf_free False", "reconstructs unconditionally"),
    ("anoddpm", "--threshold_grid 0.1,0.05,0.01", "threshold grid"),
])
def test_method_flags_are_checked_before_any_model_is_built(ws, tmp_path, monkeypatch, capsys, method, extra, message):
    with pytest.raises(SystemExit) as exc:
        _run(ws, tmp_path / "logs", monkeypatch, method, extra=extra, entry=method)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_entry_points_fix_the_method_and_its_defaults(ws, tmp_path, monkeypatch, capsys):
    args = evaluate.create_parser("clf_guided").parse_args([])
    assert (args.method, args.unet_ver, args.clf_free, args.learn_sigma, args.ema) == ("clf_guided", "v1", False,
                                                                                          True, True)
    assert evaluate.create_parser("anoddpm").parse_args([]).num_classes == 0
    assert evaluate.create_parser().parse_args([]).method == "anofpdm"
    with pytest.raises(SystemExit):
        _run(ws, tmp_path / "logs", monkeypatch, "ddib", extra="--method anoddpm", entry="ddib")
    assert "--method: invalid choice: 'anoddpm' (choose from 'ddib')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--method", "nope"])


def test_upstream_named_script_runs_anoddpm(ws, tmp_path):
    log_dir = tmp_path / "logs"
    env = {**os.environ, "OPENAI_LOGDIR": str(log_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = _argv(ws, "anoddpm") + COMMON.split() + ["--num_batches", "1", "--num_batches_val", "1", "--num_panels", "0"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "translation_HEALTHY.py")] + argv, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["method"] == "anoddpm" and metrics["settings"]["noise_type"] == "simplex"


@pytest.mark.slow
def test_two_processes_give_the_one_process_results_with_simplex_ddpm_noise(ws, tmp_path, monkeypatch):
    """torchrun with 2 CPU processes: the global batches' noise (start and every DDPM step, simplex) is dealt out with
    the slices, and the validation records are put back in the one-process order, so the threshold and every map
    are the same as with one process."""
    import shutil
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = _argv(ws, "anoddpm") + COMMON.split() + ["--num_panels", "0", "--save_data", "True"]
    log_ddp = tmp_path / "ddp"
    env = {**os.environ, "OPENAI_LOGDIR": str(log_ddp), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc-per-node", "2", "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                      f"127.0.0.1:{port}", str(REPO / "scripts" / "translation_HEALTHY.py")]
    proc = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "one"))
    evaluate.main(flags, method="anoddpm")
    two = json.loads((log_ddp / "hyperparams.json").read_text())
    one = json.loads((tmp_path / "one" / "hyperparams.json").read_text())
    assert two["threshold"] == one["threshold"] and two["val_dice_by_threshold"] == one["val_dice_by_threshold"]
    with np.load(log_ddp / "per_slice_arrays.npz") as a, np.load(tmp_path / "one" / "per_slice_arrays.npz") as b:
        index = {row.tobytes(): i for i, row in enumerate(b["source"].reshape(8, -1))}
        order = [index[row.tobytes()] for row in a["source"].reshape(8, -1)]
        assert sorted(order) == list(range(8))
        np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"][order], rtol=1e-5, atol=1e-7)
        assert np.array_equal(a["pred_mask_all"], b["pred_mask_all"][order])
