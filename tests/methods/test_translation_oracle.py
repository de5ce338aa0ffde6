"""The whole translation run on a planted model whose Dice, IoU, AUPRC, AUROC and accuracy are known in advance.

The data are 32x32 one-channel slices made of full-width horizontal bands (so the 5x5 median filter keeps every
band's values), min-max scaled by the loader to the lattice {-1 background, 0 brain, 0.3 lesion B, 0.6 lesion A
or healthy bright structure F, 1 bright rim}. The planted model recovers x0 exactly from the latent (at t <= 2 the
noise is far below the lattice spacing) and predicts

    null rows:    x0 + d_t P                    (P: a +-1 checkerboard on the tissue, d_t small and growing)
    healthy rows: H(x0) + (d_t + kappa d_t) P,  H heals A and F to brain and B to -0.5.

With w = 2 the guided x̂0 on A and F is 3*0 - 2*0.6 = -1.2 and on B 3*(-0.5) - 2*0.3 = -2.1, both clipped to -1,
so their sub-anomaly maps are exact constants (1.6² and 1.3²) far above the tissue's (2.5 d_t)². Everything that
follows (classification, t_e, quantile threshold, masks, metrics) is then a matter of counting band pixels.
"""

import json

import numpy as np
import pytest
import torch

from guided_diffusion.commands import evaluate
from guided_diffusion.loading import ModelSource
from guided_diffusion.script_util import create_gaussian_diffusion

SIZE = 32
RAW = {"background": 0.0, "brain": 0.5, "B": 0.65, "A": 0.8, "F": 0.8, "rim": 1.0}
HEALED_RAW = {0.8: 0.5, 0.65: 0.25}  # what the healthy prediction makes of A/F and of B
D = (0.01, 0.02, 0.03)  # d_t for the forward steps t = 0, 1, 2
KAPPA = 0.5
W = 2.0
FOREGROUND_ROWS = SIZE - 3  # rows 3..31 (everything but the background band)


def scaled(raw: float) -> torch.Tensor:
    """The loader's per-slice min-max scaling of a raw value (every slice has min 0 and max 1)."""
    return (torch.tensor(raw, dtype=torch.float32) - 0.0) / (1.0 - 0.0 + 1e-5) * 2 - 1


def slice_image(bands: dict) -> tuple:
    """Raw image and ground truth: background rows 0-2, rim rows 29-31, brain elsewhere, then the given bands
    (rows [r0, r1), or a box (r0, r1, c0, c1))."""
    x = np.full((SIZE, SIZE), RAW["brain"])
    x[:3] = RAW["background"]
    x[29:] = RAW["rim"]
    gt = np.zeros((SIZE, SIZE), np.float32)
    for kind, (r0, r1, *cols) in bands.items():
        box = (slice(r0, r1), slice(*cols) if cols else slice(None))
        x[box] = RAW[kind[0]]
        if kind[0] in "AB":
            gt[box] = 1.0
    return x, gt


# test slices: name -> bands (rows [r0, r1)); every band at least 3 rows, lesions separated by >= 3 brain rows
TEST_SLICES = {
    "U1": {"A": (6, 10), "B": (13, 16)},  # A 128 px found, B 96 px ranked second but missed
    "U2": {"A": (6, 9), "F": (12, 15), "B1": (18, 21)},  # A 96, a 96-px false positive F, B 96
    "U3": {"A": (6, 10)},  # A 128: perfect
    "H1": {},
    "H2": {},
    "H3": {"F": (10, 14)},  # healthy slice with a 128-px bright structure the model heals: misclassified
}
VAL_SLICES = {
    "VU1": {"A": (6, 10), "B": (13, 16)},
    "VU2": {"A": (6, 10)},
    "VH1": {},
    "VH2": {},
    "VH3": {},
    "VHb": {"F": (10, 11, 0, 1)},  # a healthy slice with one F pixel: its similarity (~0.96) sets thr_01
}


def _write(root, split, slices):
    for name, bands in slices.items():
        d = root / f"npy_{split}" / f"patient_{name}"
        d.mkdir(parents=True)
        x, gt = slice_image(bands)
        np.savez_compressed(d / "slice_1", x=x[None, None], y=gt[None, None])


