"""Surface metrics (HD95, normalised surface Dice) in mm against a brute-force implementation (explicit neighbour
loops and a k-d tree over voxel centres) and hand-derived cases; empty masks; metrics over one-shot iterators."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.spatial import cKDTree

from guided_diffusion import metrics as M


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Indices of the foreground voxels with a face neighbour outside the mask (or outside the array)."""
    out = []
    for idx in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
                out.append(idx)
                break
    return np.array(out, dtype=np.float64)


def brute_hd95_nsd(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """HD95 = max of the two directed 95th percentiles, NSD = surface voxels within ``tol`` over all of them."""
    sp = brute_surface(pred) * np.asarray(spacing)
    sg = brute_surface(gt) * np.asarray(spacing)
    d_pg = cKDTree(sg).query(sp)[0]
    d_gp = cKDTree(sp).query(sg)[0]
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    nsd = ((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (len(d_pg) + len(d_gp))
    return float(hd95), float(nsd)


def _blobs(rng: np.random.Generator, shape, n: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    for _ in range(n):
        lo = [rng.integers(0, s) for s in shape]
        hi = [min(s, a + rng.integers(1, 8)) for a, s in zip(lo, shape)]
        m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.mark.parametrize("seed", range(6))
def test_hd95_and_nsd_equal_a_brute_force_computation_on_anisotropic_grids(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 13, 9)  # boxes reach the array border: outside counts as background
    spacing = (0.8, 1.3, 2.5)
    pred, gt = _blobs(rng, shape, 3), _blobs(rng, shape, 2)
    for tol in (1.0, 2.0):
        got = M.surface_metrics(pred, gt, spacing, nsd_tolerance_mm=tol)
        hd95, nsd = brute_hd95_nsd(pred, gt, spacing, tol)
        assert got["hd95_mm"] == pytest.approx(hd95, abs=1e-9)
        assert got["nsd"] == pytest.approx(nsd, abs=1e-12)
    # the spacing is per axis, in array order: a transposed volume with transposed spacing gives the same values
    swapped = M.surface_metrics(pred.transpose(2, 0, 1), gt.transpose(2, 0, 1), (2.5, 0.8, 1.3))
    plain = M.surface_metrics(pred, gt, spacing)
    assert swapped["hd95_mm"] == pytest.approx(plain["hd95_mm"]) and swapped["nsd"] == pytest.approx(plain["nsd"])


def test_hand_derived_line_of_voxels():
    """On a 1x1x10 grid every voxel is surface. gt z 0..4, pred z 3..9, 2.5 mm per slice:
    pred -> gt: 0, 0, 2.5, 5, 7.5, 10, 12.5 mm (P95 at index 0.95*6 = 5.7: 10 + 0.7*2.5 = 11.75);
    gt -> pred: 7.5, 5, 2.5, 0, 0 (sorted index 0.95*4 = 3.8: 5 + 0.8*2.5 = 7). HD95 = 11.75.
    NSD at 2.5 mm: 3 of 7 and 3 of 5 voxels within, 6/12."""
    gt = np.zeros((1, 1, 10), bool)
    pred = np.zeros_like(gt)
    gt[..., 0:5] = True
    pred[..., 3:10] = True
    m = M.surface_metrics(pred, gt, (0.7, 3.0, 2.5), nsd_tolerance_mm=2.5)
    assert m["hd95_mm"] == pytest.approx(11.75)
    assert m["nsd"] == pytest.approx(0.5)
    assert M.surface_metrics(pred, gt, (0.7, 3.0, 2.5), nsd_tolerance_mm=2.4)["nsd"] == pytest.approx(4 / 12)


def test_single_voxels_offset_on_an_anisotropic_grid():
    pred = np.zeros((6, 6, 6), bool)
    gt = np.zeros_like(pred)
    pred[1, 1, 1] = gt[2, 3, 4] = True  # offset (1, 2, 3) voxels of (0.5, 1, 2) mm
    d = np.sqrt(0.5**2 + 2.0**2 + 6.0**2)
    m = M.surface_metrics(pred, gt, (0.5, 1.0, 2.0))
    assert m["hd95_mm"] == pytest.approx(d) and m["nsd"] == 0.0
    assert M.surface_metrics(pred, gt, (0.5, 1.0, 2.0), nsd_tolerance_mm=d + 1e-9)["nsd"] == 1.0
    assert M.surface_metrics(gt, gt, (0.5, 1.0, 2.0)) == {"hd95_mm": 0.0, "nsd": 1.0}


def test_empty_masks_and_means_over_volumes():
    empty = np.zeros((4, 4, 4), bool)
    lesion = empty.copy()
    lesion[1:3, 1:3, 1:3] = True
    assert M.surface_metrics(empty, empty, (1, 1, 1)) == {"hd95_mm": 0.0, "nsd": 1.0}
    assert M.surface_metrics(empty, lesion, (1, 1, 1)) == {"hd95_mm": None, "nsd": 0.0}  # lesion missed
    assert M.surface_metrics(lesion, empty, (1, 1, 1)) == {"hd95_mm": None, "nsd": 0.0}  # false positive only
    # an undefined HD95 is left out of the mean (n says how many volumes had one), never inf or NaN
    vols = [M.volume_metrics(p, g, spacing=(1, 1, 2)) for p, g in ((lesion, lesion), (empty, lesion), (lesion, empty))]
    assert [v["hd95_mm"] for v in vols] == [0.0, None, None]
    assert M.mean_sd(v["hd95_mm"] for v in vols) == {"mean": 0.0, "sd": None, "n": 1}
    assert M.mean_sd(v["nsd"] for v in vols)["mean"] == pytest.approx(1 / 3)
    # without a voxel size there are no surface metrics
    no_spacing = M.volume_metrics(lesion, lesion)
    assert no_spacing["hd95_mm"] is None and no_spacing["nsd"] is None


def test_bad_spacing_and_tolerance_are_clear_errors():
    m = np.ones((2, 2, 2), bool)
    for bad in ((1, 1), (1, 0, 1), (1, float("nan"), 1)):
        with pytest.raises(ValueError, match="spacing must be 3 positive voxel sizes"):
            M.surface_metrics(m, m, bad)
    with pytest.raises(ValueError, match="tolerance"):
        M.surface_metrics(m, m, (1, 1, 1), nsd_tolerance_mm=-1)
    with pytest.raises(ValueError, match="shape"):
        M.surface_distances(m, m[:1], (1, 1, 1))


# ------------------------------------------------------------------------------------------------------------
# Metrics over batches accept any iterable


def _two_volume_batches():
    gt = np.zeros((4, 1, 6, 6), bool)
    gt[0, 0, 1:4, 1:4] = gt[2, 0, 2:5, 2:5] = True
    amap = gt.astype(np.float32) * 0.5 + np.linspace(0, 0.4, gt.size, dtype=np.float32).reshape(gt.shape)
    pred = amap > 0.45
    full = dict(gt=gt, pred_mask=pred, anomaly_map=amap, foreground=np.ones_like(gt),
                label=gt.reshape(4, -1).any(1).astype(np.int64), pred_label=pred.reshape(4, -1).any(1).astype(np.int64),
                volume=np.array(["a", "a", "b", "b"]))
    return [{k: v[i:i + 2] for k, v in full.items()} for i in (0, 2)]


def test_per_volume_and_evaluation_metrics_accept_one_shot_iterators():
    batches = _two_volume_batches()
    from_list = M.per_volume_metrics(batches)
    from_iter = M.per_volume_metrics(iter(batches))
    from_gen = M.per_volume_metrics(b for b in batches)
    assert from_iter == from_list == from_gen
    for v in ("a", "b"):  # each volume has its lesion ranked first: AP 1 (a second pass over nothing gave inf)
        assert from_list[v]["auprc"] == pytest.approx(1.0)
    for auprc_pooling in ("global", "batch"):
        for pr_pooling in ("global", "upstream"):
            kw = dict(auprc_pooling=auprc_pooling, pr_pooling=pr_pooling)
            assert M.evaluate_segmentation((b for b in batches), **kw) == M.evaluate_segmentation(batches, **kw)
