"""Likelihood helpers for the variational-bound (VB) term of diffusion training.

Only used when the model learns its variance (``learn_sigma``) or trains on the KL (``use_kl``).
"""

from __future__ import annotations

import math

import torch as th


def mean_flat(tensor: th.Tensor) -> th.Tensor:
    """Mean over every dimension except the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> th.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast; scalars are allowed for all but one of them.
    """
    reference = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, th.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        v if isinstance(v, th.Tensor) else th.tensor(v, dtype=reference.dtype, device=reference.device)
        for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: th.Tensor) -> th.Tensor:
    """Fast tanh approximation of the standard normal CDF (as in guided-diffusion)."""
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: th.Tensor, *, means: th.Tensor, log_scales: th.Tensor
) -> th.Tensor:
    """Log-likelihood (nats, elementwise) of data in [-1, 1] quantised to 256 bins under a Gaussian.

    The outermost bins extend to -inf / +inf so the probabilities sum to one.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, th.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs
