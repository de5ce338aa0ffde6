"""Preprocessing: upstream semantics on hand-made volumes, layouts, splits, bad inputs, resume and atomicity."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion.data import preprocess as pp
from guided_diffusion.data.loaders import get_data_iter

REPO = Path(__file__).resolve().parents[2]
SHAPE = (12, 10, 9)


# BraTS 2021 stores its volumes LPS (first axis towards the patient's left, second towards posterior), the default
# canonical orientation of --name brats: such volumes are sliced as stored, exactly as upstream did.
BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
ATLAS_AFFINE = np.eye(4)  # ATLAS v2.0 (MNI152NLin2009aSym grid) is stored RAS, the default for --name atlas


def _save(path: Path, arr: np.ndarray, affine=BRATS_AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), affine), str(path))


def _volumes(seed: int, shape=SHAPE, lesion=True):
    """Four modalities with brain in z 2..6 and a 4x4 lesion at z=4 (seg labels 1/2/4)."""
    rng = np.random.default_rng(seed)
    vols = {}
    for i, m in enumerate(pp.MODALITIES):
        v = np.zeros(shape, np.float32)
        v[2:10, 2:8, 2:7] = rng.uniform(1, 100, size=(8, 6, 5)) * (i + 1)
        vols[m] = v
    seg = np.zeros(shape, np.float32)
    if lesion:
        seg[4:8, 3:7, 4] = 2
        seg[5:7, 4:6, 4] = 4
        seg[5, 4, 4] = 1
    return vols, seg


def _brats_subject(src: Path, name: str, seed: int, lesion=True, skip=()):
    vols, seg = _volumes(seed, lesion=lesion)
    for m, v in vols.items():
        if m not in skip:
            _save(src / name / f"{name}_{m}.nii.gz", v)
    _save(src / name / f"{name}_seg.nii.gz", seg)
    return vols, seg


@pytest.fixture()
def brats(tmp_path):
    src = tmp_path / "BraTS21"
    for i in range(20):
        _brats_subject(src, f"BraTS2021_{i:05d}", i, lesion=i % 3 != 0)
    return src


def _slices(root: Path, split: str):
    return sorted(root.glob(f"npy_{split}/patient_*/slice_*.npz"))


def test_upstream_semantics_exact(brats):
    summary = pp.preprocess(brats, image_size=8, workers=1, progress=False)
    root = brats.parent / "preprocessed_data_all_00_8"  # upstream's default name and place
    assert Path(summary["output"]) == root
    # Split: random.seed(10) shuffle of the sorted listing, int(75%) / int(5%) / rest.
    names = sorted(p.name for p in brats.iterdir())
    idx = list(range(20))
    random.seed(10)
    random.shuffle(idx)
    for split, part in (("train", idx[:15]), ("val", idx[15:16]), ("test", idx[16:])):
        csv = (root / "data_splits" / split / "scans.csv").read_text()
        assert csv == "\n".join(names[i] for i in part)  # no trailing newline, as upstream
        assert summary["splits"][split]["patients"] == len(part)
        assert sorted(p.name for p in (root / f"npy_{split}").iterdir()) == sorted(f"patient_{names[i]}" for i in part)

    name = names[idx[0]]
    vols, seg = _volumes(idx[0], lesion=idx[0] % 3 != 0)
    files = sorted((root / "npy_train" / f"patient_{name}").iterdir(), key=lambda p: int(p.name[6:-4]))
    assert [f.name for f in files] == [f"slice_{z}.npz" for z in range(2, 7)]  # brain-slice range, original z
    stack = np.stack([vols[m] for m in pp.MODALITIES]).astype(np.float64)
    p99 = [np.quantile(c[c > 0], 0.99) for c in stack]
    for f in files:
        z = int(f.name[6:-4])
        d = np.load(f)
        assert d["x"].shape == (1, 4, 8, 8) and d["x"].dtype == np.float64
        assert d["y"].shape == (1, 1, 8, 8) and d["y"].dtype == np.float32
        # 12x10 -> 8x8 bilinear: compare against torch on the p99-scaled slice (no clipping: max > 1 allowed)
        import torch
        import torch.nn.functional as F
        ref = torch.from_numpy(np.stack([stack[c, :, :, z] / p99[c] for c in range(4)])[None])
        np.testing.assert_allclose(d["x"], F.interpolate(ref, size=(8, 8), mode="bilinear").numpy(), rtol=1e-12)
        yref = torch.from_numpy((seg[:, :, z] > 0.5).astype(np.float32)[None, None])
        np.testing.assert_allclose(d["y"], F.interpolate(yref, size=(8, 8), mode="bilinear").numpy(), rtol=1e-6)
    total = sum(s["healthy_slices"] + s["unhealthy_slices"] for s in summary["splits"].values())
    assert total == 20 * 5
    unhealthy = sum(s["unhealthy_slices"] for s in summary["splits"].values())
    assert unhealthy == sum(1 for i in range(20) if i % 3 != 0)  # one lesion slice per tumour subject
    assert (root / pp.SUMMARY_FILE).exists() and summary["errors"] == []
    # upstream's one validation subject (index 0) has no lesion: said at once, with the fix
    assert len(summary["warnings"]) == 1 and "validation split has no slice with a lesion" in summary["warnings"][0]
    assert "--min_val_lesion_subjects 1" in summary["warnings"][0]

    # The loaders read it: labels from the mask at 0.5, per-slice min-max to [-1, 1].
    loader = get_data_iter("brats", root, 4, "test", mixed=True)
    labs = []
    for x, gt, lab in loader:
        assert x.min() >= -1 and x.max() <= 1 and x.shape[1:] == (4, 8, 8)
        labs += lab.tolist()
    assert sum(labs) == summary["splits"]["test"]["unhealthy_slices"]
    assert len(labs) - sum(labs) == summary["splits"]["test"]["healthy_slices"]


def test_single_modality_trim_and_name(brats, tmp_path):
    out = tmp_path / "out"
    pp.preprocess(brats, mod="flair", first=2, last=1, image_size=8, output=out, progress=False)
    assert not (brats.parent / "preprocessed_data_flair_21_8").exists()  # --output wins
    d = np.load(_slices(out, "train")[0])
    assert d["x"].shape == (1, 1, 8, 8)
    assert pp.default_output_dir(brats, "flair", 2, 1, 8).name == "preprocessed_data_flair_21_8"
    vol = np.arange(10)[None, None, :]
    assert pp.trim_slices(vol, 2, 1).ravel().tolist() == list(range(2, 9))
    assert pp.trim_slices(vol, 0, 0).ravel().tolist() == list(range(10))


def test_output_inside_source_is_not_a_subject(brats):
    first = pp.preprocess(brats, image_size=8, output=brats / "pre", progress=False)
    again = pp.preprocess(brats, image_size=8, output=brats / "pre", progress=False)
    assert first["errors"] == again["errors"] == []
    assert sum(s["patients"] for s in again["splits"].values()) == 20


def test_resume_skips_done_subjects(brats):
    first = pp.preprocess(brats, image_size=8, progress=False)
    root = Path(first["output"])
    some = _slices(root, "train")[0]
    mtime = some.stat().st_mtime_ns
    (root / "npy_train" / ".tmp-patient_X-deadbeef").mkdir()  # left by a killed run
    again = pp.preprocess(brats, image_size=8, workers=2, progress=False)
    assert some.stat().st_mtime_ns == mtime
    assert not list(root.glob("npy_*/.*"))  # no temp folder, old or new scheme
    for split in pp.SPLITS:
        assert again["splits"][split]["skipped"] == first["splits"][split]["patients"]
        for k in ("patients", "healthy_slices", "unhealthy_slices"):
            assert again["splits"][split][k] == first["splits"][split][k]


def test_failing_subject_leaves_no_partial_folder(brats, monkeypatch):
    calls = {"n": 0}
    real = np.savez_compressed

    def flaky(path, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(path, **kw)

    monkeypatch.setattr(pp.np, "savez_compressed", flaky)
    summary = pp.preprocess(brats, image_size=8, workers=1, progress=False)
    root = Path(summary["output"])
    assert len(summary["errors"]) == 1 and "disk full" in summary["errors"][0]
    assert sum(s["failed"] for s in summary["splits"].values()) == 1
    assert len(list(root.glob("npy_*/patient_*"))) == 19
    assert not list(root.glob("npy_*/.*"))  # no temp folder, old or new scheme
    for d in root.glob("npy_*/patient_*"):
        assert len(list(d.iterdir())) == 5  # every written subject is complete
    monkeypatch.setattr(pp.np, "savez_compressed", real)
    fixed = pp.preprocess(brats, image_size=8, progress=False)  # rerun completes the missing one
    assert fixed["errors"] == [] and len(list(root.glob("npy_*/patient_*"))) == 20


def test_bad_inputs_are_reported_and_others_survive(tmp_path):
    src = tmp_path / "raw"
    for i in range(8):
        _brats_subject(src, f"S{i}", i)
    (src / "README.txt").write_text("stray")
    # missing modality
    (src / "S1" / "S1_t1ce.nii.gz").unlink()
    # corrupt: not a NIfTI at all
    (src / "S2" / "S2_t2.nii.gz").write_bytes(b"this is not a nifti file")
    # truncated gzip
    raw = (src / "S3" / "S3_flair.nii.gz").read_bytes()
    (src / "S3" / "S3_flair.nii.gz").write_bytes(raw[: len(raw) // 2])
    # shape mismatch between a modality and the mask
    _save(src / "S4" / "S4_seg.nii.gz", np.zeros((12, 10, 8)))
    # all-zero and NaN volumes
    _save(src / "S5" / "S5_t1.nii.gz", np.zeros(SHAPE))
    nan = _volumes(6)[0]["t2"]
    nan[3, 3, 3] = np.nan
    _save(src / "S6" / "S6_t2.nii.gz", nan)

    out = tmp_path / "out"
    summary = pp.preprocess(src, image_size=8, output=out, workers=2, progress=False)
    errors = "\n".join(summary["errors"])
    assert len(summary["errors"]) == 6
    expect = {
        "S1": ("S1_t1ce.nii.gz", "missing"),
        "S2": ("S2_t2.nii.gz", "cannot read"),
        "S3": ("S3_flair.nii.gz", "cannot read"),
        "S4": ("S4_seg.nii.gz", "differ in shape"),
        "S5": ("S5_t1.nii.gz", "all zero"),
        "S6": ("S6_t2.nii.gz", "NaN"),
    }
    for subject, (file, what) in expect.items():
        line = next(e for e in summary["errors"] if f"subject {subject}:" in e)
        assert file in line and what in line, line
    assert "README.txt" in "\n".join(summary["warnings"]) and "stray" in "\n".join(summary["warnings"])
    done = sorted(p.name for p in out.glob("npy_*/patient_*"))
    assert done == ["patient_S0", "patient_S7"]
    assert not list(out.glob("npy_*/.*"))
    assert sum(s["failed"] for s in summary["splits"].values()) == 6, errors


def test_unusable_source_and_output(tmp_path, brats):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        pp.preprocess(brats, image_size=8, output=blocker / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pp.preprocess(tmp_path / "missing", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no subject folders"):
        pp.preprocess(empty, progress=False)
    with pytest.raises(ValueError, match="--mod"):
        pp.preprocess(brats, mod="pd", progress=False)
    with pytest.raises(ValueError, match="--name"):
        pp.preprocess(brats, name="mslub", progress=False)


def test_existing_splits_are_reused(brats, tmp_path):
    out = tmp_path / "out"
    splits_dir = out / "data_splits"
    for split, names in (("train", ["BraTS2021_00003", "BraTS2021_00004"]), ("val", ["BraTS2021_00005"]),
                         ("test", ["BraTS2021_00006", "gone"])):
        (splits_dir / split).mkdir(parents=True)
        (splits_dir / split / "scans.csv").write_text("\n".join(names))
    summary = pp.preprocess(brats, image_size=8, output=out, progress=False)
    assert [summary["splits"][s]["patients"] for s in pp.SPLITS] == [2, 1, 1]
    assert any("gone" in w for w in summary["warnings"])  # listed but not in the source
    assert any("BraTS2021_00000" in w and "not in" in w for w in summary["warnings"])


def _atlas_arrays(seed):
    vols, seg = _volumes(seed)
    return vols["t1"], (seg > 0).astype(np.float32)


def test_atlas_flattened_and_bids_layouts_agree(tmp_path):
    flat, bids = tmp_path / "flat" / "raw2", tmp_path / "bids" / "ATLAS_2" / "Training"
    for i in range(4):
        t1, mask = _atlas_arrays(i)
        p = f"sub-r00{i}s00{i}"
        _save(flat / p / f"{p}_T1w.nii.gz", t1, ATLAS_AFFINE)
        _save(flat / p / f"{p}_mask.nii.gz", mask, ATLAS_AFFINE)
        anat = bids / f"R00{i % 2}" / p / "ses-1" / "anat"
        _save(anat / f"{p}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", t1, ATLAS_AFFINE)
        _save(anat / f"{p}_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz", mask, ATLAS_AFFINE)
    (bids.parent / "dataset_description.json").write_text("{}")
    (bids / "participants.tsv").write_text("")
    s_flat = pp.preprocess(flat, name="atlas", image_size=8, progress=False)  # --mod all -> t1 for ATLAS
    s_bids = pp.preprocess(bids, name="atlas", mod="t1", image_size=8, progress=False)
    root_flat, root_bids = Path(s_flat["output"]), Path(s_bids["output"])
    assert root_flat.name == root_bids.name == "preprocessed_data_t1_00_8"
    assert s_flat["splits"] == s_bids["splits"] and s_bids["errors"] == []
    a = [p.relative_to(root_flat) for p in sorted(root_flat.glob("npy_*/*/*.npz"))]
    b = [p.relative_to(root_bids) for p in sorted(root_bids.glob("npy_*/*/*.npz"))]
    assert a == b and len(a) == 4 * 5
    for rel in a:
        x1, x2 = np.load(root_flat / rel), np.load(root_bids / rel)
        assert x1["x"].shape == (1, 1, 8, 8)
        np.testing.assert_array_equal(x1["x"], x2["x"])
        np.testing.assert_array_equal(x1["y"], x2["y"])
    with pytest.raises(ValueError, match="only T1w"):
        pp.preprocess(flat, name="atlas", mod="flair", progress=False)


def test_script_exit_codes(tmp_path):
    src = tmp_path / "raw"
    for i in range(3):
        _brats_subject(src, f"S{i}", i)
    cmd = [sys.executable, str(REPO / "scripts" / "preprocess.py"), "--source", str(src), "--image_size", "8"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "preprocessed_data_all_00_8" / "npy_train").is_dir()
    bad = subprocess.run(cmd[:-2] + ["--image_size", "0"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--image_size" in bad.stderr


def test_validation_lesion_option(tmp_path):
    """Off by default (upstream's split); on, the first lesion subject of train swaps with a healthy val subject."""
    names = [f"BraTS2021_{i:05d}" for i in range(20)]
    perm = list(range(20))
    random.Random(10).shuffle(perm)  # upstream: random.seed(10); random.shuffle(sorted listing)
    train, val, test = perm[:15], perm[15:16], perm[16:]
    healthy = {val[0], train[0]}  # upstream's only val subject and the first train subject have no lesion
    src = tmp_path / "BraTS21"
    for i, name in enumerate(names):
        _brats_subject(src, name, i, lesion=i not in healthy)

    plain = pp.preprocess(src, image_size=8, output=tmp_path / "plain", progress=False)
    assert plain["splits"]["val"]["unhealthy_slices"] == 0
    assert (tmp_path / "plain/data_splits/val/scans.csv").read_text() == names[val[0]]

    out = tmp_path / "with"
    summary = pp.preprocess(src, image_size=8, output=out, progress=False, min_val_lesion=1)
    got = {s: (out / "data_splits" / s / "scans.csv").read_text().split("\n") for s in pp.SPLITS}
    assert got["val"] == [names[train[1]]]  # train[0] has no lesion: the next one moves
    assert sorted(got["train"]) == sorted(names[i] for i in train[:1] + train[2:] + val)
    assert got["test"] == [names[i] for i in test]
    assert summary["splits"]["val"]["unhealthy_slices"] > 0
    assert [summary["splits"][s]["patients"] for s in pp.SPLITS] == [15, 1, 4]

    # rerun into an output made without the option: its recorded settings differ
    with pytest.raises(ValueError, match=r"--min_val_lesion_subjects 0 \(now 1\)"):
        pp.preprocess(src, image_size=8, output=tmp_path / "plain", progress=False, min_val_lesion=1)
    # an existing upstream split (no settings record) that does not satisfy the option is an error, not a silent reuse
    (tmp_path / "plain" / pp.SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match="fewer than 1 validation subject"):
        pp.preprocess(src, image_size=8, output=tmp_path / "plain", progress=False, min_val_lesion=1)


def test_leftovers_of_a_killed_run_are_swept_at_start(brats, tmp_path):
    out = tmp_path / "out"
    (out / "npy_train").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a writer that has died
    stale = [out / f".preprocess_summary.json.partial-{proc.pid}-0000beef",
             out / f".data_splits.partial-{proc.pid}-12345678",
             out / "npy_train" / f".patient_BraTS2021_00001.partial-{proc.pid}-abcdef01"]
    for p in stale[1:]:
        p.mkdir()
        (p / "slice_3.npz").write_bytes(b"half")
    stale[0].write_text("{")
    summary = pp.preprocess(brats, image_size=8, output=out, progress=False)
    assert not any(p.exists() for p in stale)
    assert summary["errors"] == [] and len(list(out.glob("npy_*/patient_*"))) == 20
    assert not list(out.glob(".*")) and not list(out.glob("npy_*/.*"))


def test_full_disk_stops_the_run_naming_the_subject(brats, tmp_path, monkeypatch):
    import errno

    from guided_diffusion import fileio

    calls = {"n": 0}
    real = np.savez_compressed

    def fills_up(path, **kw):
        calls["n"] += 1
        if calls["n"] == 7:  # the second subject, halfway
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, **kw)

    monkeypatch.setattr(pp.np, "savez_compressed", fills_up)
    out = tmp_path / "out"
    with pytest.raises(fileio.DiskFullError, match=r"cannot write .*npy_\w+/patient_BraTS2021_\d+: the disk is full"):
        pp.preprocess(brats, image_size=8, output=out, workers=1, progress=False)
    assert len(list(out.glob("npy_*/patient_*"))) == 1  # the first subject; the second left nothing behind
    assert not list(out.glob("npy_*/.*"))
    monkeypatch.setattr(pp.np, "savez_compressed", real)  # space freed: the rerun completes
    assert pp.preprocess(brats, image_size=8, output=out, workers=1, progress=False)["errors"] == []
    assert len(list(out.glob("npy_*/patient_*"))) == 20


