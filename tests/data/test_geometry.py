"""Scans in any orientation and spacing: the canonical frame against nibabel's own reorientation, mask ties decided
the same way in every storage direction, the file's shape kept, and whole-volume segmentation with a real (tiny,
random) model giving the same map and mask in physical space for permuted and flipped copies of one subject, with
warnings for oblique and anisotropic ones."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio

from guided_diffusion import fileio
from guided_diffusion.data import geometry as geo
from guided_diffusion.data import nifti
from guided_diffusion.data import preprocess as pp
from guided_diffusion.commands import segment as seg_cli
from guided_diffusion.evaluation.volumes import subject as seg_subject
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def _all_axcodes():
    for perm in itertools.permutations(("LR", "AP", "SI")):
        for picks in itertools.product((0, 1), repeat=3):
            yield "".join(pair[k] for pair, k in zip(perm, picks))


class _Img:
    """A header stand-in: what scan_geometry reads (affine, shape, voxel sizes)."""

    def __init__(self, affine, shape):
        self.affine = np.asarray(affine, float)
        self.shape = shape
        self.header = nib.Nifti1Header()
        self.header.set_data_shape(shape)
        self.header.set_zooms(tuple(np.sqrt((self.affine[:3, :3] ** 2).sum(0))) + (1.0,) * (len(shape) - 3))


# ------------------------------------------------------------------------------------------------------------
# The canonical frame


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI"])
def test_canonical_frame_is_nibabels_reorientation_and_is_undone_exactly(orientation):
    """For every one of the 48 axis-aligned storages, ``to_canonical`` gives what nibabel's ``as_reoriented`` gives
    (the same array, an affine whose axis codes are the canonical ones), and ``to_stored`` undoes it bit for bit."""
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    data = rng.random(shape)
    for codes in _all_axcodes():
        affine = np.eye(4)
        affine[:3, 3] = [10.0, -20.0, 5.0]
        for i, (c, size) in enumerate(zip(codes, (0.9, 1.1, 2.0))):  # anisotropic voxels
            affine[:3, i] = 0
            affine["RASLPI".index(c) % 3, i] = size if c in "RAS" else -size
        img = nib.Nifti1Image(data, affine)
        assert "".join(nib.aff2axcodes(img.affine)) == codes
        g = geo.scan_geometry(img, orientation)
        want = img.as_reoriented(nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(tuple(orientation))))
        assert "".join(nib.aff2axcodes(want.affine)) == orientation
        got = g.to_canonical(data)
        np.testing.assert_array_equal(got, np.asanyarray(want.dataobj))
        assert got.flags["C_CONTIGUOUS"] and g.shape == want.shape
        np.testing.assert_allclose(g.canonical_voxel_size_mm, want.header.get_zooms()[:3], rtol=1e-6)
        stacked = np.stack([data, -data])  # leading channel axis stays
        np.testing.assert_array_equal(g.to_stored(g.to_canonical(stacked)), stacked)
        assert g.axcodes == codes and g.obliquity_deg == pytest.approx(0, abs=1e-6)
        assert g.record()["slice_axis"]["stored_axis"] == next(i for i, c in enumerate(codes) if c in "SI")


def test_brats_storage_gives_upstreams_slices_bit_for_bit():
    """A volume stored as BraTS 2021 stores it (LPS; its affine) is sliced exactly as upstream sliced the array."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [0, 239, 0]  # BraTS 2021's affine
    rng = np.random.default_rng(1)
    volume = np.zeros((4, 24, 20, 12))
    volume[:, 4:20, 3:17, 2:10] = rng.uniform(1, 50, size=(4, 16, 14, 8))
    mask = np.zeros((24, 20, 12))
    mask[8:12, 6:9, 4:6] = 1
    g = geo.scan_geometry(_Img(affine, (24, 20, 12)), geo.resolve_orientation("", "brats"))
    assert g.axcodes == "LPS" and g.is_identity
    a = pp.prepare_slices(volume.copy(), mask, 8, geometry=g)
    b = pp.prepare_slices(volume.copy(), mask, 8)  # upstream: the array as stored
    assert (a.start, a.stop, a.shape) == (b.start, b.stop, b.shape)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)


