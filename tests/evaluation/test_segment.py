"""Whole-volume segmentation: geometry round trip on a rotated, flipped, anisotropic grid; per-volume metrics against
hand-computed values; the command end to end on tiny subjects and a tiny model (bad inputs, resume, atomicity)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion import metrics as M
from guided_diffusion.data import nifti
from guided_diffusion.data import preprocess as pp
from guided_diffusion.data.loaders import normalise_slice
from guided_diffusion.commands import segment as seg_cli
from guided_diffusion.evaluation.volumes import report as seg_report
from guided_diffusion.evaluation.volumes import run as seg_run
from guided_diffusion.evaluation.volumes import subject as seg_subject
from guided_diffusion.methods import base, registry
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from two_processes import free_port

REPO = Path(__file__).resolve().parents[2]
SHAPE = (24, 16, 10)  # H, W, Z: H/S = 3 and W/S = 2 for S = 8
SIZE = 8
ZOOMS = (0.9, 1.2, 2.5)  # anisotropic voxels (mm)


def _affine(zooms=ZOOMS) -> np.ndarray:
    """Rotated 30° about z, first axis flipped, anisotropic, translated: every term of the affine matters."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-zooms[0], zooms[1], zooms[2]])
    a[:3, 3] = [90.0, -126.0, -72.0]
    return a


def _save(path: Path, arr: np.ndarray, affine=None, qform_code=1, sform_code=4, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr, dtype), _affine() if affine is None else affine)
    sform = img.affine.copy()
    sform[:3, 3] += [0.5, -0.25, 1.0]  # sform differs from qform: both must come back as they were
    img.set_qform(img.affine, code=qform_code)
    img.set_sform(sform, code=sform_code)
    nib.save(img, str(path))


def _subject_arrays(seed: int, lesion: bool = True):
    """Brain in z 2..7 (indices), a 6x4 lesion box at z 4..5, bright on every modality."""
    rng = np.random.default_rng(seed)
    vols = {}
    for i, m in enumerate(pp.MODALITIES):
        v = np.zeros(SHAPE, np.float32)
        v[3:21, 2:14, 2:8] = rng.uniform(10, 20, size=(18, 12, 6)) * (i + 1)
        vols[m] = v
    seg = np.zeros(SHAPE, np.float32)
    if lesion:
        seg[6:12, 4:8, 4:6] = 2
        for v in vols.values():
            v[6:12, 4:8, 4:6] *= 3
    return vols, seg


def _write_subject(root: Path, name: str, seed: int, lesion: bool = True, with_seg: bool = True) -> Path:
    vols, seg = _subject_arrays(seed, lesion)
    for m, v in vols.items():
        _save(root / name / f"{name}_{m}.nii.gz", v)
    if with_seg:
        _save(root / name / f"{name}_seg.nii.gz", seg, dtype=np.uint8)
    return root / name


# ------------------------------------------------------------------------------------------------------------
# Geometry


def test_prepared_slices_are_the_training_slices(tmp_path):
    """Segmentation feeds the model exactly what preprocessing writes and the loaders read."""
    src = tmp_path / "raw"
    _write_subject(src, "S0", 0)
    pp.preprocess(src, image_size=SIZE, output=tmp_path / "pre", progress=False)
    files = sorted((tmp_path / "pre").glob("npy_*/patient_S0/slice_*.npz"), key=lambda p: int(p.stem[6:]))
    subject = pp.subject_from_folder(src / "S0", "brats", "all")
    volume, mask = pp.load_subject(subject)
    geometry = pp.subject_geometry(subject, "LPS")  # the default of both for --name brats
    assert geometry.axcodes == "LAS" and geometry.ornt == ((0, 1), (1, -1), (2, 1))  # this grid: A flipped to P
    prepared = pp.prepare_slices(volume, mask, SIZE, geometry=geometry)
    assert [int(f.stem[6:]) for f in files] == list(range(prepared.start, prepared.stop)) == list(range(2, 8))
    x = seg_subject.model_input(prepared)
    for i, f in enumerate(files):
        with np.load(f) as d:
            np.testing.assert_array_equal(d["x"][0], prepared.x[i])
            np.testing.assert_array_equal(d["y"][0], prepared.y[i])
            assert torch.equal(normalise_slice(d["x"][0]), x[i])


def test_inverse_resize_puts_an_oracle_back_on_the_right_voxels(tmp_path):
    """Maps planted in slice space come back where the voxel-centre geometry says, on the kept z only."""
    vols, seg = _subject_arrays(0)
    volume = np.stack([vols[m] for m in pp.MODALITIES]).astype(np.float64)
    prepared = pp.prepare_slices(volume, seg, SIZE, first=1, last=1)
    h, w, depth = SHAPE
    assert prepared.shape == SHAPE and list(prepared.original_z) == list(range(2, 8))

    # A map linear in slice coordinates (u along H, v along W) plus 100 per kept slice: bilinear interpolation
    # reproduces it exactly wherever a voxel centre falls inside the slice grid.
    n = len(prepared.original_z)
    u, v = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    planted = np.stack([u + 10.0 * v + 100.0 * i for i in range(n)])[:, None].astype(np.float32)
    back = nifti.slices_to_volume(planted, prepared)
    assert back.shape == SHAPE and back.dtype == np.float32
    uj = (np.arange(h) + 0.5) * SIZE / h - 0.5  # slice coordinate of each voxel centre
    vk = (np.arange(w) + 0.5) * SIZE / w - 0.5
    inside_u = (uj >= 0) & (uj <= SIZE - 1)
    inside_v = (vk >= 0) & (vk <= SIZE - 1)
    for i, z in enumerate(prepared.original_z):
        want = uj[:, None] + 10 * vk[None, :] + 100 * i
        np.testing.assert_allclose(back[..., z][np.ix_(inside_u, inside_v)], want[np.ix_(inside_u, inside_v)],
                                   rtol=0, atol=1e-4)
    assert not back[..., [0, 1, 8, 9]].any()  # outside the kept range (and the trimmed slices): zero

    # A binary block over slice pixels [a, b) comes back where the (separable) linear interpolation of the block's
    # indicator exceeds 0.5; numpy's interp (edge values held) is the independent reference.
    a_u, b_u, a_v, b_v, i = 2, 5, 1, 4, 3
    block = np.zeros((n, 1, SIZE, SIZE), bool)
    block[i, 0, a_u:b_u, a_v:b_v] = True
    mask = nifti.mask_to_volume(block, prepared)
    grid = np.arange(SIZE)
    fu = np.interp(uj, grid, ((grid >= a_u) & (grid < b_u)).astype(float))
    fv = np.interp(vk, grid, ((grid >= a_v) & (grid < b_v)).astype(float))
    value = fu[:, None] * fv[None, :]
    decided = np.abs(value - 0.5) > 1e-6  # exact ties at 0.5 (e.g. 2/3 * 3/4 at a corner) go either way in float
    got = mask[..., prepared.original_z[i]].astype(bool)
    np.testing.assert_array_equal(got[decided], (value > 0.5)[decided])
    assert got.sum() >= 9 and (value > 0.5 + 1e-6).sum() >= 9 and (~decided).sum() < 8
    assert mask.sum() == got.sum()  # nothing on other slices

    # The ground truth resized to the slices and back is the lesion box (rows 6..11, columns 4..7, z 4..5) up to
    # its corner voxels, where the interpolated value ties at 2/3 * 3/4 = 0.5; nothing outside the box.
    gt_back = nifti.mask_to_volume(prepared.y > 0.5, prepared).astype(bool)
    box = seg > 0.5
    core = box.copy()
    core[[6, 6, 11, 11], [4, 7, 4, 7]] = False
    assert not (gt_back & ~box).any() and (gt_back | ~core).all()