# --- gaps found by mutation testing (bench/mutation.py --module preprocess) ---


def test_load_volume_drops_trailing_singleton_axes_only(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float64).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(data[..., None, None], np.eye(4)), tmp_path / "v5.nii.gz")  # [4, 5, 3, 1, 1]
    np.testing.assert_array_equal(pp.load_volume(tmp_path / "v5.nii.gz", "s", "flair"), data)
    nib.save(nib.Nifti1Image(np.stack([data, data + 1], -1), np.eye(4)), tmp_path / "v2.nii.gz")  # 2 frames
    with pytest.raises(pp.SubjectError, match=r"subject s: flair file .*v2.nii.gz is not a 3-D volume"):
        pp.load_volume(tmp_path / "v2.nii.gz", "s", "flair")
    with pytest.raises(pp.SubjectError, match=r"subject s: missing flair file"):
        pp.load_volume(tmp_path / "absent.nii.gz", "s", "flair")


@pytest.mark.parametrize("peak, expected", [(0.5, False), (0.51, True), (4.0, True)])
def test_a_lesion_is_a_mask_voxel_above_one_half(tmp_path, peak, expected):
    mask = np.zeros((4, 4, 4))
    mask[1, 2, 3] = peak
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "seg.nii.gz")
    subject = pp.Subject("P", {"flair": tmp_path / "seg.nii.gz"}, tmp_path / "seg.nii.gz")
    assert pp.subject_has_lesion(subject) is expected