def test_orientation_setting_is_checked_and_defaults_per_data_set():
    assert geo.resolve_orientation("", "brats") == "LPS" and geo.resolve_orientation("", "atlas") == "RAS"
    assert geo.resolve_orientation("ras") == "RAS" and geo.resolve_orientation("Stored") == geo.STORED
    for bad, what in (("LPSX", "three axis codes"), ("LLS", "three axis codes"), ("LSP", "last axis must be S or I"),
                      ("xyz", "three axis codes")):
        with pytest.raises(ValueError, match=what) as e:
            geo.resolve_orientation(bad)
        assert "--orientation" in str(e.value)


def test_oblique_and_far_scans_are_warned_about():
    """Obliquity is the angle of the array axes to the world axes; voxel size and field of view are compared per
    world axis with the training data's, whatever the storage."""
    ref = geo.DATASET_GEOMETRY["brats"]  # 1 mm, 240 x 240 x 155 mm
    c, s = math.cos(math.radians(25)), math.sin(math.radians(25))
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    g = geo.scan_geometry(_Img(rot @ lps, (240, 240, 155)), "LPS")
    assert g.obliquity_deg == pytest.approx(25, abs=1e-6) and g.is_identity  # closest axes: still LPS
    notes = g.warnings("X", ref)
    assert len(notes) == 1 and "25 degrees oblique" in notes[0]
    assert geo.scan_geometry(_Img(lps, (240, 240, 155)), "LPS").warnings("X", ref) == []
    # stored ASR (sagittal slices along the last array axis) with 3 mm voxels along left-right: in the canonical
    # LPS frame the slices are axial again and the coarse axis is in-plane
    asr = np.array([[0, 0, 3.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # stored axes: A, S, R
    g = geo.scan_geometry(_Img(asr, (240, 155, 80)), "LPS")
    assert g.axcodes == "ASR" and g.shape == (80, 240, 155) and g.canonical_voxel_size_mm == (3.0, 1.0, 1.0)
    notes = g.warnings("X", ref)
    assert len(notes) == 1 and "3 mm along the left-right axis" in notes[0] and "3 times" in notes[0]
    # half the field of view in-plane: the brain fills twice the slice
    g = geo.scan_geometry(_Img(lps, (120, 240, 155)), "LPS")
    notes = g.warnings("X", ref)
    assert len(notes) == 1 and "field of view 120 x 240 mm" in notes[0]


# ------------------------------------------------------------------------------------------------------------
# Mask ties and the file's shape


def test_mask_ties_fall_the_same_way_in_every_storage_direction():
    """A 10x20 square on 32x32 slices resized back to 240x240: every fifteenth row of the bilinear resize lands on
    0.5 exactly, where float32 rounding differs between the two storage directions of the same brain (upstream and
    the resize-then-threshold in the stored frame disagree there). Decided in the canonical frame, the RAS and LPS
    copies agree voxel for voxel in physical space, and with the decided voxels of the exact interpolation."""
    size, hw, depth = 32, 240, 3
    mask = np.zeros((1, 1, size, size), bool)
    mask[0, 0, 9:19, 5:25] = True  # edges where the resize's sample points fall half-way: exact ties
    ras = _Img(np.eye(4), (hw, hw, depth))
    lps = _Img(np.diag([-1.0, -1.0, 1.0, 1.0]), (hw, hw, depth))
    results = {}
    for name, img in (("ras", ras), ("lps", lps)):
        g = geo.scan_geometry(img, "LPS")
        prepared = pp.PreparedSlices(np.zeros((1, 1, size, size)), None, 1, 2, 0, g.shape, g)
        results[name] = nifti.mask_to_volume(mask, prepared)
    flipped_back = results["lps"][::-1, ::-1]  # LPS storage -> RAS storage (independent of the code under test)
    np.testing.assert_array_equal(results["ras"], flipped_back)

    # The hazard is real: thresholding in each stored frame (the old way) disagrees on the tie voxels.
    def stored_frame(flip: bool) -> np.ndarray:
        m = torch.from_numpy(mask[..., ::-1, ::-1].copy() if flip else mask).float()
        out = (pp.resize_slices(m, (hw, hw))[0, 0].numpy() > 0.5)
        return out[::-1, ::-1] if flip else out

    assert (stored_frame(False) != stored_frame(True)).sum() > 100
    # Where the exact bilinear value is not a tie, the result is the exact decision (numpy's interp as reference).
    coords = (np.arange(hw) + 0.5) * size / hw - 0.5
    grid = np.arange(size)
    fu = np.interp(coords, grid, ((grid >= 9) & (grid < 19)).astype(float))
    fv = np.interp(coords, grid, ((grid >= 5) & (grid < 25)).astype(float))
    value = (fu[:, None] * fv[None, :])[::-1, ::-1]  # canonical LPS frame -> RAS storage: both in-plane axes reversed
    decided = np.abs(value - 0.5) > 1e-6
    assert (~decided).sum() > 100  # many ties
    np.testing.assert_array_equal(results["ras"][..., 1].astype(bool)[decided], (value > 0.5)[decided])
    assert not results["ras"][..., [0, 2]].any()


def test_outputs_keep_a_trailing_singleton_axis(tmp_path):
    """An input of shape (240, 240, 155, 1) gets its results back as (240, 240, 155, 1), on its grid."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [0, 239, 0]
    ref_path = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((240, 240, 155, 1), np.uint8), affine), str(ref_path))
    ref = nifti.load_reference(ref_path)
    mask = np.zeros((240, 240, 155), np.uint8)
    mask[100:110, 50:60, 70] = 1
    nifti.save_like(tmp_path / "mask.nii.gz", mask, ref, np.uint8, "mask")
    out = nib.load(str(tmp_path / "mask.nii.gz"))
    assert out.shape == (240, 240, 155, 1)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj)[..., 0], mask)
    np.testing.assert_array_equal(out.affine, ref.affine)


# ------------------------------------------------------------------------------------------------------------
# Whole-volume segmentation with a real model

SIZE = 32
SHAPE = (40, 40, 24)  # stored LPS, 6 mm voxels: a 240 x 240 x 144 mm field of view
ZOOM = 6.0


def _base_affine() -> np.ndarray:
    a = np.diag([-ZOOM, -ZOOM, ZOOM, 1.0])  # LPS, as BraTS stores its volumes
    a[:3, 3] = [117.0, 117.0, -60.0]
    return a


def _brain(seed: int = 0):
    """Four modalities of an asymmetric ellipsoidal 'brain' with texture, a bright lesion off-centre on FLAIR/T2
    (dark on T1), and its label. Upside-down or mirrored slices of it look different."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij")
    inside = ((i - 19) / 15) ** 2 + ((j - 21) / 17) ** 2 + ((k - 11) / 9) ** 2 < 1
    ramp = 1 + 0.02 * i + 0.01 * j  # asymmetric in both in-plane directions
    lesion = ((i - 12) / 4) ** 2 + ((j - 27) / 4) ** 2 + ((k - 12) / 3) ** 2 < 1
    vols = {}
    for c, m in enumerate(pp.MODALITIES):
        v = (100 + 30 * c) * ramp * (1 + 0.2 * rng.standard_normal(SHAPE))
        v *= 1 + (0.8 if m in ("flair", "t2") else -0.5 if m == "t1" else 0.3) * lesion
        vols[m] = np.where(inside, np.abs(v), 0).astype(np.float32)
    return vols, (lesion & inside).astype(np.uint8)


def _write(root: Path, name: str, vols: dict, seg: np.ndarray, affine: np.ndarray, ornt=None, trailing=False) -> Path:
    """The subject stored as given, or reoriented by ``ornt`` (nibabel's as_reoriented: the same brain in the world)."""
    d = root / name
    d.mkdir(parents=True)
    for key, arr in list(vols.items()) + [("seg", seg)]:
        img = nib.Nifti1Image(arr, affine)
        if ornt is not None:
            img = img.as_reoriented(ornt)
        if trailing:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine)
        nib.save(img, str(d / f"{name}_{key}.nii.gz"))
    return d


def _to_base(path: Path, base_affine: np.ndarray) -> np.ndarray:
    """An output brought onto the base subject's storage with nibabel (independent of the code under test)."""
    img = nib.load(str(path))
    if len(img.shape) > 3:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine)
    img = img.as_reoriented(nio.ornt_transform(nio.io_orientation(img.affine), nio.io_orientation(base_affine)))
    np.testing.assert_allclose(img.affine, base_affine, atol=1e-4)  # the same grid in the world
    return np.asanyarray(img.dataobj)


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> Path:
    """A small randomly initialised v2 UNet at 32 px (output layer not zero), as a checkpoint folder with config.json."""
    folder = tmp_path_factory.mktemp("model")
    flags = model_and_diffusion_defaults()
    flags.update(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                 in_channels=4, class_cond=True, num_classes=2, unet_ver="v2", clf_free=True)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{k: v for k, v in flags.items() if k in model_and_diffusion_defaults()})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "model000010.pt")
    fileio.write_run_config(folder, "diffusion", flags, {"ema_rate": "0.9999"})
    return folder