def test_written_nifti_keeps_shape_affine_orientation_and_dtype(tmp_path):
    ref_path = tmp_path / "ref.nii.gz"
    _save(ref_path, np.ones(SHAPE), qform_code=1, sform_code=4)
    ref = nifti.load_reference(ref_path)
    rng = np.random.default_rng(0)
    amap = rng.random(SHAPE).astype(np.float32) * 1e-3
    mask = (rng.random(SHAPE) > 0.7).astype(np.uint8)
    nifti.save_like(tmp_path / "map.nii.gz", amap, ref, np.float32, "map")
    nifti.save_like(tmp_path / "mask.nii.gz", mask, ref, np.uint8, "mask")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    for name, data, dtype in (("map.nii.gz", amap, np.float32), ("mask.nii.gz", mask, np.uint8)):
        img = nib.load(str(tmp_path / name))
        assert img.shape == SHAPE
        assert img.get_data_dtype() == dtype
        stored = np.asanyarray(img.dataobj)
        assert stored.dtype == dtype
        np.testing.assert_array_equal(stored, data)  # no scaling
        for getter in ("get_qform", "get_sform"):
            np.testing.assert_array_equal(getattr(img, getter)(), getattr(ref, getter)())
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 4
        np.testing.assert_allclose(img.header.get_zooms(), ZOOMS, rtol=1e-6)
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine)
    assert nifti.voxel_volume_ml(ref) == pytest.approx(0.9 * 1.2 * 2.5 / 1000)
    with pytest.raises(ValueError, match="differs from the reference grid"):
        nifti.like_reference(np.zeros((3, 3, 3)), ref, np.float32)


def test_display_slice_is_radiological():
    """The patient's right-anterior corner (axial) shows at the top left whatever the array's orientation; a
    sagittal slice shows anterior-superior there."""
    cases = [  # in-plane axis codes, marker index at that corner, displayed shape
        (("L", "P"), (0, 0), (6, 5)),  # BraTS (LPS): index 0 is the right / anterior end
        (("R", "A"), (4, 5), (6, 5)),  # RAS
        (("P", "L"), (0, 0), (5, 6)),  # axes swapped
        (("A", "R"), (4, 5), (5, 6)),
        (("P", "S"), (0, 5), (6, 5)),  # sagittal: anterior left, superior up
    ]
    for codes, marker, shape in cases:
        plane = np.zeros((5, 6))
        plane[marker] = 1
        shown = nifti.display_slice(plane, codes)
        assert shown.shape == shape and shown[0, 0] == 1, codes


# ------------------------------------------------------------------------------------------------------------
# Per-volume metrics


def test_volume_metrics_hand_computed():
    gt = np.zeros((4, 3, 2), bool)
    pred = np.zeros_like(gt)
    gt[0, 0, 0] = gt[0, 1, 0] = gt[1, 0, 0] = gt[2, 2, 1] = True  # 4 lesion voxels
    pred[0, 0, 0] = pred[0, 1, 0] = pred[1, 0, 0] = pred[3, 0, 1] = pred[3, 1, 1] = True  # 5, 3 of them right
    scores = np.full(gt.shape, 5.0)  # outside the foreground: must be ignored (else AP would change)
    fg = np.zeros_like(gt)
    for (idx, score) in (((0, 0, 0), 0.9), ((3, 0, 1), 0.8), ((2, 2, 1), 0.7), ((3, 2, 0), 0.1)):
        fg[idx], scores[idx] = True, score
    voxel_ml = 0.9 * 1.2 * 2.5 / 1000
    m = M.volume_metrics(pred, gt, scores, fg, voxel_ml)
    assert m["dice"] == pytest.approx((2 * 3 + 1e-6) / (5 + 4 + 1e-6))
    assert m["iou"] == pytest.approx((3 + 1e-6) / (6 + 1e-6))
    # ranked foreground voxels: + (0.9), - (0.8), + (0.7), - (0.1): AP = 1/2 * 1 + 1/2 * 2/3
    assert m["auprc"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(3 / 4)
    assert (m["pred_voxels"], m["gt_voxels"]) == (5, 4)
    assert m["pred_ml"] == pytest.approx(5 * 0.0027) and m["gt_ml"] == pytest.approx(4 * 0.0027)
    empty = M.volume_metrics(np.zeros_like(gt), np.zeros_like(gt), scores, None, 1.0)
    assert empty["dice"] == 1.0 and empty["iou"] == 1.0 and empty["auprc"] is None
    s = M.mean_sd([0.5, 1.0, None, float("nan")])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.75) and s["sd"] == pytest.approx(math.sqrt(0.125))
    assert M.mean_sd([0.3]) == {"mean": 0.3, "sd": None, "n": 1}