def test_validation_lesion_move_warns_only_when_short():
    names = [f"P{i:02d}" for i in range(20)]  # upstream's split: 15 / 1 / 4
    for lesions, short in ((set(names), False), ({"P00"}, None), (set(), True)):
        warnings: list = []
        split = pp.seeded_split(names, min_val_lesion=1, has_lesion=lambda n: n in lesions, warnings=warnings)
        assert sorted(sum(split.values(), [])) == names and [len(split[s]) for s in pp.SPLITS] == [15, 1, 4]
        if short is None:  # the one lesion subject sits in train or test: moved to val only from train
            short = "P00" not in split["val"]
        assert bool(warnings) is short, (lesions, split, warnings)
        if short:
            assert "only 0 subject(s) with a lesion" in warnings[0] and "wanted 1" in warnings[0]
    assert pp.seeded_split(names) == pp.seeded_split(names, min_val_lesion=0)  # no lesion rule by default


def test_prepared_slices_record_their_original_z():
    volume = np.zeros((1, 6, 6, 10))
    volume[0, 1:5, 1:5, 3:7] = 1.0  # brain tissue on z = 3..6
    for first, last in ((0, 0), (2, 1)):  # drop 2 slices in front, 1 behind: z = 3..6 stay
        prepared = pp.prepare_slices(volume.copy(), None, 4, first=first, last=last)
        assert list(prepared.original_z) == [3, 4, 5, 6] and prepared.shape == (6, 6, 10)


