"""End-to-end AnoFPDM translation on a tiny random model and a tiny synthetic data set (CPU, seconds)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import fileio
from guided_diffusion.commands import evaluate
from guided_diffusion.methods import base, registry
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from two_processes import free_port

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
TINY = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,1,1,2", attention_resolutions="16,8",
            in_channels=4, class_cond=True, num_classes=2)


def _tiny_flags(unet_ver: str) -> list:
    return (f"--image_size {SIZE} --num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1,2 "
            f"--attention_resolutions 16,8 --in_channels 4 --num_classes 2 --unet_ver {unet_ver} "
            f"--use_hae {unet_ver != 'v2'}").split()


def _write_dataset(root: Path) -> None:
    """Two val and two test patients with 4 slices each; even slices carry a bright blob lesion."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    brain = ((yy - SIZE / 2) ** 2 / (0.4 * SIZE) ** 2 + (xx - SIZE / 2) ** 2 / (0.35 * SIZE) ** 2) < 1
    for split in ("val", "test"):
        for p in range(2):
            d = root / f"npy_{split}" / f"patient_{split}{p}"
            d.mkdir(parents=True)
            for z in range(4):
                x = np.stack([brain * (0.5 + 0.1 * rng.rand(SIZE, SIZE)) for _ in range(4)])
                y = np.zeros((SIZE, SIZE), np.float32)
                if z % 2 == 0:
                    cy, cx = rng.randint(11, 21, 2)
                    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < 16
                    y[blob] = 1.0
                    x[:, blob] += 0.6
                np.savez_compressed(d / f"slice_{z + 3}", x=x[None].astype(np.float64), y=y[None, None])


def _write_checkpoint(model_dir: Path, unet_ver: str, step: int = 10) -> None:
    kw = model_and_diffusion_defaults()
    kw.update(TINY, unet_ver=unet_ver, use_hae=unet_ver != "v2")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**kw)
    with torch.no_grad():  # random weights everywhere (the zero-initialised output layer included)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), model_dir / f"model{step:06d}.pt")
    torch.save(model.state_dict(), model_dir / f"ema_0.9999_{step:06d}.pt")




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation")
    _write_dataset(root / "data")
    _write_checkpoint(root / "model_hae", "hae_v2_conservative")
    _write_checkpoint(root / "model_v2", "v2")
    return root


def _run(workspace: Path, log_dir: Path, unet_ver: str, monkeypatch, extra: str = "", script_ver=None,
         anofpdm: bool = True) -> dict:
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    model_dir = workspace / ("model_v2" if unet_ver == "v2" else "model_hae")
    method = "--w 2 --forward_steps 2 --null True " if anofpdm else ""  # AnoFPDM's own flags
    argv = (f"--data_dir {workspace / 'data'} --model_dir {model_dir} --ema True {method}"
            "--batch_size 3 --num_batches -1 --batch_size_val 4 --num_batches_val -1 "
            "--modality 0 3 --num_panels 4 --progress False").split() + _tiny_flags(unet_ver) + extra.split()
    return evaluate.main(argv, unet_ver=script_ver)


