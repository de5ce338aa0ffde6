"""BraTS-like synthetic generator: layout, labels, contrasts, determinism, resume; then preprocess + load it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nilearn")

from guided_diffusion.data import synthetic as syn  # noqa: E402
from guided_diffusion.data.loaders import get_data_iter  # noqa: E402
from guided_diffusion.data.preprocess import preprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = (60, 60, 40)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Two real-size subjects (one healthy, one with a tumour)."""
    out = tmp_path_factory.mktemp("synth") / "BraTS21"
    names = syn.make_synthetic_brats(out, num_subjects=2, healthy_fraction=0.5, seed=0, progress=False)
    return out, names


def _load(out: Path, name: str, kind: str) -> np.ndarray:
    img = nib.load(str(out / name / f"{name}_{kind}.nii.gz"))
    assert img.shape == syn.BRATS_SHAPE
    return np.asarray(img.dataobj)


def test_layout_labels_and_contrasts(full_size):
    out, names = full_size
    assert names == ["BraTS2021_00000", "BraTS2021_00001"]
    assert sorted(p.name for p in out.iterdir()) == names  # nothing else: the preprocessor sees no stray files
    healthy = set(syn.healthy_indices(2, 0.5, 0))
    assert len(healthy) == 1
    for i, name in enumerate(names):
        vols = {m: _load(out, name, m) for m in syn.MODALITIES}
        seg = _load(out, name, "seg")
        assert seg.dtype == np.uint8 and all(v.dtype == np.int16 for v in vols.values())
        brain = vols["t1"] > 0
        assert 0.1 < brain.mean() < 0.4
        for v in vols.values():
            assert v.min() == 0 and (v[~brain] == 0).mean() > 0.999  # skull-stripped, zero background
        if i in healthy:
            assert not seg.any()
            continue
        labels = set(np.unique(seg).tolist())
        assert {0, 2, 4} <= labels <= {0, 1, 2, 4}
        assert (seg > 0).sum() > 5000  # large enough to survive downsampling to 32-64 px
        assert brain[seg > 0].mean() > 0.95  # the tumour lies in the brain
        xs = np.nonzero(seg)[0]
        assert abs(xs.mean() - 119.5) > 10  # off the midline, in a hemisphere
        normal = brain & (seg == 0)
        mean = {m: {k: vols[m][(seg == k) if k else normal].mean() for k in (0, 2, 4)} for m in syn.MODALITIES}
        assert mean["flair"][2] > 1.3 * mean["flair"][0]  # bright oedema on FLAIR
        assert mean["t2"][2] > 1.2 * mean["t2"][0]  # and on T2
        assert mean["t1ce"][4] > 1.3 * mean["t1ce"][0]  # enhancing rim on T1ce
        assert mean["t1ce"][4] > 1.5 * mean["t1"][4] * mean["t1ce"][0] / mean["t1"][0]  # enhancement is T1ce-only
        assert mean["t1"][2] < mean["t1"][0]  # dark on T1


def test_full_size_preprocess_and_load(full_size, tmp_path):
    out, _ = full_size
    summary = preprocess(out, image_size=32, output=tmp_path / "pre", workers=1, progress=False)
    assert summary["errors"] == [] and summary["warnings"] == []
    assert [summary["splits"][s]["patients"] for s in ("train", "val", "test")] == [1, 0, 1]
    total_unhealthy = sum(s["unhealthy_slices"] for s in summary["splits"].values())
    assert total_unhealthy >= 15  # tumour spans many slices
    for split in ("train", "test"):
        s = summary["splits"][split]
        assert 100 <= s["healthy_slices"] + s["unhealthy_slices"] <= 155  # brain-slice range
    loader, _ = get_data_iter("brats", tmp_path / "pre", 8, "train", mixed=True)
    x, cond = next(iter(loader))
    assert x.shape == (8, 4, 32, 32) and x.min() >= -1 and x.max() <= 1
    labels = []
    for x, gt, lab in get_data_iter("brats", tmp_path / "pre", 64, "test", mixed=True):
        assert gt.shape[1:] == (1, 32, 32)
        labels += lab.tolist()
    assert sum(labels) == summary["splits"]["test"]["unhealthy_slices"]


def test_deterministic_by_seed():
    a_img, a_seg, a_aff = syn.render_subject(5, 3, healthy=False, shape=SMALL)
    b_img, b_seg, _ = syn.render_subject(5, 3, healthy=False, shape=SMALL)
    c_img, _, _ = syn.render_subject(6, 3, healthy=False, shape=SMALL)
    assert all(np.array_equal(a_img[m], b_img[m]) for m in syn.MODALITIES) and np.array_equal(a_seg, b_seg)
    assert not np.array_equal(a_img["flair"], c_img["flair"])
    assert a_img["t1"].shape == SMALL and np.allclose(np.diag(a_aff)[:3], 240 / 60)
    assert syn.healthy_indices(10, 0.3, 1) == syn.healthy_indices(10, 0.3, 1)
    assert len(syn.healthy_indices(10, 0.3, 1)) == 3


def test_resume_and_bad_arguments(tmp_path):
    out = tmp_path / "s"
    syn.make_synthetic_brats(out, num_subjects=2, healthy_fraction=0.0, seed=1, shape=SMALL, progress=False)
    f = out / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz"
    mtime = f.stat().st_mtime_ns
    (out / ".tmp-BraTS2021_00002-dead").mkdir()  # a killed run's leftovers
    syn.make_synthetic_brats(out, num_subjects=3, healthy_fraction=0.0, seed=1, shape=SMALL, workers=2,
                             progress=False)
    assert f.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == [syn.subject_name(i) for i in range(3)]
    assert len(list((out / "BraTS2021_00002").iterdir())) == 5
    with pytest.raises(ValueError, match="num_subjects"):
        syn.make_synthetic_brats(out, num_subjects=0)
    with pytest.raises(ValueError, match="healthy_fraction"):
        syn.make_synthetic_brats(out, num_subjects=2, healthy_fraction=1.5)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write"):
        syn.make_synthetic_brats(blocker / "x", num_subjects=1)


def test_failed_write_leaves_no_subject(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("simulated write failure")

    monkeypatch.setattr(syn.nib, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        syn.make_synthetic_brats(tmp_path, num_subjects=1, shape=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_script(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_brats.py"), "--output", str(tmp_path / "o"),
           "--num_subjects", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and "num_subjects" in res.stderr
