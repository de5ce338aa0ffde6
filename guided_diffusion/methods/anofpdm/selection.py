"""AnoFPDM's per-step statistics and what validation selects from them (slice labels only).

The cosine similarity of the guided and unguided errors over the forward steps separates healthy from unhealthy
slices (``thr_01``); the largest divergence M_t of the unhealthy slices (``M_max``) scales the mask quantile.
Upstream's recorded values (``--num_batches_val 0``) are here too, with the function they were measured with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.errors import HyperparameterError
from guided_diffusion.methods.anofpdm.config import ForwardConfig

# Upstream scans these quantiles of the healthy validation cosine similarities for the classification threshold.
CLS_QUANTILES = (0.005, 0.095, 100)
COSINE_EPS = 1e-6

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
    name: str, forward_steps: int, num_modalities: int, cfg: Optional[ForwardConfig] = None
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