def test_summary_pools_slices_and_volumes():
    def rec(name, dice, gt_voxels, n_mixed, d_mixed, n_unh, d_unh, hd95, nsd):
        slice_ = {"mixed": {"dice": d_mixed, "iou": d_mixed, "auprc": None, "n_slices": n_mixed},
                  "unhealthy": {"dice": d_unh, "iou": d_unh, "auprc": None, "n_slices": n_unh}, "accuracy": 1.0}
        vol = {"dice": dice, "iou": dice, "auprc": 0.5, "precision": 1, "recall": 1, "pred_ml": 1.0, "gt_ml": 1.0,
               "gt_voxels": gt_voxels, "pred_voxels": 1, "hd95_mm": hd95, "nsd": nsd, "nsd_tolerance_mm": 1.0}
        return {"id": name, "lesion": {"ml": 2.0}, "metrics": {"volume": vol, "slice": slice_}}

    a = rec("a", 0.6, 10, 10, 0.9, 4, 0.5, 3.0, 0.5)
    b = rec("b", 0.8, 5, 30, 0.7, 2, 0.2, None, 0.0)  # lesion missed: no HD95
    h = rec("h", 1.0, 0, 20, 1.0, 0, None, 0.0, 1.0)  # no lesion, nothing predicted
    s = seg_report.summarize([a, b, h], [{"id": "x", "message": "bad"}])
    assert s["volume_with_lesion"]["hd95_mm"] == {"mean": 3.0, "sd": None, "n": 1}  # the undefined one left out
    assert s["volume_with_lesion"]["nsd"]["mean"] == pytest.approx(0.25)
    assert s["volume_all"]["hd95_mm"]["mean"] == pytest.approx(1.5) and s["volume_all"]["nsd"]["n"] == 3
    assert s["nsd_tolerance_mm"] == 1.0
    text = seg_report.format_summary(s)
    assert "NSD at 1.0 mm 25.0 ± 35.4 (n=2)" in text and "HD95 3.0 (n=1) mm" in text
    assert seg_report._csv_row({**a, "slices": {"n_kept": 3, "n_unhealthy": 1}})["hd95_mm"] == 3.0
    assert (s["subjects"], s["done"], s["with_lesion"]) == (4, 3, 2)
    assert s["volume_with_lesion"]["dice"]["mean"] == pytest.approx(0.7)
    assert s["volume_with_lesion"]["dice"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert s["volume_all"]["dice"]["mean"] == pytest.approx(0.8)
    assert s["slice_all_slices"]["mixed"]["dice"] == pytest.approx((10 * 0.9 + 30 * 0.7 + 20 * 1.0) / 60)
    assert s["slice_all_slices"]["unhealthy"]["dice"] == pytest.approx((4 * 0.5 + 2 * 0.2) / 6)
    assert s["slice_all_slices"]["unhealthy"]["n_slices"] == 6


# ------------------------------------------------------------------------------------------------------------
# The command


TINY = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            in_channels=4, class_cond=True, num_classes=2, unet_ver="v2")


def _tiny_flags() -> list:
    return (f"--image_size {SIZE} --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
            "--in_channels 4 --num_classes 2 --unet_ver v2").split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    kw = model_and_diffusion_defaults()
    kw.update(TINY)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), d / "model000010.pt")
    return d




def _hyper_file(tmp_path: Path) -> Path:
    path = tmp_path / "hyperparams.json"
    path.write_text(json.dumps({"thr_01": 0.999, "diff_max": [1e-3, 1e-3], "source": "test"}))
    return path


def _argv(model_dir: Path, out: Path, *inputs, extra=(), anofpdm: bool = True) -> list:
    """The segment command's flags for a tiny model (AnoFPDM's own flags unless ``anofpdm`` is False)."""
    method = ["--w", "2", "--forward_steps", "2"] if anofpdm else []
    return (["--model_dir", str(model_dir), *method, "--modality", "0", "3",
             "--batch_size", "4", "--output", str(out), "--progress", "False", "--overlay_slices", "2"]
            + _tiny_flags() + ["--input", *map(str, inputs)] + list(extra))