def test_a_small_data_set_hears_about_its_validation_split_at_once(tmp_path):
    """Six subjects: upstream's 5 % gives validation none. Preprocessing says so with the fix; the errors that
    follow (the loader, AnoFPDM's M_max) name the preprocessing flag; with the fix there is nothing to say."""
    import torch

    from guided_diffusion.errors import HyperparameterError
    from guided_diffusion.methods.anofpdm import select_divergence_range

    src = tmp_path / "raw"
    for i in range(6):
        _brats_subject(src, f"S{i}", i)
    summary = pp.preprocess(src, image_size=8, output=tmp_path / "out", progress=False)
    assert summary["splits"]["val"]["patients"] == 0
    said = [w for w in summary["warnings"] if "validation split is empty" in w]
    assert len(said) == 1 and "--min_val_lesion_subjects 1" in said[0] and "new --output" in said[0]
    with pytest.raises(ValueError, match="no slices selected from .*npy_val.*--min_val_lesion_subjects 1"):
        get_data_iter("brats", tmp_path / "out", 2, "val", mixed=True)
    with pytest.raises(HyperparameterError, match="M_max.*--min_val_lesion_subjects 1"):
        select_divergence_range(torch.rand(3, 5, 2), torch.zeros(3))  # three healthy validation slices

    fixed = pp.preprocess(src, image_size=8, output=tmp_path / "fixed", progress=False, min_val_lesion=1)
    assert fixed["splits"]["val"]["patients"] == 1 and fixed["splits"]["val"]["unhealthy_slices"] > 0
    assert not [w for w in fixed["warnings"] if "validation split" in w]