class PlantedModel(torch.nn.Module):
    def __init__(self, diffusion):
        super().__init__()
        self.abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)
        self.lattice = torch.stack([scaled(v) for v in sorted(set(RAW.values()))])
        self.healed = {float(scaled(k)): scaled(v) for k, v in HEALED_RAW.items()}
        rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        self.checker = ((rows + cols) % 2 * 2 - 1).float()
        self.max_snap = 0.0  # largest |x_t / sqrt(abar) - x0| seen: the planted assumption, checked by the test

    def forward(self, x, t, y=None, threshold=-1, null=False, clf_free=False):
        assert clf_free and threshold == -1 and int(t.max()) < len(D)
        a = self.abar[t][:, None, None, None]
        est = x / a.sqrt()
        x0 = self.lattice[(est[..., None] - self.lattice).abs().argmin(-1)]
        self.max_snap = max(self.max_snap, float((est - x0).abs().max()))
        healthy = x0.clone()
        for value, target in self.healed.items():
            healthy[x0 == value] = target
        tissue = (x0 > self.lattice[0]) & (x0 < self.lattice[-1])
        pattern = self.checker * tissue
        d = torch.tensor(D)[t][:, None, None, None]
        target = torch.where(torch.as_tensor(null).expand(x.shape[0])[:, None, None, None],
                             x0 + d * pattern, healthy + (1 + KAPPA) * d * pattern)
        return (x - a.sqrt() * target) / (1 - a).sqrt()




@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    _write(root / "data", "val", VAL_SLICES)
    _write(root / "data", "test", TEST_SLICES)
    (root / "model").mkdir()
    (root / "model" / "model000001.pt").write_bytes(b"planted model: no weights")
    return root


def _run(planted, tmp_path, monkeypatch, extra=""):
    diffusion = create_gaussian_diffusion(steps=1000)
    model = PlantedModel(diffusion)
    ckpt = str(planted / "model" / "model000001.pt")
    monkeypatch.setattr(ModelSource, "load", lambda self, device, warn=None: (model, diffusion, ckpt))
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    argv = (f"--data_dir {planted / 'data'} --model_dir {planted / 'model'} --w {W} --forward_steps {len(D)} "
            "--batch_size 4 --num_batches -1 --batch_size_val 3 --num_batches_val -1 --modality 0 "
            "--image_size 32 --in_channels 1 --num_channels 32 --num_classes 2 --unet_ver v2 "
            "--num_panels 0 --progress False").split() + extra.split()
    summary = evaluate.main(argv)
    # x0 is recovered exactly while the latent's noise stays under half the lattice spacing (0.3 / 2); at t <= 2
    # its scale is sqrt(1 - abar_2) ~ 0.019 (about 0.09 at the largest of these draws)
    assert model.max_snap < 0.15, "the planted model could not recover x0 from the latent"
    return summary, json.loads((log_dir / "metrics.json").read_text())


def _ap(groups):
    """Average precision of score groups in descending order, each (positives, negatives) tied."""
    total_pos = sum(p for p, _ in groups)
    ap, tp, seen = 0.0, 0, 0
    for p, n in groups:
        tp, seen = tp + p, seen + p + n
        ap += p / total_pos * tp / seen
    return ap


def _auroc(groups, n_neg_total):
    """P(pos > neg) + P(tie)/2 for descending tied groups; the rest of the negatives rank below every group."""
    total_pos = sum(p for p, _ in groups)
    above, auc = 0, 0.0
    for p, n in groups:
        auc += p * (n_neg_total - above - n + 0.5 * n)
        above += n
    return auc / (total_pos * n_neg_total)