def test_segment_bad_inputs_resume_and_outputs(tmp_path, model_dir, monkeypatch):
    src = tmp_path / "raw"
    for i, name in enumerate(["A", "B", "C", "D", "E"]):
        _write_subject(src, name, i, lesion=name != "B", with_seg=name != "E")
    (src / "B" / "B_t1ce.nii.gz").unlink()  # missing modality
    (src / "C" / "C_t2.nii.gz").write_bytes(b"not a nifti")  # corrupt
    _save(src / "D" / "D_seg.nii.gz", np.zeros((24, 16, 9)))  # shape mismatch
    (src / "A" / "notes.txt").write_text("stray")
    out = tmp_path / "out"
    hyper = _hyper_file(tmp_path)
    argv = _argv(model_dir, out, src, extra=["--hyperparams_file", str(hyper)])
    assert seg_cli.main(argv) == 1  # some subjects failed

    summary = json.loads((out / seg_report.SUMMARY_FILE).read_text())
    assert (summary["subjects"], summary["done"]) == (5, 2)
    failed = {f["id"]: f["message"] for f in summary["failed"]}
    assert "B_t1ce.nii.gz" in failed["B"] and "missing" in failed["B"]
    assert "C_t2.nii.gz" in failed["C"] and "cannot read" in failed["C"]
    assert "D_seg.nii.gz" in failed["D"] and "differ in shape" in failed["D"]
    assert not list(out.glob("B_*")) and not list(out.glob("C_*")) and not list(out.glob("D_*"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    ref = nib.load(str(src / "A" / "A_flair.nii.gz"))
    for name in ("A", "E"):
        amap = nib.load(str(out / f"{name}{seg_subject.MAP_SUFFIX}"))
        mask = nib.load(str(out / f"{name}{seg_subject.MASK_SUFFIX}"))
        for img, dtype in ((amap, np.float32), (mask, np.uint8)):
            assert img.shape == SHAPE and img.get_data_dtype() == dtype
            np.testing.assert_array_equal(img.get_sform(), ref.get_sform())
            np.testing.assert_array_equal(img.get_qform(), ref.get_qform())
        m, k = np.asanyarray(amap.dataobj), np.asanyarray(mask.dataobj)
        assert np.isfinite(m).all() and set(np.unique(k)) <= {0, 1}
        assert not m[..., :2].any() and not m[..., 8:].any() and m[..., 2:8].any()  # brain range z 2..7 only
        record = json.loads((out / f"{name}{seg_subject.RECORD_SUFFIX}").read_text())
        assert record["slices"]["kept"] == [2, 8] and record["grid"]["shape"] == list(SHAPE)
        assert set(record["slices"]["unhealthy"]) <= set(range(2, 8))
        assert record["lesion"]["voxels"] == int(k.sum())
        assert record["lesion"]["ml"] == pytest.approx(k.sum() * 0.9 * 1.2 * 2.5 / 1000)
        assert record["hyperparams"]["thr_01"] == 0.999 and record["checkpoint"].endswith("model000010.pt")
        assert (out / f"{name}{seg_subject.OVERLAY_SUFFIX}").read_bytes()[:4] == b"\x89PNG"
        # the mask is empty on the slices classified healthy
        healthy = [z for z in range(2, 8) if z not in record["slices"]["unhealthy"]]
        assert not k[..., healthy].any()
    rec_a = json.loads((out / f"A{seg_subject.RECORD_SUFFIX}").read_text())
    vm = rec_a["metrics"]["volume"]
    gt = np.asanyarray(nib.load(str(src / "A" / "A_seg.nii.gz")).dataobj) > 0.5
    k = np.asanyarray(nib.load(str(out / f"A{seg_subject.MASK_SUFFIX}")).dataobj).astype(bool)
    assert vm["gt_voxels"] == 6 * 4 * 2 and vm["dice"] == pytest.approx(
        (2 * (k & gt).sum() + 1e-6) / (k.sum() + gt.sum() + 1e-6))
    assert rec_a["metrics"]["slice"]["unhealthy"]["n_slices"] == 2
    assert json.loads((out / f"E{seg_subject.RECORD_SUFFIX}").read_text())["metrics"] is None  # no seg file
    rows = list(csv.DictReader(open(out / seg_report.CSV_FILE)))
    assert [(r["id"], r["status"]) for r in rows] == [("A", "done"), ("B", "failed"), ("C", "failed"),
                                                      ("D", "failed"), ("E", "done")]

    # Resume: finished subjects are kept as they are; a fixed subject is computed.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("[AE]_*")}
    _write_subject(src, "B", 1, lesion=False)
    assert seg_cli.main(argv) == 1  # C and D still fail
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("[AE]_*")} == mtimes
    summary = json.loads((out / seg_report.SUMMARY_FILE).read_text())
    assert (summary["done"], summary["computed"], summary["skipped"]) == (3, 1, 2)
    assert (out / f"B{seg_subject.MASK_SUFFIX}").exists()

    # --resume False recomputes every subject.
    assert seg_cli.main(argv + ["--resume", "False"]) == 1
    assert json.loads((out / seg_report.SUMMARY_FILE).read_text())["computed"] == 3


def test_run_file_mismatch_is_an_error(tmp_path, model_dir, capsys):
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    out = tmp_path / "out"
    argv = _argv(model_dir, out, src / "A", extra=["--hyperparams_file", str(_hyper_file(tmp_path))])
    assert seg_cli.main(argv) == 0
    argv[argv.index("--w") + 1] = "3"
    with pytest.raises(SystemExit) as exc:  # a user error: one message, exit code 2
        seg_cli.main(argv)
    assert exc.value.code == 2 and "other settings" in capsys.readouterr().err


class _FailingFile:
    """Accepts half of what a writer sends, then fails with ``err`` (a full disk, an I/O error)."""

    def __init__(self, path, err):
        self.real, self.err = open(path, "wb"), err

    def write(self, data):
        self.real.write(bytes(data[: len(data) // 2]))
        raise OSError(self.err, os.strerror(self.err))

    def __getattr__(self, name):
        return getattr(self.real, name)


def _failing_open(suffix, err):
    import guided_diffusion.fileio as fileio

    real = fileio.atomic._open

    def opener(path, mode, **kw):
        # temp name: .<final name>.partial-<pid>-<hex>
        if os.path.basename(path).split(".partial-")[0].endswith(suffix):
            return _FailingFile(path, err)
        return real(path, mode, **kw)

    return opener


def test_failed_write_leaves_nothing_half_written(tmp_path, model_dir, monkeypatch, capsys):
    import errno

    import guided_diffusion.fileio as fileio

    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    _write_subject(src, "B", 1)
    out = tmp_path / "out"
    argv = _argv(model_dir, out, src, extra=["--hyperparams_file", str(_hyper_file(tmp_path))])
    real = fileio.atomic._open

    # an I/O error while writing A's mask: A fails by name, B goes on, nothing partial under a final name
    monkeypatch.setattr(fileio.atomic, "_open", _failing_open(f"A{seg_subject.MASK_SUFFIX}", errno.EIO))
    assert seg_cli.main(argv) == 1
    assert not (out / f"A{seg_subject.MASK_SUFFIX}").exists() and not (out / f"A{seg_subject.RECORD_SUFFIX}").exists()
    assert (out / f"B{seg_subject.RECORD_SUFFIX}").exists()
    summary = json.loads((out / seg_report.SUMMARY_FILE).read_text())
    assert summary["failed"][0]["id"] == "A" and f"A{seg_subject.MASK_SUFFIX}" in summary["failed"][0]["message"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    # a full disk stops the run (every further write would fail) naming the file; finished subjects are kept
    # (A's map from the first attempt is a complete file and stays as it was: the rename never happened)
    kept = {p.name: p.read_bytes() for p in out.glob("[AB]_*")}
    monkeypatch.setattr(fileio.atomic, "_open", _failing_open(f"A{seg_subject.MAP_SUFFIX}", errno.ENOSPC))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # one message, exit code 2 (errors.entry_point)
        seg_cli.main(argv + ["--resume", "True"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"A{seg_subject.MAP_SUFFIX}" in err and "disk is full" in err, err
    assert {p.name: p.read_bytes() for p in out.glob("[AB]_*")} == kept
    assert not (out / f"A{seg_subject.RECORD_SUFFIX}").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    # a writer killed outright leaves a hidden partial file: swept at the next start, which completes A
    (out / f".A{seg_subject.MAP_SUFFIX}.partial-999999-deadbeef").write_bytes(b"half")
    monkeypatch.setattr(fileio.atomic, "_open", real)
    assert seg_cli.main(argv) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert nib.load(str(out / f"A{seg_subject.MASK_SUFFIX}")).shape == SHAPE
    assert json.loads((out / seg_report.SUMMARY_FILE).read_text())["skipped"] == 1  # B kept


def test_explicit_files_csv_and_flag_errors(tmp_path, model_dir):
    src = tmp_path / "raw"
    d = _write_subject(src, "A", 0)
    files = [f"{m}={d / f'A_{m}.nii.gz'}" for m in pp.MODALITIES] + [f"seg={d / 'A_seg.nii.gz'}"]
    hyper = ["--hyperparams_file", str(_hyper_file(tmp_path))]
    folder_argv = _argv(model_dir, tmp_path / "folder", src / "A", extra=hyper)
    assert seg_cli.main(folder_argv) == 0
    argv = _argv(model_dir, tmp_path / "files", extra=hyper)
    argv = argv[:argv.index("--input")] + hyper + ["--files", *files, "--id", "A"]
    table = tmp_path / "subjects.csv"
    table.write_text("id,flair,t1,t1ce,t2,seg\n" + "scan2," + ",".join(
        f"raw/A/A_{m}.nii.gz" for m in pp.MODALITIES) + ",\n")  # paths relative to the table; no seg
    assert seg_cli.main(argv + ["--subjects_csv", str(table)]) == 0
    for suffix in (seg_subject.MAP_SUFFIX, seg_subject.MASK_SUFFIX):  # explicit files = the same subject as a folder
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "files" / f"A{suffix}")).dataobj),
                                      np.asanyarray(nib.load(str(tmp_path / "folder" / f"A{suffix}")).dataobj))
    rec = json.loads((tmp_path / "files" / f"scan2{seg_subject.RECORD_SUFFIX}").read_text())
    assert rec["metrics"] is None and rec["inputs"]["flair"] == str(tmp_path / "raw/A/A_flair.nii.gz")

    def error_of(bad_argv):
        with pytest.raises(SystemExit) as e:
            seg_cli.main(bad_argv)
        return e.value.code

    assert error_of(argv[:argv.index("--id")]) == 2  # --files without --id
    assert error_of(folder_argv + ["--mod", "flair"]) == 2  # 1 channel for a 4-channel model
    assert error_of(folder_argv + ["--method", "nope"]) == 2
    assert error_of(folder_argv + ["--files", *files, "--id", "A"]) == 2  # the same name twice
    assert error_of(folder_argv[:folder_argv.index("--input")] + ["--input", str(tmp_path / "none")]) == 2
    (tmp_path / "a_file").write_text("x")
    unwritable = list(folder_argv)
    unwritable[unwritable.index("--output") + 1] = str(tmp_path / "a_file" / "out")
    assert error_of(unwritable) == 2


def test_validation_pass_is_run_once_and_reused(tmp_path, model_dir, monkeypatch):
    src = tmp_path / "raw"
    for i in range(20):
        _write_subject(src, f"S{i:02d}", i, lesion=i % 2 == 0)
    pp.preprocess(src, image_size=SIZE, output=tmp_path / "pre", progress=False)
    out = tmp_path / "out"
    argv = _argv(model_dir, out, src / "S00", src / "S01", extra=[
        "--data_dir", str(tmp_path / "pre"), "--batch_size_val", "4", "--num_batches_val", "-1"])
    from guided_diffusion.commands import evaluate
    from guided_diffusion.evaluation.driver import Evaluation

    computed = []  # validation batches computed (not reused) by each run
    real = Evaluation.validation

    def spy(self):
        hyper = real(self)
        computed.append(self.summary["computed"]["val"])
        return hyper

    monkeypatch.setattr(Evaluation, "validation", spy)
    assert seg_cli.main(argv) == 0
    hyper = json.loads((out / seg_run.VALIDATION_DIR / "hyperparams.json").read_text())
    assert hyper["n_val"] == 6 and len(hyper["diff_max"]) == 2  # one val subject, 6 brain slices
    record = json.loads((out / f"S00{seg_subject.RECORD_SUFFIX}").read_text())
    assert record["hyperparams"] == hyper and "validation pass" in record["hyperparams_source"]
    assert seg_cli.main(argv) == 0 and computed == [2, 0]  # the second run reuses the validation batches
    # the same hyper-parameters as the evaluation's validation pass with the same flags

    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "translation"))
    evaluate.main(["--data_dir", str(tmp_path / "pre"), "--model_dir", str(model_dir), "--w", "2",
                      "--forward_steps", "2", "--modality", "0", "3", "--batch_size", "4", "--num_batches", "1",
                      "--batch_size_val", "4", "--num_batches_val", "-1", "--num_panels", "0", "--progress", "False",
                      *_tiny_flags()])
    assert json.loads((tmp_path / "translation" / "hyperparams.json").read_text()) == hyper


def test_two_processes_share_the_subjects_and_agree_with_one(tmp_path, model_dir):
    src = tmp_path / "raw"
    for i, name in enumerate(["A", "B", "C"]):
        _write_subject(src, name, i)
    hyper = _hyper_file(tmp_path)
    flags = _argv(model_dir, tmp_path / "two", src, extra=["--hyperparams_file", str(hyper), "--d_reverse", "False"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc-per-node", "2", "--nnodes", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(REPO / "scripts" / "segment.py")]
    proc = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "log-rank001.txt").exists()  # rank 1 did its share
    one = tmp_path / "one"
    flags[flags.index("--output") + 1] = str(one)
    assert seg_cli.main(flags) == 0
    for name in ("A", "B", "C"):  # DDPM encoding: the noise matters, and is the same per subject on any rank
        for suffix in (seg_subject.MAP_SUFFIX, seg_subject.MASK_SUFFIX):
            np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "two" / f"{name}{suffix}")).dataobj),
                                          np.asanyarray(nib.load(str(one / f"{name}{suffix}")).dataobj))
    assert json.loads((tmp_path / "two" / seg_report.SUMMARY_FILE).read_text())["done"] == 3


