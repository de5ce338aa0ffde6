"""BraTS-like synthetic generator: layout, labels, contrasts, determinism, resume; then preprocess + load it."""

from __future__ import annotations

import json
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

REPO = Path(__file__).resolve().parents[2]
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
    # nothing else but the hidden settings record: the preprocessor sees no stray files
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == names
    assert json.loads((out / syn.SETTINGS_FILE).read_text())["lesions"] == {
        "radius_mm": [15.0, 35.0], "contrast": 1.0, "lesions": [1, 1]}
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
    assert summary["errors"] == [] and len(summary["warnings"]) == 1
    assert "validation split is empty" in summary["warnings"][0]  # two subjects: upstream's 5 % gives it none
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
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [syn.subject_name(i) for i in range(3)]
    assert not list(out.glob(".tmp-*"))
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
    assert [p.name for p in tmp_path.iterdir()] == [syn.SETTINGS_FILE]  # no subject, no temp folder


def test_script(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_brats.py"), "--output", str(tmp_path / "o"),
           "--num_subjects", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and "num_subjects" in res.stderr


def _lesion_stats(img, seg):
    brain = img["flair"] > 0
    lesion = seg > 0
    return int(lesion.sum()), float(img["flair"][lesion].mean() / img["flair"][brain & ~lesion].mean())


def test_presets_change_size_contrast_and_count():
    """Presets do what they say, relative to the default on the same subject (same anatomy, same seed)."""
    shape = (80, 80, 52)
    default = syn.render_subject(4, 1, False, shape, syn.lesion_settings("default"))
    n_def, c_def = _lesion_stats(*default[:2])
    # the default preset is the original generator: same call without settings gives identical volumes
    plain = syn.render_subject(4, 1, False, shape)
    assert all(np.array_equal(plain[0][m], default[0][m]) for m in syn.MODALITIES)

    # contrast 0 makes the lesion invisible: the images equal the healthy rendering of the same tissue
    zero = syn.render_subject(4, 1, False, shape, syn.lesion_settings("default", contrast=0.0))
    _, c_zero = _lesion_stats(*zero[:2])
    assert abs(c_zero - 1) < abs(c_def - 1) / 3  # lesion intensity close to normal tissue
    assert np.array_equal(zero[1], default[1])  # same labels: only the appearance changed

    faint = syn.render_subject(4, 1, False, shape, syn.lesion_settings("faint"))
    _, c_faint = _lesion_stats(*faint[:2])
    assert 1 < c_faint < c_def  # still brighter than tissue on FLAIR, less so

    # "small" draws radii from 8-18 mm instead of 15-35 mm: E[r³] is 2522 vs 18125 mm³, a ratio of 0.14
    def mean_size(preset):
        return np.mean([_lesion_stats(*syn.render_subject(4, i, False, shape, syn.lesion_settings(preset))[:2])[0]
                        for i in range(3)])
    assert mean_size("small") < 0.4 * mean_size("default")

    multi = syn.lesion_settings("multi", lesions=[3, 3])
    _, seg_multi, _ = syn.render_subject(4, 1, False, shape, multi)
    from scipy import ndimage
    _, n_components = ndimage.label(seg_multi > 0)
    assert 1 <= n_components <= 3 and (seg_multi > 0).sum() > 0
    assert set(np.unique(seg_multi).tolist()) <= {0, 1, 2, 4}


def test_settings_are_recorded_and_checked(tmp_path):
    out = tmp_path / "s"
    syn.make_synthetic_brats(out, num_subjects=1, healthy_fraction=1.0, seed=2, shape=SMALL, progress=False,
                             lesions=syn.lesion_settings("small"))
    with pytest.raises(ValueError, match="other settings.*lesions"):
        syn.make_synthetic_brats(out, num_subjects=2, healthy_fraction=1.0, seed=2, shape=SMALL, progress=False)
    with pytest.raises(ValueError, match=r"--seed 2 \(now 3\)"):
        syn.make_synthetic_brats(out, num_subjects=1, healthy_fraction=1.0, seed=3, shape=SMALL, progress=False,
                                 lesions=syn.lesion_settings("small"))
    # more subjects with the same settings is a resume, not a conflict
    syn.make_synthetic_brats(out, num_subjects=2, healthy_fraction=1.0, seed=2, shape=SMALL, progress=False,
                             lesions=syn.lesion_settings("small"))
    assert (out / syn.subject_name(1)).is_dir()
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        syn.lesion_settings("huge")
    with pytest.raises(ValueError, match="radius"):
        syn.lesion_settings("default", radius_mm=[20, 10])
    with pytest.raises(ValueError, match="--lesions_per_subject"):
        syn.lesion_settings("default", lesions=[0, 2])