def test_per_subject_geometry_and_the_orientation_setting_are_recorded(tmp_path):
    """The summary records what was done to each subject; the settings record the orientation; a subject stored
    otherwise (RAS, permuted) gives the same slices as one stored like BraTS (LPS); 'stored' slices as upstream."""
    src = tmp_path / "raw"
    vols, seg = _volumes(0)
    for name, reorient in (("A_lps", None), ("B_ras", [[0, -1], [1, -1], [2, 1]]), ("C_perm", [[2, 1], [0, 1], [1, 1]])):
        for key, arr in list(vols.items()) + [("seg", seg)]:
            img = nib.Nifti1Image(np.asarray(arr, np.float32), BRATS_AFFINE)
            if reorient is not None:
                img = img.as_reoriented(reorient)  # the same brain in the world, stored otherwise
            (src / name).mkdir(parents=True, exist_ok=True)
            nib.save(img, str(src / name / f"{name}_{key}.nii.gz"))
    summary = pp.preprocess(src, image_size=8, output=tmp_path / "out", progress=False)
    assert summary["orientation"] == "LPS"
    assert json.loads((tmp_path / "out" / pp.SETTINGS_FILE).read_text())["orientation"] == "LPS"
    geo_c = summary["subjects"]["C_perm"]["geometry"]
    assert geo_c["stored"]["axcodes"] == "PSL" and geo_c["stored"]["shape"] == [10, 9, 12]
    assert geo_c["canonical"]["shape"] == list(SHAPE) and geo_c["slice_axis"] == {"stored_axis": 1, "reversed": False}
    assert geo_c["resize"] == {"from": [12, 10], "to": [8, 8], "pixel_mm": [1.5, 1.25]}
    assert summary["subjects"]["A_lps"]["geometry"]["to_canonical"] == [[0, 1], [1, 1], [2, 1]]
    slices = {}
    for name in ("A_lps", "B_ras", "C_perm"):
        files = sorted((tmp_path / "out").glob(f"npy_*/patient_{name}/slice_*.npz"))
        slices[name] = {f.name: (np.load(f)["x"], np.load(f)["y"]) for f in files}
    assert list(slices["A_lps"]) == [f"slice_{z}.npz" for z in (2, 3, 4, 5, 6)]
    for name in ("B_ras", "C_perm"):
        assert slices[name].keys() == slices["A_lps"].keys()
        for k, (x, y) in slices[name].items():
            np.testing.assert_array_equal(x, slices["A_lps"][k][0])
            np.testing.assert_array_equal(y, slices["A_lps"][k][1])
    # upstream's slicing of the array as stored, on request: the permuted subject is cut along another axis
    stored = pp.preprocess(src, image_size=8, output=tmp_path / "stored", progress=False, orientation="stored")
    assert stored["subjects"]["C_perm"]["geometry"]["slice_axis"]["stored_axis"] == 2
    assert len(list((tmp_path / "stored").glob("npy_*/patient_C_perm/slice_*.npz"))) != 5
    with pytest.raises(ValueError, match="--orientation 'LPS' \\(now 'RAS'\\)"):
        pp.preprocess(src, image_size=8, output=tmp_path / "out", progress=False, orientation="RAS")


def test_an_output_made_before_the_orientation_was_recorded(tmp_path):
    """Its slices were cut as stored: going on is fine when its subjects are stored in the canonical orientation
    (BraTS), refused with the remedy when not."""
    src = tmp_path / "raw"
    for i in range(4):
        _brats_subject(src, f"S{i}", i)
    out = tmp_path / "out"
    pp.preprocess(src, image_size=8, output=out, progress=False)
    record = json.loads((out / pp.SETTINGS_FILE).read_text())
    del record["orientation"]
    (out / pp.SETTINGS_FILE).write_text(json.dumps(record))
    assert pp.preprocess(src, image_size=8, output=out, progress=False)["errors"] == []  # LPS subjects: fine
    assert json.loads((out / pp.SETTINGS_FILE).read_text())["orientation"] == "LPS"
    for rec in (record, None):  # an older record, and none (upstream)
        if rec is None:
            (out / pp.SETTINGS_FILE).unlink()
        else:
            (out / pp.SETTINGS_FILE).write_text(json.dumps(rec))
        with pytest.raises(pp.SettingsMismatchError, match="not stored RAS.*--orientation stored"):
            pp.preprocess(src, image_size=8, output=out, progress=False, orientation="RAS")