def _expected():
    a = {"U1": 128, "U2": 96, "U3": 128}
    b = {"U1": 96, "U2": 96, "U3": 0}
    f = {"U2": 96, "H3": 128}
    pos = sum(a.values()) + sum(b.values())  # 544 lesion pixels
    s = 1e-6  # the Dice / IoU smoothing term
    dice = {u: (2 * a[u] + s) / (a[u] + f.get(u, 0) + a[u] + b[u] + s) for u in a}
    iou = {u: (a[u] + s) / (a[u] + f.get(u, 0) + b[u] + s) for u in a}
    unh_groups = [(sum(a.values()), f["U2"]), (sum(b.values()), 0)]  # A+F tied at 1.6², then B at 1.3²
    mix_groups = [(sum(a.values()), f["U2"] + f["H3"]), (sum(b.values()), 0)]
    fp_unh, fp_mix = f["U2"], f["U2"] + f["H3"]
    return {
        "unhealthy": {
            "dice": sum(dice.values()) / 3, "iou": sum(iou.values()) / 3, "auprc": _ap(unh_groups),
            "auroc": _auroc(unh_groups, 3 * SIZE * FOREGROUND_ROWS - pos),
            "precision": 352 / (352 + fp_unh), "recall": 352 / pos, "n_slices": 3,
        },
        "mixed": {
            # H1, H2 predicted healthy with empty masks score 1; H3 (mask F, no lesion) scores 1e-6 / (128 + 1e-6)
            "dice": (sum(dice.values()) + 2 + 1e-6 / (128 + 1e-6)) / 6,
            "iou": (sum(iou.values()) + 2 + 1e-6 / (128 + 1e-6)) / 6,
            "auprc": _ap(mix_groups), "auroc": _auroc(mix_groups, 6 * SIZE * FOREGROUND_ROWS - pos),
            "precision": 352 / (352 + fp_mix), "recall": 352 / pos, "n_slices": 6,
        },
        "accuracy": 5 / 6,  # every slice right but H3
    }


def test_planted_model_gives_the_known_metrics(planted, tmp_path, monkeypatch):
    summary, metrics = _run(planted, tmp_path, monkeypatch)
    expected = _expected()
    assert expected["unhealthy"]["auprc"] == pytest.approx(
        (352 / 544) * (352 / 448) + (192 / 544) * (544 / 640), abs=1e-15)  # the groups written out once
    for setup in ("unhealthy", "mixed"):
        for key, value in expected[setup].items():
            assert metrics[setup][key] == pytest.approx(value, abs=1e-9), (setup, key)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    cls = metrics["classification"]
    assert (cls["tp"], cls["fp"], cls["tn"], cls["fn"]) == (3, 1, 2, 0)
    # validation: the 32-px F slice is the one error and sets thr_01 just above its own similarity
    hp = metrics["hyperparams"]
    assert hp["n_val"] == 6 and hp["n_val_unhealthy"] == 2 and hp["n_errors"] == 1
    assert 0.95 < hp["thr_01"] < 0.97

    # the same slices in other batches (and another validation batching) give the same metrics
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    _, again = _run(planted, again_dir, monkeypatch, extra="--batch_size 5 --batch_size_val 4")
    for setup in ("unhealthy", "mixed"):
        for key in expected[setup]:
            assert again[setup][key] == pytest.approx(metrics[setup][key], rel=1e-12, abs=1e-15), (setup, key)
    assert again["settings"]["batch_size"] == 5 and again["accuracy"] == metrics["accuracy"]


def test_null_encoding_is_the_default_and_false_stays_reachable(planted):
    from guided_diffusion.methods import anofpdm as af

    base = f"--data_dir {planted / 'data'} --model_dir {planted / 'model'} --w 2 --modality 0".split()
    s = evaluate.parse(base)[0].inference
    assert s.options.null is True and af.forward_config(s.options, s.maps.modality).encode_null is True
    s = evaluate.parse(base + ["--null", "False"])[0].inference
    assert af.forward_config(s.options, s.maps.modality).encode_null is False


def test_recorded_fallback_refused_by_the_run_before_any_forward_step(planted, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:  # a user error: one message, exit code 2
        _run(planted, tmp_path, monkeypatch, extra="--forward_steps 600 --num_batches_val 0")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--ugp_mode upstream --legacy_ddim_encoding True" in err
    assert "--hyperparams_file" in err
    assert not (tmp_path / "logs" / "batches").exists()
