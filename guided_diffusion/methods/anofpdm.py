"""AnoFPDM: anomaly segmentation along the forward process of a classifier-free guided diffusion model.

Paper: Che et al., "AnoFPDM: Anomaly Segmentation with Forward Process of Diffusion Models for Brain MRI",
WACV-W 2025. For every test slice x0 and every forward step t = 0 .. T-1 (T = ``forward_steps``):

* the latent x_t is obtained by DDIM inversion (deterministic, "DDIM") or by ``q_sample`` with fresh noise
  ("DDPM");
* the healthy guided prediction (HGP) x̂0_w uses eps = (1+w) eps(x_t, t, y=healthy) - w eps(x_t, t, ∅), and the
  unguided prediction (UGP) x̂0_∅ uses eps(x_t, t, ∅); both come from ONE batched forward of the conditional
  and null rows (``diffusion.guided_eps``);
* per modality m: MSE_w = mean (x̂0_w - x0)², MSE_∅ = mean (x̂0_∅ - x0)², M_t = mean (x̂0_w - x̂0_∅)²
  and the sub-anomaly map S_t = (x̂0_w - x0)².

Validation (slice labels only) picks the cosine-similarity threshold (``thr_01``) that separates healthy
from unhealthy slices and M_max (``diff_max``, the largest M_t over unhealthy slices). A test slice is then
classified unhealthy when cos_t(MSE_w, MSE_∅) <= thr_01, its end step is t_e = argmax_t M_t, its anomaly map
is the mean of S_t over the steps before t_e, thresholded at the quantile of Algorithm 1 (a=0.90, b=0.98:
the larger M_te / M_max, the lower the quantile), median-filtered, and small components are removed.

The selection logic is written as small functions on tensors (tested on controlled inputs); the forward
loop streams the per-step maps into the aggregated map so memory does not grow with T.

Where this module deliberately differs from the upstream code (decisions §5), the upstream behaviour is one
argument away: ``ugp_mode="upstream"`` (UGP = healthy-conditional prediction without guidance) and
``legacy_ddim_encoding=True`` (the latent one level ahead of its timestep label).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.errors import HyperparameterError
from guided_diffusion.flags import option
from guided_diffusion.methods.postprocess import median_filter2d, remove_small_components

# Algorithm 1 of the paper: the quantile moves from B_QUANTILE (small divergence) to A_QUANTILE (M_te >= M_max).
A_QUANTILE = 0.90
B_QUANTILE = 0.98
# Upstream scans these quantiles of the healthy validation cosine similarities for the classification threshold.
CLS_QUANTILES = (0.005, 0.095, 100)
COSINE_EPS = 1e-6

UGP_MODES = ("null", "upstream")
SUB_ANOMALY_MODES = ("input", "gradient", "gradient_para")

# Fallback hyper-parameters recorded by upstream (``num_batches_val 0``), keyed by (dataset, forward_steps):
# (thr_01, diff_max, diff_min, w). They were measured with upstream's forward function (healthy-conditional UGP,
# the off-by-one DDIM encoding with the null embedding) on its checkpoints at guidance weight w (BraTS: model
# 210000; ATLAS: model 290000, w = 20 although the paper selects 30), so they only fit that function.
UPSTREAM_FALLBACK_HYPERPARAMS = {
    ("brats", 600): (0.99487984, [0.0509, 0.0397], [5.5484e-5, 3.4732e-5], 2.0),
    ("brats", 300): (0.99487984, [0.0509, 0.0397], [5.5484e-5, 3.4732e-5], 2.0),  # the HAE scripts copy fs 600
    ("brats", 999): (0.99931473, [0.0551, 0.0388], [0.0022, 0.0010], 2.0),
    ("atlas", 600): (0.72853965, [0.8555], [0.0392], 20.0),
}


# --------------------------------------------------------------------------------------------------------
# Per-step statistics and validation hyper-parameters
# --------------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """Per-slice, per-step, per-modality scalars of the forward process, each ``[B, T, M]`` float32."""

    mse_guided: torch.Tensor  # mean_hw (x̂0_w - x0)²
    mse_unguided: torch.Tensor  # mean_hw (x̂0_∅ - x0)²
    divergence: torch.Tensor  # M_t = mean_hw (x̂0_w - x̂0_∅)²
    sam_mean: torch.Tensor  # mean_hw S_t (equals mse_guided for the default map; stored, not used to classify)

    def to_numpy(self) -> dict:
        return {k: v.detach().cpu().float().numpy() for k, v in asdict(self).items()}

    @classmethod
    def from_numpy(cls, d) -> "StepStats":
        return cls(**{k: torch.as_tensor(np.asarray(d[k]), dtype=torch.float32) for k in cls.__dataclass_fields__})

    @classmethod
    def cat(cls, parts: Sequence["StepStats"]) -> "StepStats":
        return cls(**{k: torch.cat([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})


def cosine_similarity_over_steps(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Cosine similarity of two per-step curves ``[N, T]`` (paper Eq. 18) -> ``[N]``."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=eps).float()


def classification_similarity(stats: StepStats) -> torch.Tensor:
    """cos_t(mean_m MSE_w, mean_m MSE_∅) per slice (paper Eq. 18), in validation and test alike.

    Upstream classifies on the guided MSE in every map mode (its test pass recomputes it even when the
    gradient sub-anomaly maps feed the masks), so ``thr_01`` fitted in validation applies to the same quantity.
    """
    return cosine_similarity_over_steps(stats.mse_guided.mean(-1), stats.mse_unguided.mean(-1))


def classify(similarity: torch.Tensor, thr_01: float) -> torch.Tensor:
    """Slice label prediction: 1 (unhealthy) when the similarity is at most ``thr_01``, else 0."""
    return (similarity <= thr_01).long()


def select_classification_threshold(
    similarity: torch.Tensor, labels: torch.Tensor, quantiles: Optional[torch.Tensor] = None
) -> tuple[float, int]:
    """Cosine threshold with the fewest validation errors among quantiles of the healthy similarities.

    Errors are ``#(unhealthy > thr) + #(healthy < thr)``; the candidates are the 0.5 %..9.5 % quantiles of
    the healthy similarities (so at most ~9.5 % of healthy validation slices are misclassified by design).
    Without unhealthy slices it is the 5 % healthy quantile; without healthy slices it cannot be chosen: a
    ``HyperparameterError`` (upstream silently used 0.5, a threshold unrelated to the data).
    Returns ``(thr_01, n_errors)``.
    """
    sim = similarity.double().flatten()
    labels = labels.flatten()
    healthy, unhealthy = sim[labels == 0], sim[labels == 1]

    def errors(thr: torch.Tensor) -> torch.Tensor:
        return (unhealthy[None] > thr[:, None]).sum(1) + (healthy[None] < thr[:, None]).sum(1)

    if healthy.numel() == 0:
        raise HyperparameterError(
            f"AnoFPDM's classification threshold thr_01 cannot be chosen: the {sim.numel()} validation slice(s) "
            "include no healthy one (thr_01 is a quantile of the healthy slices' similarities)")
    if unhealthy.numel() == 0:
        thr = torch.quantile(healthy, 0.05).reshape(1)
        return float(thr[0]), int(errors(thr)[0])
    if quantiles is None:
        quantiles = torch.linspace(*CLS_QUANTILES, dtype=torch.float64)
    thrs = torch.quantile(healthy, quantiles.double())
    err = errors(thrs)
    best = int(torch.argmin(err))  # first minimum, as upstream
    return float(thrs[best]), int(err[best])


def select_divergence_range(divergence: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """(M_max, M_min) per modality: max / min over unhealthy validation slices of max_t M_t.

    Without unhealthy validation slices M_max cannot be estimated: a ``HyperparameterError`` (upstream's guard used
    ones / zeros, with which every test mask came out empty and nothing said why).
    """
    per_slice = divergence.amax(1)  # [N, M]
    unhealthy = per_slice[labels.flatten() == 1]
    if unhealthy.shape[0] == 0:
        raise HyperparameterError(
            f"AnoFPDM's M_max (diff_max) cannot be estimated: the {per_slice.shape[0]} validation slice(s) include no "
            "unhealthy one (M_max is the largest divergence of the unhealthy validation slices; without it every "
            "test mask would come out empty). A validation split without a subject with a lesion comes from "
            "preprocessing a small data set: preprocess it with --min_val_lesion_subjects 1")
    return unhealthy.amax(0).tolist(), unhealthy.amin(0).tolist()


@dataclass
class Hyperparams:
    """What the validation pass selects (and what the test pass needs)."""

    thr_01: float
    diff_max: list[float]
    diff_min: list[float] = field(default_factory=list)
    n_errors: int = -1
    n_val: int = 0
    n_val_unhealthy: int = 0
    val_accuracy: Optional[float] = None
    source: str = "validation"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Hyperparams":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def fit_hyperparams(stats: StepStats, labels: torch.Tensor) -> Hyperparams:
    """The validation pass: classification threshold and divergence range from slice labels only."""
    labels = labels.flatten().long()
    sim = classification_similarity(stats)
    thr, n_err = select_classification_threshold(sim, labels)
    diff_max, diff_min = select_divergence_range(stats.divergence, labels)
    # accuracy of the selection criterion itself (ties at thr count as correct, as in upstream's error count)
    acc = 1.0 - n_err / labels.numel() if labels.numel() else None
    return Hyperparams(
        thr_01=thr,
        diff_max=diff_max,
        diff_min=diff_min,
        n_errors=n_err,
        n_val=int(labels.numel()),
        n_val_unhealthy=int((labels == 1).sum()),
        val_accuracy=acc,
    )


def upstream_fallback_hyperparams(
    name: str, forward_steps: int, num_modalities: int, cfg: Optional["ForwardConfig"] = None
) -> Hyperparams:
    """Upstream's hard-coded values for ``--num_batches_val 0``; a clear error where upstream had none.

    With ``cfg`` (the run's forward process), the values are refused unless it is the function they were
    measured with: ``--ugp_mode upstream --legacy_ddim_encoding True --d_reverse True --null True`` at the
    recorded ``--w``. This project's default function (null UGP) gives M_t about (1+w)²/w² = 2.25x larger at
    w = 2, so upstream's M_max and thr_01 would silently mean something else.
    """
    key = (name, forward_steps)
    if key not in UPSTREAM_FALLBACK_HYPERPARAMS:
        known = ", ".join(f"--name {n} --forward_steps {f}" for n, f in UPSTREAM_FALLBACK_HYPERPARAMS)
        raise ValueError(
            f"--num_batches_val 0 needs recorded hyper-parameters, which exist only for: {known}; "
            f"got --name {name!r} --forward_steps {forward_steps}. Run a validation pass or pass --hyperparams_file."
        )
    thr, dmax, dmin, w = UPSTREAM_FALLBACK_HYPERPARAMS[key]
    if cfg is not None:
        needed = [flag for flag, ok in (
            ("--ugp_mode upstream", cfg.ugp_mode == "upstream"),
            ("--legacy_ddim_encoding True", cfg.legacy_ddim_encoding),
            ("--d_reverse True", cfg.ddim),
            ("--null True", cfg.encode_null),
            (f"--w {w:g}", cfg.w == w),
        ) if not ok]
        if needed:
            raise ValueError(
                f"--num_batches_val 0 would apply upstream's recorded thr_01 {thr} and diff_max {dmax} "
                f"(--name {name} --forward_steps {forward_steps}), measured with upstream's forward function at "
                f"w = {w:g}, to a different function. Set {' '.join(needed)} to reproduce upstream, or run a "
                "validation pass (--num_batches_val N), or pass --hyperparams_file (e.g. the hyperparams.json of an "
                "earlier run with these settings)."
            )
    if len(dmax) != num_modalities:
        raise ValueError(
            f"recorded hyper-parameters for {name} have {len(dmax)} modalities, --modality gives {num_modalities}"
        )
    return Hyperparams(thr_01=thr, diff_max=list(dmax), diff_min=list(dmin), source=f"upstream fallback {key}")


# --------------------------------------------------------------------------------------------------------
# End step, quantile schedule, aggregation, thresholding, post-processing
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Forward-process predictions
# --------------------------------------------------------------------------------------------------------


@dataclass
class ForwardConfig:
    """Options of the forward-process loop (translation flags in brackets)."""

    w: float  # guidance weight [--w]
    forward_steps: int  # T [--forward_steps]
    modality: Sequence[int] = (0, 3)  # input channels used for the maps [--modality]
    ddim: bool = True  # DDIM deterministic encoding; False: DDPM q_sample with fresh noise [--d_reverse]
    ugp_mode: str = "null"  # "null": UGP with the null embedding (paper); "upstream": healthy-conditional [--ugp_mode]
    encode_null: bool = True  # DDIM inversion with the null embedding (else healthy-conditional) [--null]
    legacy_ddim_encoding: bool = False  # upstream's off-by-one latent [--legacy_ddim_encoding]
    clip_denoised: bool = True  # clamp x̂0 to [-1, 1]
    sub_anomaly: str = "input"  # S_t: "input" (x̂0_w - x0)²; "gradient"/"gradient_para" ablations
    healthy_label: int = 0
    last_only: bool = False  # [--last_only]
    interval: int = 1  # [--subset_interval]
    include_end: bool = False  # include t_e in the window (paper Eq. 20) [--include_t_e]
    store_maps: bool = False  # keep every S_t on the CPU (needed for --t_e_ratio != 1)

    def validate(self, in_channels: Optional[int] = None) -> None:
        if self.forward_steps < 1:
            raise ValueError(f"--forward_steps must be >= 1, got {self.forward_steps}")
        if self.w < 0:
            raise ValueError(
                f"--w must be >= 0 (the guidance weight; paper: BraTS 2, ATLAS 30), got {self.w}. "
                "Upstream's default -1 silently disabled guidance."
            )
        if self.ugp_mode not in UGP_MODES:
            raise ValueError(f"--ugp_mode must be one of {UGP_MODES}, got {self.ugp_mode!r}")
        if self.sub_anomaly not in SUB_ANOMALY_MODES:
            raise ValueError(f"sub-anomaly mode must be one of {SUB_ANOMALY_MODES}, got {self.sub_anomaly!r}")
        if len(self.modality) == 0 or len(set(self.modality)) != len(self.modality):
            raise ValueError(f"--modality must list distinct channel indices, got {list(self.modality)}")
        if in_channels is not None and any(not 0 <= m < in_channels for m in self.modality):
            raise ValueError(f"--modality {list(self.modality)} out of range for {in_channels} input channels")
        if self.interval < 1:
            raise ValueError(f"--subset_interval must be >= 1 (or -1 for off), got {self.interval}")


@dataclass
class ForwardResult:
    stats: StepStats  # [B, T, M] scalars
    maps: torch.Tensor  # [B, M, H, W] aggregated sub-anomaly maps for the argmax end step
    end_step: torch.Tensor  # [B, M] t_e
    sub_anomaly_maps: Optional[torch.Tensor] = None  # [B, T, M, H, W] on the CPU when store_maps


def _at(arr, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a per-step numpy/tensor schedule at steps ``t`` and broadcast to ``like``'s shape."""
    v = torch.as_tensor(np.asarray(arr), dtype=torch.float64)[t.cpu()].to(like.device, like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class ForwardProcess:
    """The HGP/UGP predictions along the forward process for one batch (see the module docstring).

    NFEs per step: the conditional and the null prediction of every row (2B rows). The legacy DDIM encoding adds
    one more prediction per row and step (B rows), because its inversion uses a different timestep label than the
    predictions.

    How the model runs (the same function in every case; outputs agree to float precision):

    * ``max_rows``: rows per model call. None (default): on a CPU, the conditional and the null rows in separate
      calls of at most ``cpu_call_elements`` first-level feature-map elements each (faster per row than one large
      call); on other devices one call of all 2B rows. 0: one call of all 2B rows. An int: separate conditional /
      null calls of at most that many rows.
    * ``channels_last``: convert the model's 4-D weights to ``torch.channels_last`` (in place; the model stays
      converted) and run its convolutions in that layout.
    * ``compile``: run the model through ``torch.compile`` (a fresh model compiles into one graph: HAE models build
      their masks at construction); the first call of each shape pays the compilation.
    """

    # On a CPU a call's cost per row grows once its feature maps outgrow the caches (measured: 2-8 rows of the
    # 64 px, 32-128 channel models are the fastest, 32 rows cost 15-40 % more per row; bench/results/, issue 20)
    cpu_call_elements = 1 << 21

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion,
        cfg: ForwardConfig,
        autocast_dtype: Optional[torch.dtype] = None,
        *,
        max_rows: Optional[int] = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: one call per step; None: chosen for the device), got {max_rows}")
        self.model, self.diffusion, self.cfg = model, diffusion, cfg
        self.autocast_dtype = autocast_dtype
        self.max_rows = max_rows
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.compile = compile
        self._compiled: Optional[Callable] = None

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def rows_per_call(self, x: torch.Tensor) -> Optional[int]:
        """The ``max_rows`` used for a batch like ``x`` (None: all 2B rows in one call)."""
        if self.max_rows is not None:
            return self.max_rows or None
        if x.device.type != "cpu":
            return None
        width = getattr(self.model, "model_channels", 64) * getattr(self.model, "channel_mult", (1,))[0]
        return max(1, self.cpu_call_elements // int(width * x.shape[-2] * x.shape[-1]))

    def _network(self) -> Callable:
        """The model as called: compiled at first use when asked (HAE models build their masks at construction,
        so compiled code only reads them)."""
        if not self.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _xstart(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x0 = self.diffusion.predict_xstart_from_eps(x, t, eps)
        return x0.clamp(-1, 1) if self.cfg.clip_denoised else x0

    def _guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict:
        with self._autocast(x.device):
            out = self.diffusion.guided_eps(self._network(), self._inputs(x), t, y, self.cfg.w,
                                            max_rows=self.rows_per_call(x))
        return {k: v.float().contiguous() for k, v in out.items() if v is not None}

    def _encode_eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps for the inversion: null embedding with --null True, else healthy-conditional (B rows).

        Goes through the diffusion (so respaced timesteps are mapped like every other call); only the legacy
        encoding needs this separate forward.
        """
        with self._autocast(x.device):
            eps = self.diffusion.condition_eps(self._network(), self._inputs(x), t, y, null=self.cfg.encode_null,
                                               max_rows=self.rows_per_call(x) or x.shape[0])
        return eps.float().contiguous()

    def _inversion_step(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """DDIM inversion t -> t+1 from eps at (x, t), eps re-derived from the clipped x̂0 as upstream does."""
        return self.diffusion.ddim_reverse_step_from_eps(x, t, eps, clip_denoised=self.cfg.clip_denoised)

    def _sub_anomaly(self, x0g: torch.Tensor, x0u: torch.Tensor, src: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.sub_anomaly == "input":
            return (x0g - src) ** 2
        sam = (x0g - x0u) ** 2
        if self.cfg.sub_anomaly == "gradient":
            abar = _at(self.diffusion.alphas_cumprod, t, sam)
            b_t = (1 - abar) / abar.sqrt()
            sam = sam / (b_t**2 * (1 + self.cfg.w) ** 2)
        return sam

    @torch.no_grad()
    def run(
        self,
        x0: torch.Tensor,
        *,
        with_maps: bool = True,
        generator: Optional[torch.Generator] = None,
        progress: Optional[Callable[[int], None]] = None,
        noise_rows: Optional[tuple[int, int, int]] = None,
    ) -> ForwardResult:
        """Run T forward steps on the batch ``x0`` ``[B, C, H, W]`` in [-1, 1].

        ``noise_rows=(global_batch, rank, world_size)``: draw the noise for the whole global batch and keep the
        rows ``rank::world_size`` (this rank's share of it), so every slice gets the same noise whatever the
        number of processes.
        """
        cfg = self.cfg
        cfg.validate(x0.shape[1])
        b = x0.shape[0]
        device = x0.device
        if device.type == "cuda":
            from guided_diffusion import runtime

            runtime.configure_cuda()  # TF32 off (fp32 is fp32), cuDNN autotuning on: runtime.py says why
        mod = list(cfg.modality)
        src = x0[:, mod].float()
        y = torch.full((b,), cfg.healthy_label, dtype=torch.long, device=device)
        agg = StreamingAggregator(last_only=cfg.last_only, interval=cfg.interval, include_end=cfg.include_end)
        stored = [] if cfg.store_maps else None
        stats = {k: [] for k in StepStats.__dataclass_fields__}

        def noise() -> torch.Tensor:
            if noise_rows is None:
                return torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
            rows, rank, world = noise_rows
            full = torch.randn((rows, *x0.shape[1:]), generator=generator, dtype=torch.float32)
            return full[rank::world][:b].to(device)

        x = None
        for step in range(cfg.forward_steps):
            t = torch.full((b,), step, dtype=torch.long, device=device)
            if not cfg.ddim:
                x = self.diffusion.q_sample(x0, t, noise=noise())
            elif step == 0:
                # the paper's x_1: q_sample to the first level (seeded noise at scale sqrt(1 - abar_0) = 0.01)
                x = self.diffusion.q_sample(x0, t, noise=noise())
            elif cfg.legacy_ddim_encoding:
                # upstream: invert with the model at label t from the latent of label t-1 -> level t+1, labelled t
                x = self._inversion_step(x, t, self._encode_eps(x, t, y))
            # (correct DDIM encoding: x was advanced at the end of the previous step)

            out = self._guided(x, t, y)
            eps_u = out["eps_null"] if cfg.ugp_mode == "null" else out["eps_cond"]
            x0g = self._xstart(x, t, out["eps"])[:, mod]
            x0u = self._xstart(x, t, eps_u)[:, mod]
            sam = self._sub_anomaly(x0g, x0u, src, t)
            stats["mse_guided"].append(((x0g - src) ** 2).mean((-2, -1)))
            stats["mse_unguided"].append(((x0u - src) ** 2).mean((-2, -1)))
            div = ((x0g - x0u) ** 2).mean((-2, -1))
            stats["divergence"].append(div)
            stats["sam_mean"].append(sam.mean((-2, -1)))
            if with_maps:
                agg.update(step, sam, div)
                if stored is not None:
                    stored.append(sam.cpu())

            if cfg.ddim and not cfg.legacy_ddim_encoding and step + 1 < cfg.forward_steps:
                # the inversion eps at (x_t, t) is already known from this step's batched forward
                eps_enc = out["eps_null"] if cfg.encode_null else out["eps_cond"]
                x = self._inversion_step(x, t, eps_enc)
            if progress is not None:
                progress(1)

        step_stats = StepStats(**{k: torch.stack(v, 1).float() for k, v in stats.items()})
        if with_maps:
            maps, t_e = agg.maps, agg.end_step
        else:
            maps, t_e = torch.zeros(0), end_steps(step_stats.divergence)
        return ForwardResult(
            stats=step_stats,
            maps=maps,
            end_step=t_e,
            sub_anomaly_maps=torch.stack(stored, 1) if stored else None,
        )


# --------------------------------------------------------------------------------------------------------
# Test pass for one batch
# --------------------------------------------------------------------------------------------------------


def segment_batch(
    result: ForwardResult,
    hyper: Hyperparams,
    cfg: ForwardConfig,
    *,
    t_e_ratio: float = 1.0,
    median_kernel: int = 5,
    cc_max_size: int = 40,
    a: float = A_QUANTILE,
    b: float = B_QUANTILE,
) -> dict:
    """Classification, end steps, quantile threshold, anomaly map and post-processed mask of one batch.

    Returns tensors: ``similarity [B]``, ``pred_label [B]``, ``end_step [B,M]`` (after ``t_e_ratio``),
    ``quantile [B,M]``, ``threshold [B]``, ``anomaly_map [B,1,H,W]``, ``mask bool [B,1,H,W]`` (every slice,
    i.e. the unhealthy-setup mask; the mixed setup zeroes slices with ``pred_label == 0``).
    """
    stats = result.stats
    if len(hyper.diff_max) != stats.divergence.shape[-1]:
        raise ValueError(
            f"hyper-parameters have {len(hyper.diff_max)} modalities, the batch has {stats.divergence.shape[-1]}"
        )
    sim = classification_similarity(stats)
    pred_label = classify(sim, hyper.thr_01)
    t_e = end_steps(stats.divergence)
    q = quantile_levels(stats.divergence.amax(1), hyper.diff_max, a, b)
    if t_e_ratio == 1:
        maps = result.maps
    else:
        if result.sub_anomaly_maps is None:
            raise ValueError("t_e_ratio != 1 needs the per-step maps: run the forward process with store_maps=True")
        t_e = scale_end_steps(t_e, t_e_ratio)
        w = aggregation_weights(
            t_e, stats.divergence.shape[1], last_only=cfg.last_only, interval=cfg.interval, include_end=cfg.include_end
        )
        maps = aggregate_maps(result.sub_anomaly_maps, w.cpu()).to(result.maps.device)
    amap, mask, thr = threshold_maps(maps, q.to(maps.device), median_kernel)
    mask = remove_small_components(mask, cc_max_size)
    return {
        "similarity": sim,
        "pred_label": pred_label,
        "end_step": t_e,
        "quantile": q,
        "threshold": thr,
        "anomaly_map": amap,
        "mask": mask,
    }


# --------------------------------------------------------------------------------------------------------
# AnoFPDM behind the evaluation driver (methods/base.py)
# --------------------------------------------------------------------------------------------------------

from guided_diffusion.methods.base import BatchContext, SliceMethod, SliceOutput, require_classifier_free  # noqa: E402


@dataclass(frozen=True)
class AnoFPDMSettings:
    """AnoFPDM's flags (upstream ``translation_FPDM.py``'s names, then this project's additions)."""

    w: float = option(2.0, "guidance weight of the healthy guided prediction (paper: BraTS 2, ATLAS 30)")
    forward_steps: int = option(600, "forward steps T (on the --timestep_respacing grid; paper: 600 of 1000)")
    d_reverse: bool = option(True, "DDIM encoding (deterministic, \"AnoFPDM (DDIM)\"); false: DDPM q_sample")
    null: bool = option(True, "encode with the null embedding (paper); false: healthy-conditional")
    ugp_mode: str = option("null", "unguided prediction: null embedding (paper) or upstream's healthy-conditional "
                           "one (reproduces upstream's numbers)", choices=UGP_MODES)
    legacy_ddim_encoding: bool = option(False, "upstream's off-by-one DDIM encoding (reproduces upstream's numbers)")
    last_only: bool = option(False, "aggregate only the map at t_e - 1 (the paper's S_te rows)")
    subset_interval: int = option(-1, "aggregate every k-th step before t_e, plus t_e (<= 0: every step)")
    include_t_e: bool = option(False, "include t_e in the aggregation window (paper Eq. 20; upstream excludes it)")
    t_e_ratio: List[float] = option([1.0], "scale t_e before aggregating; several values give several results, the "
                                    "first is metrics.json's", comma_list=True)
    quantile_a: float = option(A_QUANTILE, "mask quantile for the strongest anomalies (Algorithm 1's a)")
    quantile_b: float = option(B_QUANTILE, "mask quantile for the weakest anomalies (Algorithm 1's b)")
    use_gradient_sam: bool = option(False, "ablation: gradient sub-anomaly maps")
    use_gradient_para_sam: bool = option(False, "ablation: parallel-gradient sub-anomaly maps")

    def __post_init__(self) -> None:
        if self.w < 0:
            raise ValueError(f"--w {self.w}: the guidance weight must be >= 0 (paper: BraTS 2, ATLAS 30)")
        if self.forward_steps < 1:
            raise ValueError(f"--forward_steps must be >= 1, got {self.forward_steps}")
        if self.use_gradient_sam and self.use_gradient_para_sam:
            raise ValueError("--use_gradient_sam and --use_gradient_para_sam are exclusive")
        if not self.t_e_ratio or any(not r > 0 for r in self.t_e_ratio):
            raise ValueError(f"--t_e_ratio values must be > 0 (1: t_e as found), got {list(self.t_e_ratio)}")
        if not 0 <= self.quantile_a <= self.quantile_b <= 1:
            raise ValueError(f"need 0 <= --quantile_a ({self.quantile_a}) <= --quantile_b ({self.quantile_b}) <= 1")


def forward_config(o: AnoFPDMSettings, modality: Sequence[int]) -> ForwardConfig:
    """The forward loop's options from AnoFPDM's settings and the map's channels."""
    sub = "gradient" if o.use_gradient_sam else ("gradient_para" if o.use_gradient_para_sam else "input")
    return ForwardConfig(
        w=o.w,
        forward_steps=o.forward_steps,
        modality=list(modality),
        ddim=o.d_reverse,
        ugp_mode=o.ugp_mode,
        encode_null=o.null,
        legacy_ddim_encoding=o.legacy_ddim_encoding,
        sub_anomaly=sub,
        last_only=o.last_only,
        interval=o.subset_interval if o.subset_interval > 0 else 1,
        include_end=o.include_t_e,
        store_maps=any(r != 1 for r in o.t_e_ratio),
    )


class AnoFPDM(SliceMethod):
    """AnoFPDM as a slice method: validation records are the per-step curves ``StepStats`` ``[B, T, M]``;
    ``fit`` selects ``thr_01`` and ``M_max`` from slice labels only; ``test_batch`` runs ``segment_batch`` for every
    ``--t_e_ratio`` (the first is the main result, the others are ``variants``)."""

    name = "anofpdm"
    uses_pixel_labels = False
    variant_key = "t_e_ratio"
    caption_columns = ("end_step",)
    Settings = AnoFPDMSettings

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion,
        cfg: ForwardConfig,
        *,
        checkpoint: Optional[str] = None,
        t_e_ratio: Sequence[float] = (1.0,),
        median_kernel: int = 5,
        cc_max_size: int = 40,
        a: float = A_QUANTILE,
        b: float = B_QUANTILE,
        precision: str = "fp32",
        dataset: str = "brats",
        max_rows: Optional[int] = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        from guided_diffusion.methods.base import autocast_dtype

        cfg.validate()
        if len(t_e_ratio) == 0:
            raise ValueError("--t_e_ratio needs at least one value")
        if any(r != 1 for r in t_e_ratio) and not cfg.store_maps:
            raise ValueError("t_e_ratio != 1 needs the per-step maps: build the ForwardConfig with store_maps=True")
        self.model, self.diffusion, self.cfg = model, diffusion, cfg
        self.checkpoint, self.t_e_ratio = checkpoint, [float(r) for r in t_e_ratio]
        self.median_kernel, self.cc_max_size, self.a, self.b = median_kernel, cc_max_size, a, b
        self.precision, self.dataset = precision, dataset
        self.process = ForwardProcess(model, diffusion, cfg, autocast_dtype(precision), max_rows=max_rows,
                                      channels_last=channels_last, compile=compile)

    @classmethod
    def check(cls, s) -> None:
        o = s.options
        require_classifier_free(s.source.model, "AnoFPDM", f" (from {s.source.flags_source})")
        if o.forward_steps > s.grid_steps:
            raise ValueError(f"--forward_steps must lie in [1, {s.grid_steps}] (the diffusion's steps"
                             f"{', respaced' if s.source.model.timestep_respacing else ''}), got {o.forward_steps}")
        forward_config(o, s.maps.modality).validate(s.source.model.in_channels)

    @classmethod
    def build(cls, s, device: torch.device) -> "AnoFPDM":
        from guided_diffusion import logger

        o = s.options
        model, diffusion, path = s.source.load(device, warn=logger.warn)
        return cls(model, diffusion, forward_config(o, s.maps.modality), checkpoint=path, t_e_ratio=o.t_e_ratio,
                   median_kernel=s.maps.kernel, cc_max_size=s.component_size, a=o.quantile_a, b=o.quantile_b,
                   precision=s.precision, dataset=s.dataset,
                   max_rows=None if s.compute.max_rows < 0 else s.compute.max_rows,
                   channels_last=s.compute.channels_last, compile=s.compute.compile)

    def settings(self) -> dict:
        c = self.cfg
        return {"method": self.name, "w": c.w, "forward_steps": c.forward_steps, "modality": list(c.modality),
                "d_reverse": c.ddim, "ugp_mode": c.ugp_mode, "null": c.encode_null,
                "legacy_ddim_encoding": c.legacy_ddim_encoding, "sub_anomaly": c.sub_anomaly,
                "clip_denoised": c.clip_denoised, "healthy_label": c.healthy_label, "last_only": c.last_only,
                "subset_interval": c.interval, "include_t_e": c.include_end, "t_e_ratio": self.t_e_ratio,
                "median_kernel": self.median_kernel, "cc_max_size": self.cc_max_size, "quantile_a": self.a,
                "quantile_b": self.b, "precision": self.precision}

    #: settings that act on the test maps only: thr_01 and M_max come from the validation curves, which they leave as
    #: they are (the curves of the guided and unguided MSE and the divergence M_t do not depend on S_t)
    TEST_ONLY_SETTINGS = ("t_e_ratio", "median_kernel", "cc_max_size", "quantile_a", "quantile_b", "last_only",
                          "subset_interval", "include_t_e", "sub_anomaly")

    def fit_settings(self) -> dict:
        return {k: v for k, v in self.settings().items() if k not in self.TEST_ONLY_SETTINGS}

    def checkpoints(self) -> list:
        return [self.checkpoint] if self.checkpoint else []

    def steps_per_batch(self, split: str) -> int:
        return self.cfg.forward_steps

    def variants(self) -> list:
        return list(self.t_e_ratio)

    def _run(self, x: torch.Tensor, ctx: BatchContext, with_maps: bool) -> ForwardResult:
        return self.process.run(x.float(), with_maps=with_maps, generator=ctx.generator, progress=ctx.progress,
                                noise_rows=ctx.noise_rows(x.shape[0]))

    def validation_batch(self, x: torch.Tensor, ctx: BatchContext) -> dict:
        return self._run(x, ctx, with_maps=False).stats.to_numpy()

    def fit(self, records: dict, labels: np.ndarray, gt_masks: Optional[np.ndarray]) -> dict:
        # slice labels only: the driver passes no pixel labels to a method that does not declare them
        stats = StepStats.from_numpy(records)
        return fit_hyperparams(stats, torch.as_tensor(np.asarray(labels)).long()).to_dict()

    def hyperparams_without_validation(self) -> dict:
        hyper = upstream_fallback_hyperparams(self.dataset, self.cfg.forward_steps, len(self.cfg.modality), self.cfg)
        return hyper.to_dict()

    def check_hyperparams(self, hyper: dict) -> dict:
        missing = [k for k in ("thr_01", "diff_max") if k not in hyper]
        if missing:
            raise ValueError(f"AnoFPDM hyper-parameters need {' and '.join(missing)}")
        number = (int, float)
        if not isinstance(hyper["thr_01"], number) or isinstance(hyper["thr_01"], bool):
            raise ValueError(f"thr_01 must be a number, got {hyper['thr_01']!r}")
        if not math.isfinite(hyper["thr_01"]):
            raise ValueError(f"thr_01 must be a finite number (a cosine similarity), got {hyper['thr_01']!r}")
        for key in ("diff_max", "diff_min"):
            values = hyper.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, number) and not isinstance(v, bool)
                                                       for v in values):
                raise ValueError(f"{key} must be a list of numbers (one per --modality), got {values!r}")
        # M_t is a mean squared difference: M_max > 0 (it divides M_te in the quantile schedule), M_min >= 0
        if not all(math.isfinite(v) and v > 0 for v in hyper["diff_max"]):
            raise ValueError(f"diff_max (M_max, the largest divergence of the unhealthy validation slices) must be "
                             f"positive finite numbers, got {hyper['diff_max']!r}")
        if not all(math.isfinite(v) and v >= 0 for v in hyper.get("diff_min", [])):
            raise ValueError(f"diff_min (M_min) must be finite numbers >= 0, got {hyper['diff_min']!r}")
        h = Hyperparams.from_dict(hyper)
        if len(h.diff_max) != len(self.cfg.modality):
            raise ValueError(f"{len(h.diff_max)} modalities in diff_max; --modality gives {len(self.cfg.modality)}")
        return dict(hyper, **{k: getattr(h, k) for k in ("thr_01", "diff_max", "diff_min", "source")})

    def describe(self, hyper: dict) -> str:
        h = Hyperparams.from_dict(hyper)
        return (f"thr_01 {h.thr_01:.8f}, diff_max {h.diff_max}, diff_min {h.diff_min}, val errors {h.n_errors} of "
                f"{h.n_val} ({h.n_val_unhealthy} unhealthy), val accuracy {h.val_accuracy} ({h.source})")

    def test_batch(self, x: torch.Tensor, hyper: dict, ctx: BatchContext) -> SliceOutput:
        h = Hyperparams.from_dict(hyper)
        res = self._run(x, ctx, with_maps=True)
        outputs = []
        for ratio in self.t_e_ratio:
            seg = segment_batch(res, h, self.cfg, t_e_ratio=ratio, median_kernel=self.median_kernel,
                                cc_max_size=self.cc_max_size, a=self.a, b=self.b)
            outputs.append(SliceOutput(
                anomaly_map=seg["anomaly_map"].float(),
                mask=seg["mask"].bool(),
                pred_label=seg["pred_label"].long(),
                columns={"similarity": seg["similarity"].cpu().numpy(), "threshold": seg["threshold"].cpu().numpy(),
                         "end_step": seg["end_step"].cpu().numpy(), "quantile": seg["quantile"].cpu().numpy()},
            ))
        main = outputs[0]
        main.arrays = res.stats.to_numpy()  # mse_guided, mse_unguided, divergence, sam_mean [B, T, M]
        main.variants = outputs[1:]
        return main