class _OracleMethod(base.SliceMethod):
    """Knows where the planted lesion is from the input alone (bright on FLAIR, dark on T1): map = FLAIR - T1."""

    name = "oracle_test"

    @classmethod
    def build(cls, s, device):
        return cls()

    def settings(self):
        return {"method": self.name}

    def validation_batch(self, x, ctx):
        return {}

    def fit(self, records, labels, gt_masks):
        return {"threshold": 0.5}

    def hyperparams_without_validation(self):
        return {"threshold": 0.5}

    def test_batch(self, x, hyper, ctx):
        amap = (x[:, :1] - x[:, 1:2]).float()
        mask = amap > hyper["threshold"]
        return base.SliceOutput(anomaly_map=amap, mask=mask, pred_label=mask.flatten(1).any(1).long())


def test_oracle_method_lands_on_the_lesion_voxels(tmp_path, model_dir, monkeypatch):
    """End to end through real files on the rotated, anisotropic grid: a method whose slice-space mask is the
    planted lesion gives a NIfTI mask on the lesion's voxels, lesion volume and 3-D Dice to match."""
    monkeypatch.setitem(registry.METHODS, "oracle_test", _OracleMethod)
    src = tmp_path / "raw"
    vols = {m: np.zeros(SHAPE, np.float32) for m in pp.MODALITIES}
    for v in vols.values():
        v[3:21, 2:14, 2:8] = 10.0
    vols["flair"][6:12, 4:8, 4:6] = 30.0
    vols["t1"][6:12, 4:8, 4:6] = 5.0
    seg = np.zeros(SHAPE, np.uint8)
    seg[6:12, 4:8, 4:6] = 1
    for m, v in vols.items():
        _save(src / "P" / f"P_{m}.nii.gz", v)
    _save(src / "P" / "P_seg.nii.gz", seg, dtype=np.uint8)
    out = tmp_path / "out"
    assert seg_cli.main(_argv(model_dir, out, src, anofpdm=False,
                              extra=["--method", "oracle_test", "--num_batches_val", "0"])) == 0
    record = json.loads((out / f"P{seg_subject.RECORD_SUFFIX}").read_text())
    mask = np.asanyarray(nib.load(str(out / f"P{seg_subject.MASK_SUFFIX}")).dataobj).astype(bool)
    box = seg.astype(bool)
    core = box.copy()
    core[[6, 6, 11, 11], [4, 7, 4, 7]] = False  # corner voxels tie at 0.5 after the inverse resize
    assert not (mask & ~box).any() and (mask | ~core).all()
    assert record["slices"]["unhealthy"] == [4, 5]
    assert record["lesion"]["ml"] == pytest.approx(mask.sum() * 0.9 * 1.2 * 2.5 / 1000)
    vm = record["metrics"]["volume"]
    assert vm["dice"] == pytest.approx(2 * mask.sum() / (mask.sum() + 48), abs=1e-6) and vm["dice"] > 0.9
    assert vm["gt_ml"] == pytest.approx(48 * 0.0027)
    # HD95 / NSD in mm on the scan's anisotropic voxels (0.9, 1.2, 2.5 mm), by brute force
    from test_metrics_surface import brute_hd95_nsd

    hd95, nsd = brute_hd95_nsd(mask, box, ZOOMS, vm["nsd_tolerance_mm"])
    assert vm["nsd_tolerance_mm"] == 1.0 and hd95 > 0  # the corner ties: one voxel off along the 0.9-mm axis
    assert vm["hd95_mm"] == pytest.approx(hd95, rel=1e-6) and vm["nsd"] == pytest.approx(nsd, abs=1e-12)
    # AUPRC: the written map scored over the brain voxels (any input > 0), by sklearn
    from sklearn.metrics import average_precision_score

    amap = np.asanyarray(nib.load(str(out / f"P{seg_subject.MAP_SUFFIX}")).dataobj)
    brain = np.mean([v for v in vols.values()], axis=0) > 0
    assert vm["auprc"] == pytest.approx(average_precision_score(box[brain], amap[brain]), abs=1e-9)
    assert record["metrics"]["slice"]["unhealthy"]["dice"] == pytest.approx(1.0)


