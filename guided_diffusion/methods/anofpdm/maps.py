"""AnoFPDM's anomaly map: end step t_e, quantile schedule (Algorithm 1), aggregation of the sub-anomaly maps
over the steps before t_e, thresholding and post-processing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from guided_diffusion.methods.postprocess import median_filter2d

# Algorithm 1 of the paper: the quantile moves from B_QUANTILE (small divergence) to A_QUANTILE (M_te >= M_max).
A_QUANTILE = 0.90
B_QUANTILE = 0.98


def end_steps(divergence: torch.Tensor) -> torch.Tensor:
    """t_e = argmax_t M_t per slice and modality (first maximum): ``[B, T, M] -> [B, M]`` (0-based)."""
    return divergence.argmax(1)


def scale_end_steps(t_e: torch.Tensor, ratio: float) -> torch.Tensor:
    """Upstream's ``--t_e_ratio``: t_e -> round(t_e * ratio) (the aggregation window clips it to T)."""
    if ratio == 1:
        return t_e
    return torch.round(t_e.double() * ratio).long()


def quantile_levels(
    max_divergence: torch.Tensor, diff_max: Sequence[float], a: float = A_QUANTILE, b: float = B_QUANTILE
) -> torch.Tensor:
    """Algorithm 1: q = b - (b - a) * round(clamp(M_te / M_max, 0, 1), 2), per slice and modality.

    ``max_divergence`` is ``[B, M]`` (M_te = max_t M_t); returns ``[B, M]`` float64. The ratio is quantised to
    101 levels like upstream's ``flip(linspace(a, b, 101))[idx]``, computed in float64 (upstream's float32
    rounding lost one level at 0.53 and 0.59).
    """
    dmax = torch.as_tensor(diff_max, dtype=torch.float64, device=max_divergence.device)
    ratio = (max_divergence.double() / dmax.clamp_min(1e-12)).clamp(0, 1)
    idx = torch.round(ratio * 100)
    return b - (b - a) * idx / 100


def aggregation_weights(
    t_e: torch.Tensor, num_steps: int, *, last_only: bool = False, interval: int = 1, include_end: bool = False
) -> torch.Tensor:
    """Which steps enter the aggregated map: ``[B, M]`` end steps -> 0/1 weights ``[B, M, T]``.

    Default (upstream): steps [0, t_e), t_e excluded. ``include_end`` uses [0, t_e] (paper Eq. 20).
    ``last_only`` ("S_te" variant): only step t_e - 1 (t_e with ``include_end``). ``interval=k`` keeps every
    k-th step of [0, t_e) and adds step t_e. An empty window (t_e = 0, where upstream produced a NaN map)
    falls back to step 0.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    s = torch.arange(num_steps, device=t_e.device)
    te = t_e[..., None]
    if last_only:
        target = (te if include_end else te - 1).clamp(0, num_steps - 1)
        w = s == target
    else:
        w = (s < te) & (s % interval == 0)
        if include_end or interval > 1:
            w = w | (s == te)
    empty = ~w.any(-1, keepdim=True)
    w = w | (empty & (s == 0))
    return w.float()


def aggregate_maps(sub_anomaly_maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over steps: S ``[B, T, M, H, W]`` and weights ``[B, M, T]`` -> ``[B, M, H, W]``."""
    w = weights.to(sub_anomaly_maps.dtype)
    return torch.einsum("btmhw,bmt->bmhw", sub_anomaly_maps, w) / w.sum(-1)[..., None, None]


class StreamingAggregator:
    """Computes ``aggregate_maps(S, aggregation_weights(end_steps(M), T, ...))`` one step at a time.

    Keeps a running sum of the eligible S_t and, whenever M_t reaches a new maximum for a slice and modality,
    a snapshot of the window ending there, so memory is O(B·M·H·W) instead of O(B·T·M·H·W).
    """

    def __init__(self, *, last_only: bool = False, interval: int = 1, include_end: bool = False):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.last_only, self.interval, self.include_end = last_only, interval, include_end
        self.maps: Optional[torch.Tensor] = None
        self.best: Optional[torch.Tensor] = None
        self.end_step: Optional[torch.Tensor] = None
        self._sum: Optional[torch.Tensor] = None
        self._count = 0
        self._prev: Optional[torch.Tensor] = None

    def update(self, t: int, sam: torch.Tensor, divergence: torch.Tensor) -> None:
        """Add step t: S_t ``[B, M, H, W]`` and M_t ``[B, M]``."""
        if self.maps is None:
            self.maps = torch.zeros_like(sam)
            self.best = torch.full_like(divergence, -float("inf"))
            self.end_step = torch.zeros(divergence.shape, dtype=torch.long, device=divergence.device)
            self._sum = torch.zeros_like(sam)
        new_max = (divergence > self.best) | (t == 0)
        if self.last_only:
            candidate = sam if (self.include_end or t == 0) else self._prev
        else:
            total, count = self._sum, self._count
            if self.include_end or self.interval > 1:
                total, count = total + sam, count + 1
            candidate = sam if count == 0 else total / count
        self.maps = torch.where(new_max[..., None, None], candidate, self.maps)
        self.best = torch.where(new_max, divergence, self.best)
        self.end_step = torch.where(new_max, torch.full_like(self.end_step, t), self.end_step)
        if t % self.interval == 0:
            self._sum = self._sum + sam
            self._count += 1
        self._prev = sam


def rowwise_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantile with linear interpolation (numpy's default) of ``values[..., N]`` at per-row levels ``q[...]``."""
    v = values.double().sort(-1).values
    n = v.shape[-1]
    pos = q.double().clamp(0, 1) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = pos.ceil().long().clamp(0, n - 1)
    frac = pos - lo.double()
    v_lo = v.gather(-1, lo[..., None])[..., 0]
    v_hi = v.gather(-1, hi[..., None])[..., 0]
    return v_lo + (v_hi - v_lo) * frac


def threshold_maps(
    maps: torch.Tensor, q: torch.Tensor, median_kernel: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anomaly map, binary mask and threshold from per-modality aggregated maps.

    ``maps`` ``[B, M, H, W]``, quantile levels ``q`` ``[B, M]``. As upstream, the threshold is the mean over
    modalities of the q-quantile of each (unfiltered) map over all pixels; the anomaly map is the
    median-filtered mean over modalities, and the mask is ``map >= threshold``.
    Returns ``(anomaly_map [B,1,H,W], mask bool [B,1,H,W], threshold [B])``.
    """
    thr = rowwise_quantile(maps.flatten(2), q).mean(1).to(maps.dtype)  # [B]
    amap = median_filter2d(maps.mean(1, keepdim=True), median_kernel)
    mask = amap >= thr[:, None, None, None]
    return amap, mask, thr