def _segment(model: Path, src: Path, out: Path, hyper: Path, data_dir: Path, *extra) -> dict:
    argv = ["--model_dir", str(model), "--input", str(src), "--output", str(out), "--hyperparams_file", str(hyper),
            "--data_dir", str(data_dir), "--w", "2", "--forward_steps", "2", "--timestep_respacing", "ddim10",
            "--d_reverse", "True", "--modality", "0", "3", "--batch_size", "8", "--progress", "False",
            "--overlay_slices", "1", *extra]
    assert seg_cli.main(argv) == 0
    name = src.name
    return json.loads((out / f"{name}{seg_subject.RECORD_SUFFIX}").read_text())


def test_permuted_flipped_oblique_and_anisotropic_copies_with_a_real_model(tmp_path, real_model):
    vols, seg = _brain()
    base = _base_affine()
    # training data: preprocessed copies of this subject, so its spacing and field of view are the training data's
    for n in range(4):
        _write(tmp_path / "train_raw", f"T{n}", vols, seg, base)
    pp.preprocess(tmp_path / "train_raw", image_size=SIZE, output=tmp_path / "train", progress=False)
    hyper = tmp_path / "hyper.json"
    hyper.write_text(json.dumps({"thr_01": 1.0, "diff_max": [1e-3, 1e-3]}))  # every slice unhealthy: masks

    c, s = math.cos(math.radians(25)), math.sin(math.radians(25))
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    copies = {  # folder -> (affine, ornt, trailing axis); the subject's name is the same in each (same noise)
        "base": (base, None, False),
        "psl": (base, [[2, 1], [0, 1], [1, 1]], False),  # permuted (the reorientation): sagittal slices last
        "ras": (base, [[0, -1], [1, -1], [2, 1]], False),  # flipped left-right and front-back
        "irp": (base, [[1, -1], [2, 1], [0, -1]], False),  # permuted and flipped
        "trailing": (base, None, True),  # shape (40, 40, 24, 1)
        "oblique": (rot @ base, None, False),  # rotated 25 degrees about the vertical axis
    }
    records, maps, masks = {}, {}, {}
    for key, (affine, ornt, trailing) in copies.items():
        src = _write(tmp_path / key, "P", vols, seg, affine, ornt, trailing)
        out = tmp_path / f"out_{key}"
        records[key] = _segment(real_model, src, out, hyper, tmp_path / "train")
        if key == "oblique":  # a rotated brain: compared voxel by voxel (the same slices reach the network)
            maps[key] = np.asanyarray(nib.load(str(out / f"P{seg_subject.MAP_SUFFIX}")).dataobj)
            masks[key] = np.asanyarray(nib.load(str(out / f"P{seg_subject.MASK_SUFFIX}")).dataobj)
        else:
            maps[key] = _to_base(out / f"P{seg_subject.MAP_SUFFIX}", base)
            masks[key] = _to_base(out / f"P{seg_subject.MASK_SUFFIX}", base)
        if trailing:
            assert nib.load(str(out / f"P{seg_subject.MAP_SUFFIX}")).shape == SHAPE + (1,)
            assert nib.load(str(out / f"P{seg_subject.MASK_SUFFIX}")).shape == SHAPE + (1,)

    brain = vols["flair"] > 0
    assert maps["base"][brain].any() and not maps["base"][~brain].any()  # zero outside the brain
    assert 0 < masks["base"].sum() < brain.sum()  # a mask with something in it, not everything
    for key in ("psl", "ras", "irp", "trailing", "oblique"):
        np.testing.assert_array_equal(maps[key], maps["base"], err_msg=key)
        np.testing.assert_array_equal(masks[key], masks["base"], err_msg=key)
        for part in ("kept", "unhealthy"):
            assert records[key]["slices"][part] == records["base"]["slices"][part], key
    assert records["base"]["warnings"] == []  # the training data's own geometry
    assert records["psl"]["warnings"] == [] and records["psl"]["geometry"]["stored"]["axcodes"] == "PSL"
    assert records["psl"]["geometry"]["slice_axis"] == {"stored_axis": 1, "reversed": False}
    assert records["irp"]["geometry"]["slice_axis"] == {"stored_axis": 0, "reversed": True}
    assert records["psl"]["geometry"]["canonical"]["shape"] == list(SHAPE)
    assert records["trailing"]["geometry"]["stored"]["shape"] == list(SHAPE) + [1]
    assert len(records["oblique"]["warnings"]) == 1 and "25 degrees oblique" in records["oblique"]["warnings"][0]
    training = records["base"]["geometry"]["training"]
    assert training["voxel_size_mm"] == {"LR": ZOOM, "AP": ZOOM, "IS": ZOOM} and "train subjects" in training["source"]

    # Negative control: slicing the permuted copy as stored (upstream) gives another map.
    src = tmp_path / "psl" / "P"
    stored = _segment(real_model, src, tmp_path / "out_stored", hyper, tmp_path / "train", "--orientation", "stored")
    other = _to_base(tmp_path / "out_stored" / f"P{seg_subject.MAP_SUFFIX}", base)
    assert stored["slices"]["n_kept"] == 29 and stored["geometry"]["slice_axis"]["stored_axis"] == 2  # sagittal
    assert np.abs(other - maps["base"]).max() > 0.2 * maps["base"].max()

    # Anisotropic: every third voxel along left-right (18 mm): a warning, and a map on its own grid that follows
    # the base map where both have voxels.
    aniso_affine = base.copy()
    aniso_affine[:3, 0] *= 3
    aniso_affine[:3, 3] += base[:3, 0] * 1  # voxel 0 of the copy is voxel 1 of the base
    sub = {m: v[1::3] for m, v in vols.items()}
    src = _write(tmp_path / "aniso", "P", sub, seg[1::3], aniso_affine)
    rec = _segment(real_model, src, tmp_path / "out_aniso", hyper, tmp_path / "train")
    assert len(rec["warnings"]) == 1 and "18 mm along the left-right axis" in rec["warnings"][0]
    amap = np.asanyarray(nib.load(str(tmp_path / "out_aniso" / f"P{seg_subject.MAP_SUFFIX}")).dataobj)
    assert amap.shape == sub["flair"].shape and not amap[sub["flair"] == 0].any()
    both = (sub["flair"] > 0) & (maps["base"][1::3] > 0)
    r = np.corrcoef(amap[both], maps["base"][1::3][both])[0, 1]
    assert r > 0.5, r