def test_a_baseline_method_through_the_same_command(tmp_path):
    """--method anoddpm with an unconditional v1 model (tiny, random): the command is method-agnostic."""
    kw = model_and_diffusion_defaults()
    kw.update(TINY, unet_ver="v1", num_classes=0, class_cond=False)
    model, _ = create_model_and_diffusion(**kw)
    (tmp_path / "m").mkdir()
    torch.save(model.state_dict(), tmp_path / "m" / "model000001.pt")
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    hyper = tmp_path / "h.json"
    hyper.write_text(json.dumps({"threshold": 0.05, "source": "test"}))
    argv = _argv(tmp_path / "m", tmp_path / "out", src, anofpdm=False, extra=[
        "--method", "anoddpm", "--sample_steps", "2", "--hyperparams_file", str(hyper)])
    argv[argv.index("--unet_ver") + 1] = "v1"
    argv[argv.index("--num_classes") + 1] = "0"
    assert seg_cli.main(argv) == 0
    record = json.loads((tmp_path / "out" / f"A{seg_subject.RECORD_SUFFIX}").read_text())
    assert record["method"] == "anoddpm" and record["hyperparams"]["threshold"] == 0.05
    assert nib.load(str(tmp_path / "out" / f"A{seg_subject.MAP_SUFFIX}")).shape == SHAPE