def _assert_metrics(metrics: dict) -> None:
    for setup in ("mixed", "unhealthy"):
        for key in ("dice", "iou", "auprc"):
            v = metrics[setup][key]
            assert v is not None and not math.isnan(v) and 0.0 <= v <= 1.0, (setup, key, v)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_end_to_end_hae_v2_conservative_outputs_and_resume(workspace, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs"
    summary = _run(workspace, log_dir, "hae_v2_conservative", monkeypatch, extra="--save_data True")
    # 8 val slices in batches of 4, 8 test slices in batches of 3 (the last one partial)
    assert summary["computed"] == {"val": 2, "test": 3} and summary["reused"] == {"val": 0, "test": 0}

    metrics = json.loads((log_dir / "metrics.json").read_text())
    _assert_metrics(metrics)
    assert metrics["mixed"]["n_slices"] == 8 and metrics["unhealthy"]["n_slices"] == 4
    hyper = json.loads((log_dir / "hyperparams.json").read_text())
    assert hyper["n_val"] == 8 and hyper["n_val_unhealthy"] == 4
    assert all(d > 0 for d in hyper["diff_max"])
    assert (log_dir / "metrics.csv").read_text().startswith("t_e_ratio,setup,dice,iou,auprc")
    assert len((log_dir / "per_slice.csv").read_text().strip().splitlines()) == 1 + 8
    assert (log_dir / "panels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(log_dir / "per_slice_arrays.npz") as arrays:
        assert arrays["anomaly_map"].shape == (8, 1, SIZE, SIZE)
        assert arrays["source"].shape == (8, 4, SIZE, SIZE)
        assert np.isfinite(arrays["anomaly_map"]).all()
        # the test slices are all different (drawn without replacement)
        flat = arrays["source"].reshape(8, -1)
        assert len({row.tobytes() for row in flat}) == 8
        assert arrays["label"].sum() == 4

    # a rerun reuses everything
    again = _run(workspace, log_dir, "hae_v2_conservative", monkeypatch, extra="--save_data True")
    assert again["computed"] == {"val": 0, "test": 0} and again["reused"] == {"val": 2, "test": 3}
    assert json.loads((log_dir / "metrics.json").read_text())["mixed"] == metrics["mixed"]

    # a lost and a truncated batch file (as if killed) are recomputed, the others are kept
    batch_dir = log_dir / "batches"
    (batch_dir / "test_ws1_r0_b00001.npz").unlink()
    (batch_dir / "test_ws1_r0_b00002.npz").write_bytes(b"PK\x03\x04 truncated")
    third = _run(workspace, log_dir, "hae_v2_conservative", monkeypatch, extra="--save_data True")
    assert third["computed"] == {"val": 0, "test": 2} and third["reused"] == {"val": 2, "test": 1}
    # the same seeds give the same results
    assert json.loads((log_dir / "metrics.json").read_text())["mixed"] == metrics["mixed"]

    # other settings (here the guidance weight) do not reuse stale results
    fourth = _run(workspace, log_dir, "hae_v2_conservative", monkeypatch,
                  extra="--save_data True --w 1 --num_batches 1 --num_batches_val 1")
    assert fourth["computed"] == {"val": 1, "test": 1}


def test_end_to_end_v2_upstream_flags_and_alias(workspace, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs_v2"
    summary = _run(workspace, log_dir, "v2", monkeypatch,
                   extra="--ugp_mode upstream --legacy_ddim_encoding True --d_reverse True --num_batches 1 "
                         "--num_batches_val 1 "
                         "--t_e_ratio 1 2 --last_only True")
    assert summary["computed"]["test"] == 1
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["settings"]["ugp_mode"] == "upstream" and metrics["settings"]["legacy_ddim_encoding"] is True
    assert set(metrics["by_t_e_ratio"]) == {"1.0", "2.0"}
    assert metrics["mixed"]["n_slices"] == 3
    # the hae_v2_conservative alias fixes the variant whatever --unet_ver says
    log_alias = tmp_path / "logs_alias"
    out = _run(workspace, log_alias, "hae_v2_conservative", monkeypatch, script_ver="hae_v2_conservative",
               extra="--num_batches 1 --num_batches_val 1 --d_reverse False --unet_ver v2 --use_hae False")
    assert out["computed"] == {"val": 1, "test": 1}
    assert "hae" in json.loads((log_alias / "metrics.json").read_text())["checkpoint"]


def test_reused_hyperparams_file_and_fallback(workspace, tmp_path, monkeypatch, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"thr_01": 0.9, "diff_max": [0.01, 0.02]}))
    log_dir = tmp_path / "logs_hp"
    out = _run(workspace, log_dir, "v2", monkeypatch,
               extra=f"--num_batches_val 0 --hyperparams_file {hp} --num_batches 1")
    assert out["computed"] == {"val": 0, "test": 1}
    assert out["hyperparams"]["thr_01"] == 0.9
    with pytest.raises(SystemExit) as exc:  # a user error: one message, exit code 2
        _run(workspace, tmp_path / "logs_fb", "v2", monkeypatch, extra="--num_batches_val 0 --num_batches 1")
    assert exc.value.code == 2 and "forward_steps 2" in capsys.readouterr().err


class _ShiftedOracle(base.SliceMethod):
    """Finds the bright lesion blobs from the input (channel 0 above its slice's midrange), then shifts the mask by
    two pixels: partial overlaps, so precision and recall are neither 0 nor 1."""

    name = "shifted_oracle_test"

    @classmethod
    def build(cls, s, device):
        return cls()

    def settings(self):
        return {"method": self.name}

    def validation_batch(self, x, ctx):
        return {}

    def fit(self, records, labels, gt_masks):
        return {}

    def hyperparams_without_validation(self):
        return {}

    def test_batch(self, x, hyper, ctx):
        amap = x[:, :1].float()
        lo, hi = amap.amin((2, 3), keepdim=True), amap.amax((2, 3), keepdim=True)
        mask = torch.roll(amap > (lo + hi) / 2, shifts=2, dims=3)
        return base.SliceOutput(anomaly_map=amap, mask=mask, pred_label=mask.flatten(1).any(1).long())


def test_upstream_precision_recall_pooling_reaches_metrics_json(workspace, tmp_path, monkeypatch):
    """--pr_pooling upstream: per-batch precision/recall averaged over batches (mixed) or weighted by their
    unhealthy slices, recomputed here from the batch files; changing the pooling reuses every batch file."""
    monkeypatch.setitem(registry.METHODS, _ShiftedOracle.name, _ShiftedOracle)
    log_dir = tmp_path / "logs_pr"
    extra = f"--method {_ShiftedOracle.name} --num_batches_val 0"
    glob = _run(workspace, log_dir, "v2", monkeypatch, extra=extra, anofpdm=False)
    glob_metrics = json.loads((log_dir / "metrics.json").read_text())
    up = _run(workspace, log_dir, "v2", monkeypatch, extra=extra + " --pr_pooling upstream", anofpdm=False)
    assert (glob["computed"]["test"], up["computed"]["test"], up["reused"]["test"]) == (3, 0, 3)
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["settings"]["pr_pooling"] == "upstream" and glob_metrics["settings"]["pr_pooling"] == "global"
    ratios = {"mixed": [], "unhealthy": []}
    for f in sorted((log_dir / "batches").glob("test_*.npz")):
        with np.load(f) as z:
            gt, lab = z["gt"], z["label"]
            mixed = z["mask_0"] & (z["pred_label_0"] == 1)[:, None, None, None]
            for setup, sel, pred in (("mixed", slice(None), mixed), ("unhealthy", lab == 1, z["mask_0"][lab == 1])):
                tp, p, g = (pred & gt[sel]).sum(), pred.sum(), gt[sel].sum()
                ratios[setup].append((tp / p if p else 0.0, tp / g if g else 0.0, 1 if setup == "mixed" else sum(lab)))
    for setup, rows in ratios.items():
        prec, rec, w = np.array(rows).T
        assert 0 < prec.max() < 1 and 0 < rec.max() < 1, (setup, rows)  # a case where the pooling matters
        assert metrics[setup]["precision"] == pytest.approx((prec * w).sum() / w.sum())
        assert metrics[setup]["recall"] == pytest.approx((rec * w).sum() / w.sum())
        assert metrics[setup]["dice"] == glob_metrics[setup]["dice"]
        assert metrics[setup]["precision"] != pytest.approx(glob_metrics[setup]["precision"])


def test_find_checkpoint(tmp_path):
    for name in ("model000100.pt", "model065000.pt", "ema_0.9999_065000.pt", "opt065000.pt", "ema_0.99_000100.pt"):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
    find = fileio.find_checkpoint
    assert find(str(tmp_path)).endswith("model065000.pt")
    assert find(str(tmp_path), "65000").endswith("model065000.pt")
    assert find(str(tmp_path), "000100").endswith("model000100.pt")
    assert find(str(tmp_path), None, ema_rate="0.9999").endswith("ema_0.9999_065000.pt")
    assert find(str(tmp_path), "", ema_rate="0.99").endswith("ema_0.99_000100.pt")
    with pytest.raises(FileNotFoundError, match="available steps: \\[100, 65000\\]"):
        find(str(tmp_path), "210000")
    with pytest.raises(ValueError, match="--model_num"):
        find(str(tmp_path), "abc")
    with pytest.raises(FileNotFoundError, match="no EMA"):
        find(str(tmp_path), "", ema_rate="0.5")


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--w -1", "--w -1"),
        ("--modality 0 7", "out of range"),
        ("--num_batches 0", "--num_batches"),
        ("--unet_ver hae_v2 --use_hae False", "--use_hae true"),
        ("--precision fp8", "--precision"),
        ("--median_kernel 4", "--median_kernel"),
        ("--pr_pooling batch", "--pr_pooling: invalid choice: 'batch' (choose from 'global', 'upstream')"),
    ],
)
def test_bad_flags_give_clear_errors(workspace, tmp_path, extra, message, capsys):
    argv = (f"--data_dir {workspace / 'data'} --model_dir {workspace / 'model_v2'} --w 2 ".split()
            + _tiny_flags("v2") + extra.split())
    with pytest.raises((ValueError, SystemExit)) as caught:
        evaluate.parse(argv)
    shown = str(caught.value) if caught.type is not SystemExit else capsys.readouterr().err
    assert message in shown, shown
    with pytest.raises(ValueError, match="--data_dir"):
        evaluate.parse(f"--data_dir {tmp_path / 'none'} --model_dir {tmp_path} --w 2".split())


