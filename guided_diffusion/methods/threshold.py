"""The baselines' threshold: a grid search of the mixed Dice on pixel-labelled validation slices.

As the paper's baselines were tuned (upstream ``obtain_hyperpara.obtain_optimal_threshold``): for every threshold
of ``np.arange(0.01, 0.7, 0.01)`` (69 values) the validation masks are ``map >= thr`` on the median-filtered
anomaly maps, small components are removed as in the test pass, and the mean per-slice Dice over all validation
slices (the mixed setup: an empty prediction on a healthy slice scores 1) is computed; the first threshold with
the highest Dice wins. The comparison is done in float32, as upstream's ``tensor >= python float``.

The search is exact (the same masks as the test pass would make at each threshold) and cheap: the maps are
thresholded once per grid value, the component filter labels each slice once per grid value, and the Dice of
all slices comes from three pixel counts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from guided_diffusion.methods.postprocess import remove_small_components
from guided_diffusion.metrics import SMOOTH

UPSTREAM_GRID = (0.01, 0.7, 0.01)


def threshold_grid(start: float = UPSTREAM_GRID[0], stop: float = UPSTREAM_GRID[1],
                   step: float = UPSTREAM_GRID[2]) -> np.ndarray:
    """``np.arange(start, stop, step)`` (upstream: 0.01 .. 0.69, 69 values)."""
    if not step > 0 or not stop > start:
        raise ValueError(f"threshold grid needs start < stop and step > 0, got {start}, {stop}, {step}")
    return np.arange(start, stop, step)


def mixed_dice_by_threshold(
    maps: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float],
    cc_max_size: int = 40,
    smooth: float = SMOOTH,
) -> np.ndarray:
    """Mean per-slice Dice of ``remove_small_components(maps >= thr)`` against ``gt`` for each threshold.

    ``maps`` float ``[N, 1, H, W]`` (the anomaly maps, already median-filtered), ``gt`` bool ``[N, 1, H, W]``.
    Returns float64 ``[len(thresholds)]``.
    """
    maps = np.asarray(maps, dtype=np.float32)
    gt = np.asarray(gt).astype(bool)
    if maps.shape != gt.shape or maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps {maps.shape} and ground-truth masks {gt.shape} must both be [N, 1, H, W]")
    n = maps.shape[0]
    if n == 0:
        raise ValueError("the threshold search needs at least one validation slice")
    flat_gt = gt.reshape(n, -1)
    gt_sum = flat_gt.sum(1).astype(np.float64)
    out = np.empty(len(thresholds), dtype=np.float64)
    for i, thr in enumerate(thresholds):
        mask = maps >= np.float32(thr)
        if cc_max_size > 0:
            mask = remove_small_components(mask, cc_max_size)
        flat = mask.reshape(n, -1)
        inter = np.logical_and(flat, flat_gt).sum(1).astype(np.float64)
        dice = (2 * inter + smooth) / (flat.sum(1) + gt_sum + smooth)
        out[i] = dice.mean()
    return out


def search_threshold(
    maps: np.ndarray,
    gt: np.ndarray,
    thresholds: Optional[Sequence[float]] = None,
    cc_max_size: int = 40,
) -> Tuple[float, float, np.ndarray]:
    """``(threshold, its mixed Dice, Dice per grid value)``: the first grid value with the highest Dice.

    Upstream started from ``thr = 0`` and kept it when every Dice was 0 (a mask of every pixel); here the first
    grid value is returned then.
    """
    grid = threshold_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    dice = mixed_dice_by_threshold(maps, gt, grid, cc_max_size)
    best = int(np.argmax(dice))  # first maximum, as upstream's strict ">"
    return float(grid[best]), float(dice[best]), dice
