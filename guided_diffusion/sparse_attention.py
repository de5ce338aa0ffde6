"""Exact, memory-light attention under a fixed boolean mask (the HAE sparse masks).

`nn.MultiheadAttention` with a bool `attn_mask` computes and stores the full L x L attention
(probabilities, dropout mask and dropped probabilities: 1.8 GiB per sample at L = 4416 with
8 heads in float32), although the HAE masks allow only ~12% of the entries. This module
exploits the mask once, in a `MaskPlan`, and then computes the same function block by block:

* for each block of `block_size` query rows, a contiguous key *window* (dense matmul, with the
  exact mask bits inside the window), plus
* per row, a padded list of the allowed key columns *outside* that window (gathered keys).

Every allowed (row, column) pair is counted exactly once, so the result equals the dense masked
softmax attention for any mask. The autograd function saves only q, k, v, the output, the
per-row logsumexp and a dropout seed; backward recomputes each block's probabilities and its
dropout mask (flash-attention style). Dropout is applied to the probabilities after softmax
with scale 1/(1-p), as `nn.MultiheadAttention` does; the keep-mask is a deterministic function
of a seed drawn from the global torch RNG of the tensors' device, so `torch.manual_seed` and
`torch.utils.checkpoint`'s RNG preservation reproduce it.

Rows whose keys are all blocked output zeros (as `scaled_dot_product_attention`'s safe softmax
does); `nn.MultiheadAttention` would output NaN there. The HAE masks always allow the diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

__all__ = [
    "MaskPlan",
    "build_mask_plan",
    "masked_attention",
    "dense_masked_attention",
    "dropout_keep_mask",
    "draw_dropout_seed",
    "band_random_mask",
]

_SEED_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Relative per-key cost of a gathered (outside-window) key versus a key inside the dense window;
# used only to choose the window width.
_GATHER_COST = 3.0


@dataclass
class MaskPlan:
    """A bool mask [L, L] (True = blocked) rewritten as per-block key windows + gathered keys.

    Query block `b` covers rows `[b * block_size, min(L, (b + 1) * block_size))`; its key window
    is `[window_starts[b], window_starts[b] + window)`. Row i's allowed keys are the False
    entries of `window_blocked[i]` (relative to its block's window) and the valid entries of
    `outside_index[i]` (`outside_blocked[i]` marks padding).
    """

    length: int
    block_size: int
    window: int
    window_starts: List[int]
    window_blocked: torch.Tensor  # [L, window] bool, True = blocked
    outside_index: torch.Tensor  # [L, R] int64 key columns outside the row's window
    outside_blocked: torch.Tensor  # [L, R] bool, True = padding

    @property
    def num_blocks(self) -> int:
        return len(self.window_starts)

    @property
    def num_outside(self) -> int:
        return self.outside_index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.window_blocked.device

    def block_rows(self, block: int) -> Tuple[int, int]:
        start = block * self.block_size
        return start, min(self.length, start + self.block_size)

    def nbytes(self) -> int:
        tensors = (self.window_blocked, self.outside_index, self.outside_blocked)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> "MaskPlan":
        return MaskPlan(
            self.length,
            self.block_size,
            self.window,
            list(self.window_starts),
            self.window_blocked.to(device),
            self.outside_index.to(device),
            self.outside_blocked.to(device),
        )


def _window_starts(length: int, block_size: int, window: int) -> List[int]:
    """Window start per query block: centred on the block, clamped inside [0, L)."""
    starts = []
    for row_start in range(0, length, block_size):
        row_end = min(length, row_start + block_size)
        centre = (row_start + row_end) // 2
        starts.append(min(max(0, centre - window // 2), length - window))
    return starts


def _choose_window(allowed: torch.Tensor, block_size: int) -> int:
    """Window width minimising per-row work: width + gather cost x (max keys left outside)."""
    length = allowed.shape[0]
    step = 8 if length > 64 else 1
    widths = sorted(set(list(range(step, length, step)) + [length]))
    prefix = torch.zeros(length, length + 1, dtype=torch.int32, device=allowed.device)
    torch.cumsum(allowed, dim=1, dtype=torch.int32, out=prefix[:, 1:])
    per_row_total = prefix[:, -1]
    rows_block = torch.arange(length, device=allowed.device) // block_size
    best_width, best_cost = length, float("inf")
    # Evaluate candidate widths in chunks to bound the [candidates, L] temporaries.
    for chunk_start in range(0, len(widths), 64):
        chunk = widths[chunk_start : chunk_start + 64]
        starts = torch.tensor(
            [_window_starts(length, block_size, w) for w in chunk], device=allowed.device
        )  # [n_w, n_blocks]
        row_starts = starts[:, rows_block]  # [n_w, L]
        width_t = torch.tensor(chunk, device=allowed.device)[:, None]
        expanded = prefix.unsqueeze(0).expand(len(chunk), -1, -1)
        inside = expanded.gather(2, (row_starts + width_t).unsqueeze(-1)).squeeze(-1)
        inside = inside - expanded.gather(2, row_starts.unsqueeze(-1)).squeeze(-1)
        outside_max = (per_row_total[None] - inside).amax(dim=1).tolist()
        for width, n_out in zip(chunk, outside_max):
            cost = width + _GATHER_COST * n_out
            if cost < best_cost:
                best_width, best_cost = width, cost
    return best_width


def build_mask_plan(mask: torch.Tensor, block_size: int = 128) -> MaskPlan:
    """Plan for `mask` (bool [L, L], True = may not attend) on the mask's device.

    Exact for any mask; efficient when allowed entries concentrate in a band around the
    diagonal (the window covers it) with few scattered extras (gathered per row).
    """
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square [L, L] tensor, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = blocked), got dtype {mask.dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    length = mask.shape[0]
    device = mask.device
    allowed = ~mask
    window = _choose_window(allowed, block_size)
    starts = _window_starts(length, block_size, window)

    rows_block = torch.arange(length, device=device) // block_size
    row_starts = torch.tensor(starts, device=device, dtype=torch.long)[rows_block]  # [L]
    cols = row_starts[:, None] + torch.arange(window, device=device)[None]  # [L, W]
    window_blocked = mask.gather(1, cols)

    in_window = torch.zeros_like(mask)
    in_window.scatter_(1, cols, True)
    outside = allowed & ~in_window
    counts = outside.sum(dim=1)
    n_outside = int(counts.max().item()) if length > 0 else 0
    rows, out_cols = outside.nonzero(as_tuple=True)  # row-major order
    row_offsets = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=device) - row_offsets[rows]
    outside_index = torch.zeros(length, n_outside, dtype=torch.long, device=device)
    outside_blocked = torch.ones(length, n_outside, dtype=torch.bool, device=device)
    outside_index[rows, rank] = out_cols
    outside_blocked[rows, rank] = False
    return MaskPlan(length, block_size, window, starts, window_blocked, outside_index, outside_blocked)


def draw_dropout_seed(device: torch.device | str) -> int:
    """A seed from the global torch RNG of `device` (CPU generator, or that CUDA generator)."""
    device = torch.device(device)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return int(torch.randint(0, 1 << 62, (), device=gen_device).item())


def _block_generator(seed: int, block: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + block * _GOLDEN) & _SEED_MASK)
    return generator


def _block_keep(seed: int, block: int, shape: Tuple[int, ...], dropout_p: float, device: torch.device) -> torch.Tensor:
    """Keep-mask for one query block's [B, H, n, window + R] slots."""
    generator = _block_generator(seed, block, device)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _BlockKeys:
    """Keys/values of one query block: the dense window and the gathered outside keys."""

    def __init__(self, plan: MaskPlan, block: int, key: torch.Tensor, value: torch.Tensor):
        self.rows = plan.block_rows(block)
        r0, r1 = self.rows
        w0 = plan.window_starts[block]
        self.window_slice = slice(w0, w0 + plan.window)
        self.key_window = key[:, :, self.window_slice]
        self.value_window = value[:, :, self.window_slice]
        self.window_blocked = plan.window_blocked[r0:r1]
        self.has_outside = plan.num_outside > 0
        if self.has_outside:
            self.index = plan.outside_index[r0:r1]  # [n, R]
            self.outside_blocked = plan.outside_blocked[r0:r1]
            self.key_outside = key[:, :, self.index]  # [B, H, n, R, c]
            self.value_outside = value[:, :, self.index]

    def scores(self, query_scaled: torch.Tensor) -> torch.Tensor:
        """Masked logits [B, H, n, window + R] (blocked slots = -inf)."""
        s_win = torch.matmul(query_scaled, self.key_window.transpose(-1, -2))
        s_win.masked_fill_(self.window_blocked, float("-inf"))
        if not self.has_outside:
            return s_win
        s_out = torch.matmul(self.key_outside, query_scaled.unsqueeze(-1)).squeeze(-1)
        s_out.masked_fill_(self.outside_blocked, float("-inf"))
        return torch.cat([s_win, s_out], dim=-1)


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: MaskPlan, dropout_p: float, seed: Optional[int]):
        device_type = q.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            cdt = _compute_dtype(q.dtype)
            batch, heads, length, channels = q.shape
            scale = 1.0 / math.sqrt(channels)
            q_s = q.to(cdt) * scale
            k_c = k.to(cdt).contiguous()
            v_c = v.to(cdt).contiguous()
            window = plan.window
            out = torch.empty(batch, heads, length, v.shape[-1], dtype=cdt, device=q.device)
            lse = torch.empty(batch, heads, length, dtype=cdt, device=q.device)
            for block in range(plan.num_blocks):
                keys = _BlockKeys(plan, block, k_c, v_c)
                r0, r1 = keys.rows
                s = keys.scores(q_s[:, :, r0:r1])
                row_max = s.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(cdt).min)
                p = s.sub_(row_max).exp_()
                row_sum = p.sum(dim=-1, keepdim=True)
                p.div_(row_sum.clamp_min(torch.finfo(cdt).tiny))
                block_lse = torch.where(row_sum > 0, row_max + row_sum.log(), float("inf"))
                lse[:, :, r0:r1] = block_lse.squeeze(-1)
                if seed is not None:
                    keep = _block_keep(seed, block, tuple(p.shape), dropout_p, q.device)
                    p.masked_fill_(~keep, 0.0).mul_(_dropout_scale(dropout_p))
                o = torch.matmul(p[..., :window], keys.value_window)
                if keys.has_outside:
                    o += torch.matmul(p[..., window:].unsqueeze(-2), keys.value_outside).squeeze(-2)
                out[:, :, r0:r1] = o
            out = out.to(q.dtype)
        ctx.plan = plan
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan: MaskPlan = ctx.plan
        seed, dropout_p = ctx.seed, ctx.dropout_p
        with torch.autocast(device_type=q.device.type, enabled=False):
            cdt = _compute_dtype(q.dtype)
            channels = q.shape[-1]
            scale = 1.0 / math.sqrt(channels)
            q_s = q.to(cdt) * scale
            k_c = k.to(cdt).contiguous()
            v_c = v.to(cdt).contiguous()
            d_out = grad_out.to(cdt)
            # D_i = sum_j P_ij dP_ij = rowsum(dO * O) (dropout included in O).
            delta = (d_out * out.to(cdt)).sum(dim=-1)
            dq = torch.empty_like(q_s)
            dk = torch.zeros_like(k_c)
            dv = torch.zeros_like(v_c)
            window = plan.window
            batch, heads = q.shape[:2]
            for block in range(plan.num_blocks):
                keys = _BlockKeys(plan, block, k_c, v_c)
                r0, r1 = keys.rows
                n = r1 - r0
                q_b = q_s[:, :, r0:r1]
                do_b = d_out[:, :, r0:r1]
                s = keys.scores(q_b)
                p = s.sub_(lse[:, :, r0:r1, None]).exp_()
                if seed is not None:
                    keep = _block_keep(seed, block, tuple(p.shape), dropout_p, q.device)
                    z = keep.to(cdt).mul_(_dropout_scale(dropout_p))
                    p_drop = p * z
                else:
                    z, p_drop = None, p
                # dV and dP (w.r.t. the dropped probabilities).
                dv[:, :, keys.window_slice] += torch.matmul(p_drop[..., :window].transpose(-1, -2), do_b)
                dp_win = torch.matmul(do_b, keys.value_window.transpose(-1, -2))
                if keys.has_outside:
                    flat_index = keys.index.reshape(-1)
                    r = keys.index.shape[1]
                    dv_out = p_drop[..., window:].unsqueeze(-1) * do_b.unsqueeze(-2)
                    dv.index_add_(2, flat_index, dv_out.reshape(batch, heads, n * r, -1))
                    dp_out = torch.matmul(keys.value_outside, do_b.unsqueeze(-1)).squeeze(-1)
                    dp = torch.cat([dp_win, dp_out], dim=-1)
                else:
                    dp = dp_win
                if z is not None:
                    dp.mul_(z)
                ds = p.mul_(dp.sub_(delta[:, :, r0:r1, None]))  # dS, in place of p
                dq_b = torch.matmul(ds[..., :window], keys.key_window)
                dk[:, :, keys.window_slice] += torch.matmul(ds[..., :window].transpose(-1, -2), q_b)
                if keys.has_outside:
                    ds_out = ds[..., window:]
                    dq_b += torch.matmul(ds_out.unsqueeze(-2), keys.key_outside).squeeze(-2)
                    dk_out = ds_out.unsqueeze(-1) * q_b.unsqueeze(-2)
                    dk.index_add_(2, flat_index, dk_out.reshape(batch, heads, n * r, -1))
                dq[:, :, r0:r1] = dq_b * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: MaskPlan,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(c) + mask) v over the plan's allowed keys; q, k, v [B, H, L, c].

    Softmax runs in float32 (float64 for float64 inputs); the output has q's dtype. With
    `training` and `dropout_p > 0`, the probabilities are dropped with scale 1/(1-p); the
    keep-mask comes from `seed` (drawn from the device's global torch RNG when None; pass the
    same seed to `dropout_keep_mask` to reproduce it).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [B, H, L, c] with matching shapes, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != plan.length:
        raise ValueError(f"sequence length {q.shape[2]} does not match the mask plan's {plan.length}")
    if plan.device != q.device:
        raise ValueError(f"mask plan lives on {plan.device} but q is on {q.device}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    use_dropout = training and dropout_p > 0.0
    if use_dropout and seed is None:
        seed = draw_dropout_seed(q.device)
    return _MaskedAttention.apply(q, k, v, plan, float(dropout_p), seed if use_dropout else None)


def dropout_keep_mask(
    plan: MaskPlan,
    seed: int,
    batch: int,
    heads: int,
    dropout_p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The dense [B, H, L, L] bool keep-mask that `masked_attention(..., seed=seed)` applies.

    Entries at blocked (row, column) pairs are meaningless (their probability is zero).
    """
    device = plan.device if device is None else torch.device(device)
    length, window = plan.length, plan.window
    # One spare column receives the padding slots, so scatter never sees duplicate targets.
    keep = torch.zeros(batch, heads, length, length + 1, dtype=torch.bool, device=device)
    for block in range(plan.num_blocks):
        r0, r1 = plan.block_rows(block)
        shape = (batch, heads, r1 - r0, window + plan.num_outside)
        slots = _block_keep(seed, block, shape, dropout_p, device)
        w0 = plan.window_starts[block]
        keep[:, :, r0:r1, w0 : w0 + window] = slots[..., :window]
        if plan.num_outside:
            index = plan.outside_index[r0:r1].to(device)
            index = index.masked_fill(plan.outside_blocked[r0:r1].to(device), length)
            keep[:, :, r0:r1].scatter_(3, index.expand(batch, heads, -1, -1), slots[..., window:])
    return keep[..., :length]


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference: explicit L x L masked softmax attention (as nn.MultiheadAttention computes it).

    `dropout_mask` (bool keep-mask broadcastable to [B, H, L, L]) is applied with scale
    1/(1-dropout_p) after softmax. Fully blocked rows give zeros (like `masked_attention`).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    empty_row = mask.all(dim=-1, keepdim=True)
    logits = logits.masked_fill(mask & ~empty_row, float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(empty_row, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) * _dropout_scale(dropout_p)
    return torch.matmul(probs, v)


def band_random_mask(
    length: int,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A bool [L, L] mask (True = blocked) with the HAE structure (decisions §3), vectorised.

    Band: row i allows `[max(0, i - k//2), min(L, i + k//2 + 1))` with `k = max(1, int(0.1 L))`;
    if k > 4, each row also allows `max(1, k//4)` distinct random columns. Random draws use
    `generator` (CPU) and the mask is then moved to `device`.
    """
    k = max(1, int(0.1 * length))
    index = torch.arange(length)
    offset = index[None, :] - index[:, None]
    allowed = (offset >= -(k // 2)) & (offset <= k // 2)
    if k > 4:
        n_random = max(1, k // 4)
        scores = torch.rand(length, length, generator=generator)
        allowed.scatter_(1, scores.topk(n_random, dim=1).indices, True)
    return (~allowed).to(device)