def test_median_kernel_reaches_the_maps(workspace):
    """--median_kernel sets the window of the anomaly map's median filter; --median_filter false switches it off."""
    from scipy import ndimage

    from guided_diffusion.methods import anofpdm as af
    from guided_diffusion.methods.registry import build_method

    base = (f"--data_dir {workspace / 'data'} --model_dir {workspace / 'model_v2'} --w 2 ".split() + _tiny_flags("v2"))
    for extra, window in (([], 5), (["--median_kernel", "3"], 3), (["--median_kernel", "3", "--median_filter", "false"], 1)):
        settings, _ = evaluate.parse(base + extra)
        assert settings.inference.maps.kernel == window
        assert build_method(settings.inference, torch.device("cpu")).settings()["median_kernel"] == window
        maps = torch.rand(2, 2, 16, 16)
        amap, _, _ = af.threshold_maps(maps, torch.full((2, 2), 0.9), settings.inference.maps.kernel)
        expected = ndimage.median_filter(maps.mean(1, keepdim=True).numpy(), size=(1, 1, window, window), mode="mirror")
        assert np.allclose(amap.numpy(), expected)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(workspace, tmp_path, monkeypatch):
    """torchrun with 2 CPU processes: every slice once across ranks, gathered metrics, and per slice the same
    results as one process (the noise is dealt out with the slices; DDPM encoding makes noise matter)."""
    flags = (["--data_dir", str(workspace / "data"), "--model_dir", str(workspace / "model_v2"), "--w", "2",
              "--forward_steps", "2", "--d_reverse", "False", "--batch_size", "4", "--num_batches", "-1",
              "--batch_size_val", "4", "--num_batches_val", "-1", "--progress", "False", "--num_panels", "2",
              "--save_data", "True"] + _tiny_flags("v2"))
    log_ddp = tmp_path / "logs_ddp"
    env = {**os.environ, "OPENAI_LOGDIR": str(log_ddp), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc-per-node", "2", "--nnodes", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(REPO / "scripts" / "translation_FPDM.py")]
    proc = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((log_ddp / "metrics.json").read_text())
    _assert_metrics(metrics)
    assert metrics["mixed"]["n_slices"] == 8 and metrics["settings"]["world_size"] == 2
    files = sorted(p.name for p in (log_ddp / "batches").iterdir())
    assert files == [f"{s}_ws2_r{r}_b{k:05d}.npz" for s in ("test", "val") for r in (0, 1) for k in (0, 1)]

    log_one = tmp_path / "logs_one"
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_one))
    evaluate.main(flags)
    one = json.loads((log_one / "metrics.json").read_text())
    for key in ("thr_01", "diff_max"):
        assert one["hyperparams"][key] == pytest.approx(metrics["hyperparams"][key], rel=1e-4)
    with np.load(log_ddp / "per_slice_arrays.npz") as a, np.load(log_one / "per_slice_arrays.npz") as b:
        index = {row.tobytes(): i for i, row in enumerate(b["source"].reshape(8, -1))}
        order = [index[row.tobytes()] for row in a["source"].reshape(8, -1)]
        assert sorted(order) == list(range(8))  # the same 8 slices, each once
        np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"][order], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["similarity"], b["similarity"][order], rtol=1e-5, atol=1e-6)
    for setup in ("mixed", "unhealthy"):
        for key in ("dice", "iou", "auprc"):
            assert one[setup][key] == pytest.approx(metrics[setup][key], abs=1e-4)
