"""guided_diffusion.models.sparse_attention: exact versus dense masked attention, dropout, memory."""


import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.models.sparse_attention import (
    band_random_mask,
    build_mask_plan,
    dense_masked_attention,
    draw_dropout_seed,
    dropout_keep_mask,
    masked_attention,
    multihead_self_attention,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_mask(length: int, blocked_fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(length, length, generator=gen) < blocked_fraction
    mask.fill_diagonal_(False)
    return mask


def _qkv(batch, heads, length, channels, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, length, channels, generator=gen, dtype=dtype).to(device).requires_grad_()
        for _ in range(3)
    ]


def _plan_allowed(plan) -> torch.Tensor:
    """Dense [L, L] count of how often the plan visits each (row, column) as an allowed key."""
    counts = torch.zeros(plan.length, plan.length, dtype=torch.long)
    for block in range(plan.num_blocks):
        r0, r1 = plan.block_rows(block)
        w0 = plan.window_starts[block]
        counts[r0:r1, w0 : w0 + plan.window] += (~plan.window_blocked[r0:r1]).long().cpu()
        if plan.num_outside:
            valid = (~plan.outside_blocked[r0:r1]).long().cpu()
            counts[r0:r1].scatter_add_(1, plan.outside_index[r0:r1].cpu(), valid)
    return counts


def _compare(mask, block_size, dropout_p, batch=2, heads=8, channels=8, dtype=torch.float64, tol=1e-10):
    plan = build_mask_plan(mask, block_size)
    q, k, v = _qkv(batch, heads, mask.shape[0], channels, dtype, seed=mask.shape[0], device=mask.device)
    seed = 1234
    out = masked_attention(q, k, v, plan, dropout_p, training=True, seed=seed)
    keep = dropout_keep_mask(plan, seed, batch, heads, dropout_p) if dropout_p > 0 else None
    ref = dense_masked_attention(q, k, v, mask, keep, dropout_p)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")
    return plan


MASKS = {
    "band_random_17_diagonal_only": lambda: band_random_mask(17, torch.Generator().manual_seed(1)),
    "band_random_69": lambda: band_random_mask(69, torch.Generator().manual_seed(2)),
    "band_random_276": lambda: band_random_mask(276, torch.Generator().manual_seed(3)),
    "band_random_300": lambda: band_random_mask(300, torch.Generator().manual_seed(4)),
    "random_dense_200": lambda: _random_mask(200, 0.5, 5),
    "random_sparse_150": lambda: _random_mask(150, 0.95, 6),
}


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_plan_visits_every_allowed_pair_exactly_once(mask_name):
    mask = MASKS[mask_name]()
    for block_size in (16, 64, 128):
        counts = _plan_allowed(build_mask_plan(mask, block_size))
        assert torch.equal(counts, (~mask).long())


def test_band_random_mask_structure():
    mask = band_random_mask(1104, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (1104, 1104)
    assert not mask.diagonal().any()
    k = 110
    assert not mask[500, 500 - k // 2 : 500 + k // 2 + 1].any()
    density = (~mask).float().mean().item()
    assert 0.11 < density < 0.13  # upstream measured 12.0% at L = 1104
    assert torch.equal(band_random_mask(17), ~torch.eye(17, dtype=torch.bool))  # k = 1: diagonal only


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_dense_float64(mask_name, dropout_p):
    mask = MASKS[mask_name]()
    for block_size in (32, 128):
        _compare(mask, block_size, dropout_p)


def test_matches_dense_float32():
    mask = band_random_mask(276, torch.Generator().manual_seed(7))
    _compare(mask, 64, 0.1, dtype=torch.float32, tol=2e-5)


def test_fully_blocked_row_gives_zeros():
    mask = _random_mask(40, 0.7, 8)
    mask[5] = True
    plan = _compare(mask, 16, 0.2, batch=1, heads=2)
    q, k, v = _qkv(1, 2, 40, 4)
    out = masked_attention(q, k, v, plan)
    assert torch.all(out[:, :, 5] == 0)
    (grad_q,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(grad_q).all() and torch.all(grad_q[:, :, 5] == 0)


def test_matches_nn_multihead_attention():
    """Same convention as nn.MultiheadAttention (bool mask True = blocked, 1/sqrt(c) scale)."""
    torch.manual_seed(0)
    length, embed, heads = 69, 64, 8
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True).double().eval()
    mask = band_random_mask(length, torch.Generator().manual_seed(9))
    x = torch.randn(3, length, embed, dtype=torch.float64)
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = masked_attention(q, k, v, build_mask_plan(mask, 32), dropout_p=0.1, training=False)
    out = mha.out_proj(out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs_and_grad():
    """q, k, v as MHA produces them ([B, L, H, c] transposed) and a non-contiguous grad_out."""
    mask = band_random_mask(128, torch.Generator().manual_seed(17))  # L a multiple of block_size
    plan = build_mask_plan(mask, 64)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 128, 8, 4, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
        for _ in range(3)
    )
    out = masked_attention(q, k, v, plan, 0.2, training=True, seed=9)
    ref = dense_masked_attention(q, k, v, mask, dropout_keep_mask(plan, 9, 2, 8, 0.2), 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(2, 128, 8, 4, generator=gen, dtype=torch.float64).transpose(1, 2)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


def test_multihead_self_attention_helper():
    torch.manual_seed(0)
    length, embed, heads = 100, 32, 8
    mha = torch.nn.MultiheadAttention(embed, heads, dropout=0.25, batch_first=True).double()
    mask = band_random_mask(length, torch.Generator().manual_seed(18))
    plan = build_mask_plan(mask, 32)
    x = torch.randn(2, length, embed, dtype=torch.float64, requires_grad=True)
    mha.eval()
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(multihead_self_attention(mha, x, plan), expected, rtol=1e-10, atol=1e-10)
    mha.train()
    out = multihead_self_attention(mha, x, plan, seed=21)
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    ref = dense_masked_attention(q, k, v, mask, dropout_keep_mask(plan, 21, 2, heads, 0.25), 0.25)
    ref = mha.out_proj(ref.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.sum(), (x, mha.in_proj_weight))
    ref_grads = torch.autograd.grad(ref.sum(), (x, mha.in_proj_weight))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


def test_eval_ignores_dropout_and_dropout_changes_training_output():
    mask = band_random_mask(100, torch.Generator().manual_seed(10))
    plan = build_mask_plan(mask, 32)
    q, k, v = _qkv(2, 8, 100, 8)
    plain = dense_masked_attention(q, k, v, mask)
    torch.testing.assert_close(masked_attention(q, k, v, plan, dropout_p=0.5, training=False), plain)
    torch.testing.assert_close(masked_attention(q, k, v, plan, dropout_p=0.0, training=True), plain)
    assert not torch.allclose(masked_attention(q, k, v, plan, dropout_p=0.5, training=True), plain)


def test_dropout_seed_determinism_and_keep_rate():
    mask = band_random_mask(276, torch.Generator().manual_seed(11))
    plan = build_mask_plan(mask, 64)
    q, k, v = _qkv(2, 8, 276, 8)
    torch.manual_seed(5)
    first = masked_attention(q, k, v, plan, 0.3, training=True)
    torch.manual_seed(5)
    seed = draw_dropout_seed("cpu")
    torch.manual_seed(5)
    second = masked_attention(q, k, v, plan, 0.3, training=True)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, masked_attention(q, k, v, plan, 0.3, training=True, seed=seed))
    assert not torch.allclose(first, masked_attention(q, k, v, plan, 0.3, training=True))  # fresh seed
    keep = dropout_keep_mask(plan, seed, 2, 8, 0.3)
    assert keep.shape == (2, 8, 276, 276)
    kept = keep[:, :, ~mask].float().mean().item()
    assert abs(kept - 0.7) < 0.01
    assert torch.equal(keep, dropout_keep_mask(plan, seed, 2, 8, 0.3))
    assert not torch.equal(keep, dropout_keep_mask(plan, seed + 1, 2, 8, 0.3))


def test_checkpoint_reproduces_dropout():
    from torch.utils.checkpoint import checkpoint

    mask = band_random_mask(150, torch.Generator().manual_seed(12))
    plan = build_mask_plan(mask, 32)
    q, k, v = _qkv(1, 8, 150, 8)

    def f(q, k, v):
        return masked_attention(q * 1.5, k, v, plan, 0.3, training=True)

    torch.manual_seed(3)
    out = f(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.manual_seed(3)
    out_ckpt = checkpoint(f, q, k, v, use_reentrant=False)
    grads_ckpt = torch.autograd.grad(out_ckpt.square().sum(), (q, k, v))
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for g, gc in zip(grads, grads_ckpt):
        torch.testing.assert_close(gc, g, rtol=1e-12, atol=1e-12)


def test_gradcheck_small():
    mask = _random_mask(13, 0.6, 13)
    plan = build_mask_plan(mask, 8)
    q, k, v = _qkv(1, 2, 13, 2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: masked_attention(q, k, v, plan, 0.25, training=True, seed=77), (q, k, v)
    )


def test_bf16_autocast_cpu():
    """Under autocast the projections give bf16 q, k, v; softmax runs in float32, output is bf16.

    Tolerance: the inputs are exact bf16 values, the float32 reference on those same values differs
    from the kernel only by the final rounding of the output to bf16 (relative 2^-8 ~ 0.004) and
    float32 summation order, so |out| <= max|v| ~ 4 gives atol 0.02.
    """
    torch.manual_seed(0)
    length, embed, heads = 276, 64, 8
    mask = band_random_mask(length, torch.Generator().manual_seed(14))
    plan = build_mask_plan(mask, 64)
    proj = torch.nn.Linear(embed, 3 * embed)
    x = torch.randn(2, length, embed, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = proj(x)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = masked_attention(q, k, v, plan, 0.1, training=True, seed=3)
    assert q.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    keep = dropout_keep_mask(plan, 3, 2, heads, 0.1)
    ref = dense_masked_attention(q.float(), k.float(), v.float(), mask, keep, 0.1)
    torch.testing.assert_close(out.float(), ref, rtol=0.01, atol=0.02)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_saved_tensors_are_linear_in_length():
    """At the production length, backward keeps O(B H L c) memory: no L x L or L x window tensor."""
    length, heads, channels = 4416, 8, 16
    mask = band_random_mask(length, torch.Generator().manual_seed(15))
    plan = build_mask_plan(mask, 128)
    assert plan.window < length // 4
    q, k, v = (torch.randn(1, heads, length, channels, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = masked_attention(q, k, v, plan, 0.1, training=True)
    assert out.shape == q.shape
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    total = sum(storages.values())
    assert max(t.numel() for t in saved) <= heads * length * channels
    # q, k, v, out (4 x 2.2 MiB) + logsumexp (0.14 MiB, rows padded to whole blocks);
    # dense attention saves 1792 MiB.
    assert total <= 4 * q.numel() * 4 + heads * plan.padded_length * 4
    assert plan.nbytes() < 16 * 2**20


def test_bad_inputs_raise():
    mask = band_random_mask(30)
    plan = build_mask_plan(mask, 8)
    q, k, v = _qkv(1, 2, 31, 4)
    with pytest.raises(ValueError, match="sequence length 31"):
        masked_attention(q, k, v, plan)
    with pytest.raises(ValueError, match="square"):
        build_mask_plan(torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        build_mask_plan(torch.zeros(3, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_dense():
    device = torch.device("cuda")
    mask = band_random_mask(1104, torch.Generator().manual_seed(16), device=device)
    plan = build_mask_plan(mask, 128)
    assert plan.device.type == "cuda"
    _compare(mask, 128, 0.1, batch=2, heads=8, channels=32, dtype=torch.float64, tol=1e-9)
    q, k, v = _qkv(2, 8, 1104, 32, dtype=torch.float32, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, 0.1, training=True, seed=4)
    keep = dropout_keep_mask(plan, 4, 2, 8, 0.1)
    ref = dense_masked_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), mask, keep, 0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.01, atol=0.02)


# --- gaps found by mutation testing (bench/mutation.py --module sparse_attention) ---


def _attention_written_out(q, k, v, mask):
    """softmax(q kᵀ / sqrt(c), blocked entries -inf) v, no dropout."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1) @ v


def test_dropout_p_one_drops_every_probability():
    # every probability dropped: the output and every gradient are exactly zero (as F.dropout(p=1))
    mask = _random_mask(40, 0.7, 11)
    plan = build_mask_plan(mask, block_size=16)
    q, k, v = _qkv(2, 2, 40, 4)
    out = masked_attention(q, k, v, plan, dropout_p=1.0, training=True, seed=3)
    assert torch.count_nonzero(out) == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_no_dropout_without_training_or_p_even_with_a_seed():
    mask = _random_mask(30, 0.6, 12)
    plan = build_mask_plan(mask, block_size=8)
    q, k, v = _qkv(1, 2, 30, 4)
    want = _attention_written_out(q, k, v, mask)
    for kwargs in ({"dropout_p": 0.5, "training": False, "seed": 7}, {"training": True, "seed": 7}):
        out = masked_attention(q, k, v, plan, **kwargs)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kwargs}: {m}")


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_p_outside_the_unit_interval_is_a_clear_error(p):
    mask = _random_mask(8, 0.5, 13)
    q, k, v = _qkv(1, 1, 8, 2)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        masked_attention(q, k, v, build_mask_plan(mask), dropout_p=p, training=True)


def test_band_random_mask_depends_only_on_its_generator():
    torch.manual_seed(0)
    a = band_random_mask(120, torch.Generator().manual_seed(9))
    torch.manual_seed(1)  # a different global RNG state must not change the mask
    b = band_random_mask(120, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, band_random_mask(120, torch.Generator().manual_seed(10)))


def test_multihead_helper_rejects_sequence_first_modules():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=False)
    mask = _random_mask(6, 0.5, 14)
    with pytest.raises(ValueError, match="batch_first=True"):
        multihead_self_attention(mha, torch.randn(6, 1, 8), build_mask_plan(mask))


def test_plan_to_keeps_every_field():
    mask = _random_mask(50, 0.8, 15)
    plan = build_mask_plan(mask, block_size=16)
    moved = plan.to("cpu")
    assert (moved.length, moved.block_size, moved.window, moved.window_starts) == (
        plan.length, plan.block_size, plan.window, plan.window_starts)
    for name in ("window_index", "window_blocked", "outside_index", "outside_blocked"):
        assert torch.equal(getattr(moved, name), getattr(plan, name)), name
    q, k, v = _qkv(1, 1, 50, 4)
    torch.testing.assert_close(masked_attention(q, k, v, moved), _attention_written_out(q, k, v, mask),
                               rtol=1e-10, atol=1e-10)
