"""Attention dropout of the block-sparse kernel against expectations written out here (not the kernel's helpers).

With v = I (one value channel per key) the output row i is the vector of dropped, rescaled attention weights
P_ij * keep_ij / (1 - p), so the dropout mask and its scale can be read off the output and compared with the
softmax computed in the test.
"""

import math

import pytest
import torch

from guided_diffusion.models.sparse_attention import band_random_mask, build_mask_plan, masked_attention

from conftest import requires_cuda

B, H, L, C = 2, 4, 64, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0, device="cpu"):
    mask = band_random_mask(L, torch.Generator().manual_seed(seed))  # True = blocked
    mask[3, :] = True
    mask[3, 3] = False  # a row that may only attend to itself
    mask = mask.to(device)
    plan = build_mask_plan(mask, block_size=16)
    gen = torch.Generator().manual_seed(seed + 1)
    q, k = (torch.randn(B, H, L, C, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    logits = q @ k.transpose(-1, -2) / math.sqrt(C)
    probs = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)  # the attention weights, no dropout
    return mask, plan, q, k, probs


def _identity_values(device="cpu"):
    return torch.eye(L, dtype=torch.float64, device=device).expand(B, H, L, L).contiguous()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
def test_dropout_zeroes_weights_with_probability_p_and_scales_the_rest_by_1_over_1_minus_p(device):
    """On CUDA the keep bits come from CUDA generators (other bits, the same law)."""
    mask, plan, q, k, probs = _setup(device=device)
    allowed = ~mask
    p, seeds = 0.3, 25
    eye = _identity_values(device)
    dropped = 0
    total = 0
    mean_out = torch.zeros(B, H, L, L, dtype=torch.float64, device=device)
    for seed in range(seeds):
        out = masked_attention(q, k, eye, plan, dropout_p=p, training=True, seed=1000 + seed)
        assert torch.all(out[:, :, mask] == 0)  # blocked keys get no weight
        ratio = out[:, :, allowed] / probs[:, :, allowed]
        kept = ratio > 0.5
        # every allowed weight is either dropped (0) or kept and multiplied by exactly 1 / (1 - p)
        torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), rtol=1e-12, atol=0)
        assert torch.all(ratio[~kept].abs() < 1e-12)
        dropped += int((~kept).sum())
        total += kept.numel()
        mean_out += out / seeds
    fraction = dropped / total
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(fraction - p) < 5 * sigma, (fraction, p, sigma)
    # E[output] = the output without dropout (here the weights themselves), within the sampling error
    err = (mean_out - probs)[:, :, allowed]
    sd = (probs[:, :, allowed] * math.sqrt(p / (1 - p) / seeds))  # per-entry standard error of the mean
    assert (err / sd).pow(2).mean() < 1.3  # ~1 for an unbiased mean; a wrong scale gives far more
    assert abs(float(mean_out[:, :, allowed].sum() / probs[:, :, allowed].sum()) - 1) < 0.01


def test_dropout_masks_are_independent_across_rows_heads_and_samples():
    """Over many seeds, no two weights' keep bits are correlated: not across the slots of a row, the query blocks
    (rows 2, 18, 40 lie in blocks 0, 1, 2), the heads or the samples of a batch."""
    mask, plan, q, k, _ = _setup(3)
    p, seeds = 0.5, 200
    rows = [2, 18, 40]
    eye = _identity_values()
    bits = []
    for seed in range(seeds):
        out = masked_attention(q, k, eye, plan, dropout_p=p, training=True, seed=5000 + seed)
        bits.append(torch.cat([(out[:, :, r] > 0)[:, :, ~mask[r]].reshape(-1) for r in rows]))
    x = torch.stack(bits).double()  # [seeds, entries]
    assert abs(float(x.mean()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / x.numel())
    z = (x - x.mean(0)) / x.std(0)
    corr = (z.T @ z) / (seeds - 1)
    off = corr - torch.diag(torch.diag(corr))
    # independent bits: |corr| ~ N(0, 1/seeds), max over ~2e4 pairs about 0.3; shared draws give 1
    assert off.abs().max() < 0.5, float(off.abs().max())


def test_dropout_forward_and_backward_equal_the_formula_with_the_read_off_mask():
    """Read the keep-mask off a v = I run, then check a run with random v (same seed, so the same mask) against
    softmax(q k^T / sqrt(c) + mask) * keep / (1 - p) @ v, values and gradients."""
    mask, plan, q, k, _ = _setup(5)
    p, seed = 0.25, 99
    keep = masked_attention(q, k, _identity_values(), plan, dropout_p=p, training=True, seed=seed) > 0
    v = torch.randn(B, H, L, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, plan, dropout_p=p, training=True, seed=seed)
    weights = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(C)).masked_fill(mask, float("-inf")), dim=-1)
    ref = (weights * keep / (1 - p)) @ v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(out)
    for name, g, rg in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out),
                           torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-11, msg=lambda m: f"d{name}: {m}")


def test_eval_mode_and_p_zero_apply_no_dropout():
    mask, plan, q, k, probs = _setup(8)
    eye = _identity_values()
    torch.testing.assert_close(masked_attention(q, k, eye, plan, dropout_p=0.4, training=False), probs,
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(masked_attention(q, k, eye, plan, dropout_p=0.0, training=True, seed=1), probs,
                               rtol=1e-12, atol=1e-15)
