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

The package, by job, each module importing only those before it: ``config`` (the forward loop's options),
``selection`` (per-step statistics, validation's thr_01 and M_max, upstream's recorded values), ``maps`` (end step,
quantile schedule, aggregation, thresholding), ``forward`` (the forward-process loop, ``ForwardProcess``) and
``method`` (``segment_batch`` and ``AnoFPDM``, the slice method behind the evaluation driver, with its flags).
"""

from __future__ import annotations

from guided_diffusion.methods.anofpdm.config import SUB_ANOMALY_MODES, UGP_MODES, ForwardConfig  # noqa: F401
from guided_diffusion.methods.anofpdm.forward import ForwardProcess, ForwardResult  # noqa: F401
from guided_diffusion.methods.anofpdm.maps import (  # noqa: F401
    A_QUANTILE,
    B_QUANTILE,
    StreamingAggregator,
    aggregate_maps,
    aggregation_weights,
    end_steps,
    quantile_levels,
    rowwise_quantile,
    scale_end_steps,
    threshold_maps,
)
from guided_diffusion.methods.anofpdm.method import AnoFPDM, AnoFPDMSettings, forward_config, segment_batch  # noqa: F401
from guided_diffusion.methods.anofpdm.selection import (  # noqa: F401
    CLS_QUANTILES,
    COSINE_EPS,
    UPSTREAM_FALLBACK_HYPERPARAMS,
    Hyperparams,
    StepStats,
    classification_similarity,
    classify,
    cosine_similarity_over_steps,
    fit_hyperparams,
    select_classification_threshold,
    select_divergence_range,
    upstream_fallback_hyperparams,
)

__all__ = [
    "A_QUANTILE",
    "B_QUANTILE",
    "CLS_QUANTILES",
    "COSINE_EPS",
    "UGP_MODES",
    "SUB_ANOMALY_MODES",
    "UPSTREAM_FALLBACK_HYPERPARAMS",
    "StepStats",
    "cosine_similarity_over_steps",
    "classification_similarity",
    "classify",
    "select_classification_threshold",
    "select_divergence_range",
    "Hyperparams",
    "fit_hyperparams",
    "upstream_fallback_hyperparams",
    "end_steps",
    "scale_end_steps",
    "quantile_levels",
    "aggregation_weights",
    "aggregate_maps",
    "StreamingAggregator",
    "rowwise_quantile",
    "threshold_maps",
    "segment_batch",
    "ForwardConfig",
    "ForwardResult",
    "ForwardProcess",
    "AnoFPDMSettings",
    "forward_config",
    "AnoFPDM",
]