def test_config_launcher(tmp_path, model_dir):
    """config/run_segment.sh with its production flags overridden by a tiny model's (extra flags come last)."""
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    env = dict(os.environ, MODEL_DIR=str(model_dir), INPUT=str(src), OUTPUT=str(tmp_path / "out"),
               HYPERPARAMS_FILE=str(_hyper_file(tmp_path)), CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable,
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FORWARD_STEPS="2", EMA="False")
    extra = _tiny_flags() + ["--use_hae", "False", "--batch_size", "4", "--progress", "False"]
    proc = subprocess.run(["bash", str(REPO / "config" / "run_segment.sh"), *extra], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / f"A{seg_subject.RECORD_SUFFIX}").read_text())
    assert record["settings"]["forward_steps"] == 2 and record["settings"]["w"] == 2.0
    missing = subprocess.run(["bash", str(REPO / "config" / "run_segment.sh")], env={**env, "MODEL_DIR": "/nope"},
                             cwd="/", capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--model_dir '/nope' is not a folder" in missing.stderr
    # a training folder with config.json gets no model flags from the launcher (DRY_RUN prints the command)
    from guided_diffusion import fileio

    fileio.write_run_config(tmp_path, "diffusion", {"image_size": SIZE})
    dry = subprocess.run(["bash", str(REPO / "config" / "run_segment.sh")], cwd="/", capture_output=True, text=True,
                         env={**env, "MODEL_DIR": str(tmp_path), "DRY_RUN": "1", "NUM_GPUS": "2", "NNODES": "2"},
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "--nnodes 2" in dry.stdout and "--nproc-per-node 2" in dry.stdout
    assert "-m guided_diffusion segment --preset brats-anofpdm-hae_v2_conservative" in dry.stdout
    assert "--image_size" not in dry.stdout and f"--model_dir {tmp_path}" in dry.stdout


# ------------------------------------------------------------------------------------------------------------
# Per-volume metrics of slice results (translation's test split)


def test_per_volume_metrics_from_shuffled_slices():
    """Slices of two volumes dealt over three batches in a random order give each volume's 3-D metrics."""
    rng = np.random.default_rng(0)
    n, hw = 5, 6
    vols = {}
    for v in ("p1", "p2"):
        gt = np.zeros((n, 1, hw, hw), bool)
        gt[1:3, 0, 1:4, 2:5] = True
        pred = np.zeros_like(gt)
        pred[0:4, 0, 2:5, 2:5] = True  # slice 0 is predicted healthy: the mixed setup drops its mask
        vols[v] = dict(gt=gt, pred_mask=pred, anomaly_map=rng.random(gt.shape).astype(np.float32) + gt,
                       foreground=np.ones_like(gt), label=gt.reshape(n, -1).any(1).astype(np.int64),
                       pred_label=np.array([0, 1, 1, 1, 1]))
    rows = [(v, i) for v in vols for i in range(n)]
    order = rng.permutation(len(rows))
    batches = []
    for chunk in np.array_split(order, 3):
        b = {k: np.stack([vols[rows[j][0]][k][rows[j][1]] for j in chunk]) for k in vols["p1"]}
        b["volume"] = np.array([rows[j][0] for j in chunk])
        batches.append(b)
    got = M.per_volume_metrics(batches)
    assert sorted(got) == ["p1", "p2"]
    for v, d in vols.items():
        mixed = d["pred_mask"] & (d["pred_label"] == 1)[:, None, None, None]
        # by hand: gt 2 slices x 3x3 = 18 voxels; pred on slices 1..3 (slice 0 predicted healthy) 3 x 9 = 27;
        # overlap: slices 1, 2, rows 2..3, columns 2..4 = 12
        assert (got[v]["gt_voxels"], got[v]["pred_voxels"]) == (18, 27)
        assert got[v]["dice"] == pytest.approx((24 + 1e-6) / (45 + 1e-6))
        ref = M.volume_metrics(mixed, d["gt"], d["anomaly_map"], d["foreground"])
        for k in ("dice", "iou", "auprc", "precision", "recall"):
            assert got[v][k] == pytest.approx(ref[k], abs=1e-12), (v, k)
        assert got[v]["n_slices"] == n
    assert list(M.per_volume_metrics(batches, volumes=["p2"])) == ["p2"]


def test_translation_reports_per_volume_metrics_of_its_test_split(tmp_path, monkeypatch):
    import test_translation as tt
    from sklearn.metrics import average_precision_score

    tt._write_dataset(tmp_path / "data")
    tt._write_checkpoint(tmp_path / "model_v2", "v2")
    log_dir = tmp_path / "logs"
    metrics = tt._run(tmp_path, log_dir, "v2", monkeypatch)["metrics"]
    pv = metrics["per_volume"]
    assert (pv["n_volumes"], pv["n_incomplete"]) == (2, 0) and pv["with_lesion"]["dice"]["n"] == 2
    assert "hd95" not in pv["with_lesion"] and "voxel size" in pv["surface_metrics"]  # unknown in slice space
    rows = {r["patient"]: r for r in csv.DictReader(open(log_dir / "per_volume.csv"))}
    assert sorted(rows) == ["test0", "test1"]
    # recompute from the batch files by hand: rows named by slice_file, grouped by patient
    parts = {}
    for f in sorted((log_dir / "batches").glob("test_*.npz")):
        with np.load(f) as z:
            for i, name in enumerate(z["slice_file"]):
                with np.load(tmp_path / "data" / "npy_test" / str(name)) as s:  # the file is the slice of that row
                    np.testing.assert_array_equal(s["y"][0] > 0.5, z["gt"][i])
                mixed = z["mask_0"][i] & bool(z["pred_label_0"][i])
                parts.setdefault(str(name).split("/")[0][8:], []).append(
                    (mixed, z["gt"][i], z["anomaly_map_0"][i], z["foreground"][i]))
    assert {k: len(v) for k, v in parts.items()} == {"test0": 4, "test1": 4}
    for patient, items in parts.items():
        pred, gt, amap, fg = (np.stack(x) for x in zip(*items))
        tp = (pred & gt).sum()
        assert float(rows[patient]["dice"]) == pytest.approx((2 * tp + 1e-6) / (pred.sum() + gt.sum() + 1e-6))
        assert float(rows[patient]["auprc"]) == pytest.approx(average_precision_score(gt[fg], amap[fg]))
    # part of the split only: no complete patient, and metrics.json says why
    metrics = tt._run(tmp_path, tmp_path / "part", "v2", monkeypatch, extra="--num_batches 1")["metrics"]
    assert metrics["per_volume"]["n_volumes"] == 0 and "--num_batches -1" in metrics["per_volume"]["note"]


def test_atlas_layouts_flattened_and_bids(tmp_path):
    """ATLAS subjects as upstream flattened them and as the official BIDS tree, a one-channel model."""
    kw = model_and_diffusion_defaults()
    kw.update(TINY, in_channels=1)
    model, _ = create_model_and_diffusion(**kw)
    (tmp_path / "m").mkdir()
    torch.save(model.state_dict(), tmp_path / "m" / "model000001.pt")
    vols, seg = _subject_arrays(0)
    flat = tmp_path / "flat"
    _save(flat / "sub-r001s001" / "sub-r001s001_T1w.nii.gz", vols["t1"])
    _save(flat / "sub-r001s001" / "sub-r001s001_mask.nii.gz", seg > 0, dtype=np.uint8)
    anat = tmp_path / "bids" / "R002" / "sub-r002s002" / "ses-1" / "anat"
    _save(anat / "sub-r002s002_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", vols["t1"])  # no lesion mask: fine here
    hyper = _hyper_file(tmp_path)
    hyper.write_text(json.dumps({"thr_01": 0.999, "diff_max": [1e-3]}))
    argv = _argv(tmp_path / "m", tmp_path / "out", flat, tmp_path / "bids" / "R002" / "sub-r002s002",
                 extra=["--name", "atlas", "--modality", "0", "--in_channels", "1", "--hyperparams_file", str(hyper)])
    assert seg_cli.main(argv) == 0
    a = json.loads((tmp_path / "out" / f"sub-r001s001{seg_subject.RECORD_SUFFIX}").read_text())
    b = json.loads((tmp_path / "out" / f"sub-r002s002{seg_subject.RECORD_SUFFIX}").read_text())
    assert a["metrics"]["volume"]["gt_voxels"] == 48 and b["metrics"] is None
    assert list(a["inputs"]) == ["t1", "seg"] and b["inputs"]["t1"].endswith("_T1w.nii.gz")
    for name in ("sub-r001s001", "sub-r002s002"):
        assert nib.load(str(tmp_path / "out" / f"{name}{seg_subject.MASK_SUFFIX}")).shape == SHAPE


def test_bad_hyperparameter_files_are_named(tmp_path, model_dir, capsys):
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    for text, what in (("{not json", "cannot be read as JSON"), (json.dumps({"thr_01": 0.9}), "do not fit")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(SystemExit) as exc:  # a user error: one message, exit code 2
            seg_cli.main(_argv(model_dir, tmp_path / "out", src, extra=["--hyperparams_file", str(bad)]))
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert str(bad) in err and what in err, err
    assert not list((tmp_path / "out").glob("A_*"))


def test_model_from_the_checkpoint_folders_config(tmp_path, model_dir, capsys):
    """A training folder's config.json says which model it holds: no model flags needed; a contradicting one is an
    error naming both values."""
    from guided_diffusion import fileio

    folder = tmp_path / "trained"
    shutil.copytree(model_dir, folder)
    flags = model_and_diffusion_defaults()
    flags.update(TINY, clf_free=True)
    fileio.write_run_config(folder, "diffusion", flags, {"ema_rate": "0.9999"})
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    hyper = ["--hyperparams_file", str(_hyper_file(tmp_path))]
    argv = _argv(folder, tmp_path / "out", src, extra=hyper)
    for flag in _tiny_flags()[::2]:  # drop every model flag
        i = argv.index(flag)
        del argv[i:i + 2]
    assert "--image_size" not in argv and seg_cli.main(argv) == 0
    a = np.asanyarray(nib.load(str(tmp_path / "out" / f"A{seg_subject.MAP_SUFFIX}")).dataobj)
    assert seg_cli.main(_argv(model_dir, tmp_path / "flags", src, extra=hyper)) == 0  # same model from flags
    np.testing.assert_array_equal(a, np.asanyarray(nib.load(str(tmp_path / "flags" / f"A{seg_subject.MAP_SUFFIX}")).dataobj))
    with pytest.raises(SystemExit) as e:
        seg_cli.main(argv + ["--num_channels", "64"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--num_channels 64" in err and "config.json: 32" in err, err


def test_map_is_zero_outside_the_brain_unless_raw_map(tmp_path, model_dir):
    """The written map is the model's map inside the brain (any input voxel > 0) and zero outside; --raw_map True
    writes upstream's map everywhere. The mask and the metrics (scored over the brain) are the same."""
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    hyper = ["--hyperparams_file", str(_hyper_file(tmp_path))]
    assert seg_cli.main(_argv(model_dir, tmp_path / "zero", src, extra=hyper)) == 0
    assert seg_cli.main(_argv(model_dir, tmp_path / "raw_map", src, extra=hyper + ["--raw_map", "True"])) == 0
    read = lambda folder, suffix: np.asanyarray(nib.load(str(tmp_path / folder / f"A{suffix}")).dataobj)  # noqa: E731
    zero, raw = read("zero", seg_subject.MAP_SUFFIX), read("raw_map", seg_subject.MAP_SUFFIX)
    vols, _ = _subject_arrays(0)
    brain = np.mean([vols[m] for m in pp.MODALITIES], axis=0) > 0
    assert raw[~brain][raw[~brain] != 0].size > 0.5 * (~brain[..., 2:8]).sum()  # upstream: background has values
    np.testing.assert_array_equal(zero, np.where(brain, raw, 0))
    np.testing.assert_array_equal(read("zero", seg_subject.MASK_SUFFIX), read("raw_map", seg_subject.MASK_SUFFIX))
    rec = {k: json.loads((tmp_path / k / f"A{seg_subject.RECORD_SUFFIX}").read_text()) for k in ("zero", "raw_map")}
    assert rec["zero"]["metrics"]["volume"] == rec["raw_map"]["metrics"]["volume"]
    assert rec["zero"]["anomaly_map"] == "zero outside the brain" and rec["raw_map"]["anomaly_map"].startswith("raw")
