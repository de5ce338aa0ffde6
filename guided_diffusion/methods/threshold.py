"""The baselines' threshold: a grid search of the mixed Dice on pixel-labelled validation slices.

As the paper's baselines were tuned (upstream ``obtain_hyperpara.obtain_optimal_threshold``): for every threshold
of ``np.arange(0.01, 0.7, 0.01)`` (69 values) the validation masks are ``map >= thr`` on the median-filtered
anomaly maps, small components are removed as in the test pass, and the mean per-slice Dice over all validation
slices (the mixed setup: an empty prediction on a healthy slice scores 1) is computed; the first threshold with
the highest Dice wins. The map comparison is done in float32, as upstream's ``tensor >= python float``.

Ties are broken as upstream's: its ``dice_coeff`` computes the per-slice Dice and their mean in float32 (torch's
default dtype) and its loop keeps a threshold only when its Dice is strictly larger. So thresholds whose Dice
differ only below float32 resolution count as equal and the first one wins. This matters on a Dice plateau, e.g.
when a healthy slice keeps a false-positive component over a range of thresholds: its Dice, 1e-6 / (|P| + 1e-6),
changes with |P| but is lost in the float32 mean, and a float64 ``argmax`` would move far along the plateau.

The search is exact (the same masks as the test pass would make at each threshold) and cheap: the maps are
thresholded once per grid value, the component filter labels each slice once per grid value, and the Dice of
all slices comes from three pixel counts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

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
    Per-slice Dice and their mean are computed as upstream's ``dice_coeff``, in float32 (torch on the CPU; on a
    GPU upstream's mean may differ in the last bit). Returns the float32 values as float64 ``[len(thresholds)]``.
    """
    maps = np.asarray(maps, dtype=np.float32)
    gt = np.asarray(gt).astype(bool)
    if maps.shape != gt.shape or maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps {maps.shape} and ground-truth masks {gt.shape} must both be [N, 1, H, W]")
    n = maps.shape[0]
    if n == 0:
        raise ValueError("the threshold search needs at least one validation slice")
    flat_gt = gt.reshape(n, -1)
    gt_sum = flat_gt.sum(1)
    out = np.empty(len(thresholds), dtype=np.float64)
    for i, thr in enumerate(thresholds):
        mask = maps >= np.float32(thr)
        if cc_max_size > 0:
            mask = remove_small_components(mask, cc_max_size)
        flat = mask.reshape(n, -1)
        inter = torch.from_numpy(np.logical_and(flat, flat_gt).sum(1)).float()  # counts, exact in float32
        union = torch.from_numpy(flat.sum(1) + gt_sum).float()
        out[i] = torch.mean((2.0 * inter + smooth) / (union + smooth)).item()
    return out


def search_threshold(
    maps: np.ndarray,
    gt: np.ndarray,
    thresholds: Optional[Sequence[float]] = None,
    cc_max_size: int = 40,
) -> Tuple[float, float, np.ndarray]:
    """``(threshold, its mixed Dice, Dice per grid value)``: the first grid value with the highest float32 Dice
    (upstream's tie-breaking, see the module's docstring).

    Upstream started from ``thr = 0`` and kept it when every Dice was 0 (a mask of every pixel); here the first
    grid value is returned then.
    """
    grid = threshold_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    dice = mixed_dice_by_threshold(maps, gt, grid, cc_max_size)
    best = int(np.argmax(dice))  # the first maximum of the float32 curve, as upstream's strict ">"
    return float(grid[best]), float(dice[best]), dice
