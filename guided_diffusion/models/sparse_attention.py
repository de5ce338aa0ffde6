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
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "MaskPlan",
    "build_mask_plan",
    "masked_attention",
    "dense_masked_attention",
    "dropout_keep_mask",
    "draw_dropout_seed",
    "band_random_mask",
    "multihead_self_attention",
    "dense_masked_sdpa",
]

_SEED_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Relative per-key cost of a gathered (outside-window) key versus a key inside the dense window
# (measured on CPU: gathers and scatters of k, v, dk, dv dominate); only chooses the window width.
_GATHER_COST = 6.0


@dataclass
class MaskPlan:
    """A bool mask [L, L] (True = blocked) rewritten as per-block key windows + gathered keys.

    Query block `b` covers rows `[b * block_size, (b + 1) * block_size)`; rows are padded to
    `padded_length = num_blocks * block_size` (padding rows have every key blocked). Block b's
    key window is `window_index[b] = window_starts[b] + arange(window)`. Row i's allowed keys are
    the False entries of `window_blocked[i]` (relative to its block's window) and the entries of
    `outside_index[i]` that `outside_blocked[i]` does not mark as padding.
    """

    length: int
    block_size: int
    window: int
    window_starts: List[int]
    window_index: torch.Tensor  # [num_blocks, window] int64 key columns of each block's window
    window_blocked: torch.Tensor  # [padded_length, window] bool, True = blocked
    outside_index: torch.Tensor  # [padded_length, R] int64 key columns outside the row's window
    outside_blocked: torch.Tensor  # [padded_length, R] bool, True = padding

    @property
    def num_blocks(self) -> int:
        return len(self.window_starts)

    @property
    def padded_length(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_outside(self) -> int:
        return self.outside_index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.window_blocked.device

    def block_rows(self, block: int) -> Tuple[int, int]:
        """Real (unpadded) rows [start, end) of query block `block`."""
        start = block * self.block_size
        return start, min(self.length, start + self.block_size)

    def nbytes(self) -> int:
        tensors = (self.window_index, self.window_blocked, self.outside_index, self.outside_blocked)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> "MaskPlan":
        return MaskPlan(
            self.length,
            self.block_size,
            self.window,
            list(self.window_starts),
            self.window_index.to(device),
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
    if mask.shape[0] == 0:
        raise ValueError("mask must have at least one row (L >= 1)")
    length = mask.shape[0]
    device = mask.device
    allowed = ~mask
    window = _choose_window(allowed, block_size)
    starts = _window_starts(length, block_size, window)

    num_blocks = len(starts)
    padded = num_blocks * block_size
    window_index = torch.tensor(starts, device=device, dtype=torch.long)[:, None] + torch.arange(
        window, device=device
    )
    cols = window_index.repeat_interleave(block_size, dim=0)[:length]  # [L, W]
    window_blocked = torch.ones(padded, window, dtype=torch.bool, device=device)
    window_blocked[:length] = mask.gather(1, cols)

    in_window = torch.zeros_like(mask)
    in_window.scatter_(1, cols, True)
    outside = allowed & ~in_window
    counts = outside.sum(dim=1)
    n_outside = int(counts.max().item())
    rows, out_cols = outside.nonzero(as_tuple=True)  # row-major order
    row_offsets = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=device) - row_offsets[rows]
    outside_index = torch.zeros(padded, n_outside, dtype=torch.long, device=device)
    outside_blocked = torch.ones(padded, n_outside, dtype=torch.bool, device=device)
    outside_index[rows, rank] = out_cols
    outside_blocked[rows, rank] = False
    return MaskPlan(
        length, block_size, window, starts, window_index, window_blocked, outside_index, outside_blocked
    )


def draw_dropout_seed(device: torch.device | str) -> int:
    """A seed from the global torch RNG of `device` (CPU generator, or that CUDA generator)."""
    device = torch.device(device)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return int(torch.randint(0, 1 << 62, (), device=gen_device).item())


def _block_generator(seed: int, block: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + block * _GOLDEN) & _SEED_MASK)
    return generator


def _keep_threshold(dropout_p: float) -> int:
    """Slots whose signed 32-bit random value is below this are dropped: P = round(p 2^32) / 2^32."""
    return -(1 << 31) + round(dropout_p * (1 << 32))


def _chunk_keep(
    seed: int, blocks: range, batch: int, heads: int, block_size: int, slots: int, dropout_p: float, device
) -> torch.Tensor:
    """Keep-mask [B, H, G * block_size, slots] for consecutive query blocks `blocks`.

    Block b's bits depend only on (seed, b): 64-bit draws from a generator seeded by them, split
    in two 32-bit values per slot (cheaper than `torch.rand`), so chunking never changes them.
    """
    per_block = batch * heads * block_size * slots
    bits = torch.empty(len(blocks), (per_block + 1) // 2, dtype=torch.int64, device=device)
    for j, block in enumerate(blocks):
        bits[j].random_(-(1 << 63), None, generator=_block_generator(seed, block, device))
    bits = bits.view(torch.int32)[:, :per_block].view(len(blocks), batch, heads, block_size, slots)
    keep = torch.empty(batch, heads, len(blocks), block_size, slots, dtype=torch.bool, device=device)
    if dropout_p >= 1.0:
        return keep.fill_(False).view(batch, heads, -1, slots)
    torch.ge(bits.permute(1, 2, 0, 3, 4), _keep_threshold(dropout_p), out=keep)
    return keep.view(batch, heads, -1, slots)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: 0 where allowed, -inf where blocked (adding is cheaper than masked_fill)."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


# Elements of one [B, H, rows, window + R] temporary per loop step: several query blocks are
# processed together (fewer, larger ops; what matters on busy CPUs and for CUDA launch overhead).
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def _blocks_per_step(plan: MaskPlan, batch: int, heads: int, channels: int, device: torch.device) -> int:
    # Scores/probabilities per slot, plus the gathered keys and values (2c per outside slot).
    slots = plan.window + plan.num_outside * (1 + 2 * channels)
    per_block = batch * heads * plan.block_size * slots
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    return max(1, min(plan.num_blocks, budget // max(1, per_block)))


class _Chunk:
    """Consecutive query blocks `blocks`: their rows, key windows and gathered outside keys.

    Shapes: G blocks of n = block_size rows; window keys [B, H, G, W, c]; outside keys
    [B, H, G * n, R, c]; biases [G * n, W] and [G * n, R].
    """

    def __init__(self, plan: MaskPlan, blocks: range, key: torch.Tensor, value: torch.Tensor, dtype: torch.dtype):
        batch, heads, length, _ = key.shape
        self.blocks = blocks
        self.shape = (batch, heads, len(blocks), plan.block_size)
        self.rows = slice(blocks.start * plan.block_size, blocks.stop * plan.block_size)
        self.window_flat = plan.window_index[blocks.start : blocks.stop].reshape(-1)
        if len(blocks) == 1:  # a view, no copy
            start = plan.window_starts[blocks.start]
            self.key_window = key[:, :, None, start : start + plan.window]
            self.value_window = value[:, :, None, start : start + plan.window]
        else:
            self.key_window = key.index_select(2, self.window_flat).view(batch, heads, len(blocks), plan.window, -1)
            self.value_window = value.index_select(2, self.window_flat).view(batch, heads, len(blocks), plan.window, -1)
        self.bias_window = _bias(plan.window_blocked[self.rows], dtype).view(len(blocks), plan.block_size, -1)
        self.has_outside = plan.num_outside > 0
        if self.has_outside:
            index = plan.outside_index[self.rows]  # [G n, R]
            self.outside_flat = index.reshape(-1)
            gathered = (batch, heads) + tuple(index.shape)
            self.key_outside = key.view(batch * heads, length, -1).index_select(1, self.outside_flat)
            self.key_outside = self.key_outside.view(gathered + (-1,))
            self.value_outside = value.view(batch * heads, length, -1).index_select(1, self.outside_flat)
            self.value_outside = self.value_outside.view(gathered + (-1,))
            self.bias_outside = _bias(plan.outside_blocked[self.rows], dtype)

    def blocked_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, G n, X] -> [B, H, G, n, X] (a view)."""
        return t.view(self.shape + t.shape[-1:])

    def flat_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, G, n, X] -> [B, H, G n, X] (a view)."""
        return t.view(self.shape[:2] + (-1,) + t.shape[-1:])

    def scores(self, query_scaled: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Masked logits: window [B, H, G n, W] and outside [B, H, G n, R] (None without outside keys)."""
        s_win = torch.matmul(self.blocked_rows(query_scaled), self.key_window.transpose(-1, -2))
        s_win = self.flat_rows(s_win.add_(self.bias_window))
        if not self.has_outside:
            return s_win, None
        s_out = torch.einsum("bhirc,bhic->bhir", self.key_outside, query_scaled).add_(self.bias_outside)
        return s_win, s_out

    def keep(self, seed: Optional[int], dropout_p: float, s_win: torch.Tensor, s_out: Optional[torch.Tensor]):
        """Dropout keep-masks for the window and outside slots (None, None without dropout)."""
        if seed is None:
            return None, None
        width = s_win.shape[-1]
        slots = width + (0 if s_out is None else s_out.shape[-1])
        batch, heads, _, block_size = self.shape
        keep = _chunk_keep(seed, self.blocks, batch, heads, block_size, slots, dropout_p, s_win.device)
        return keep[..., :width], (None if s_out is None else keep[..., width:])

    def window_product(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum over window slots: [B, H, G n, W] x [B, H, G, W, c] -> [B, H, G n, c]."""
        return self.flat_rows(torch.matmul(self.blocked_rows(weights), values))

    def scatter_window(self, accumulator: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> None:
        """accumulator[L, B*H*c] += weights^T rows, summed into each window key (windows overlap)."""
        contribution = torch.matmul(self.blocked_rows(weights).transpose(-1, -2), self.blocked_rows(rows))
        contribution = contribution.permute(2, 3, 0, 1, 4).reshape(self.window_flat.numel(), -1)
        accumulator.index_add_(0, self.window_flat, contribution)

    def scatter_outside(self, accumulator: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> None:
        """accumulator[L, B*H*c][j] += sum over slots (i, r) pointing at key j of weights[..i, r] rows[..i, :].

        The [L, B*H*c] layout makes index_add_ move whole contiguous rows (much faster than dim 2).
        """
        # Broadcast product written straight into [G n, R, B, H, c] (einsum would bmm then copy).
        batch, heads, rows_n, slots = weights.shape
        contribution = torch.empty(rows_n, slots, batch, heads, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        torch.mul(weights.permute(2, 3, 0, 1).unsqueeze(-1), rows.permute(2, 0, 1, 3).unsqueeze(1), out=contribution)
        accumulator.index_add_(0, self.outside_flat, contribution.view(self.outside_flat.numel(), -1))


def _fold_rows(accumulator: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """[L, B*H*c] -> [B, H, L, c]."""
    return accumulator.view(accumulator.shape[0], batch, heads, -1).permute(1, 2, 0, 3)


def _pad_rows(t: torch.Tensor, padded_length: int) -> torch.Tensor:
    """Zero-pad dim 2 ([B, H, L, c]) to the plan's padded length."""
    extra = padded_length - t.shape[2]
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: MaskPlan, dropout_p: float, seed: Optional[int]):
        with torch.autocast(device_type=q.device.type, enabled=False):
            cdt = _compute_dtype(q.dtype)
            batch, heads, length, channels = q.shape
            padded = plan.padded_length
            q_s = _pad_rows((q.to(cdt) * (1.0 / math.sqrt(channels))).contiguous(), padded)
            k_c = k.to(cdt).contiguous()
            v_c = v.to(cdt).contiguous()
            out = torch.empty(batch, heads, padded, v.shape[-1], dtype=cdt, device=q.device)
            lse = torch.empty(batch, heads, padded, dtype=cdt, device=q.device)
            out_scale = _dropout_scale(dropout_p) if seed is not None else 1.0
            step = _blocks_per_step(plan, batch, heads, channels, q.device)
            for first in range(0, plan.num_blocks, step):
                chunk = _Chunk(plan, range(first, min(plan.num_blocks, first + step)), k_c, v_c, cdt)
                s_win, s_out = chunk.scores(q_s[:, :, chunk.rows])
                row_max = s_win.amax(dim=-1)
                if s_out is not None:
                    row_max = torch.maximum(row_max, s_out.amax(dim=-1))
                row_max = row_max.clamp_min_(torch.finfo(cdt).min).unsqueeze(-1)  # all-blocked rows
                p_win = s_win.sub_(row_max).exp_()
                row_sum = p_win.sum(dim=-1)
                if s_out is not None:
                    p_out = s_out.sub_(row_max).exp_()
                    row_sum += p_out.sum(dim=-1)
                lse[:, :, chunk.rows] = torch.where(row_sum > 0, row_max.squeeze(-1) + row_sum.log(), float("inf"))
                keep_win, keep_out = chunk.keep(seed, dropout_p, p_win, s_out)
                if keep_win is not None:
                    p_win.mul_(keep_win)
                o = chunk.window_product(p_win, chunk.value_window)
                if s_out is not None:
                    if keep_out is not None:
                        p_out.mul_(keep_out)
                    o += torch.einsum("bhir,bhirc->bhic", p_out, chunk.value_outside)
                # Normalise after the product: [rows, c] work instead of [rows, W + R].
                o.mul_((out_scale / row_sum.clamp_min(torch.finfo(cdt).tiny)).unsqueeze(-1))
                out[:, :, chunk.rows] = o
            out = out[:, :, :length].to(q.dtype).contiguous()  # don't keep the padded storage
        ctx.plan = plan
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan: MaskPlan = ctx.plan
        seed, dropout_p = ctx.seed, ctx.dropout_p
        with torch.autocast(device_type=q.device.type, enabled=False):
            cdt = _compute_dtype(q.dtype)
            batch, heads, length, channels = q.shape
            padded = plan.padded_length
            scale = 1.0 / math.sqrt(channels)
            q_s = _pad_rows((q.to(cdt) * scale).contiguous(), padded)
            k_c = k.to(cdt).contiguous()
            v_c = v.to(cdt).contiguous()
            d_out = grad_out.to(cdt).contiguous()
            # D_i = sum_j P_ij dP_ij = rowsum(dO * O), dropout included in O.
            delta = _pad_rows((d_out * out.to(cdt)).sum(dim=-1, keepdim=True), padded)
            # The gradient w.r.t. kept probabilities carries the dropout scale: fold it into dO.
            if seed is not None:
                d_out = d_out * _dropout_scale(dropout_p)
            d_out = _pad_rows(d_out, padded)
            dq = torch.empty_like(q_s)
            # dK, dV accumulate in [L, B*H*c] rows so index_add_ moves contiguous rows.
            dk_rows = torch.zeros(length, batch * heads * channels, dtype=cdt, device=q.device)
            dv_rows = torch.zeros(length, batch * heads * v.shape[-1], dtype=cdt, device=q.device)
            step = _blocks_per_step(plan, batch, heads, channels, q.device)
            for first in range(0, plan.num_blocks, step):
                chunk = _Chunk(plan, range(first, min(plan.num_blocks, first + step)), k_c, v_c, cdt)
                q_b = q_s[:, :, chunk.rows]
                do_b = d_out[:, :, chunk.rows]
                lse_b = lse[:, :, chunk.rows].unsqueeze(-1)
                delta_b = delta[:, :, chunk.rows]
                s_win, s_out = chunk.scores(q_b)
                p_win = s_win.sub_(lse_b).exp_()
                keep_win, keep_out = chunk.keep(seed, dropout_p, p_win, s_out)
                kept_win = p_win if keep_win is None else p_win * keep_win
                chunk.scatter_window(dv_rows, kept_win, do_b)
                dp_win = chunk.flat_rows(
                    torch.matmul(chunk.blocked_rows(do_b), chunk.value_window.transpose(-1, -2))
                )
                if keep_win is not None:
                    dp_win.mul_(keep_win)
                ds_win = dp_win.sub_(delta_b).mul_(p_win)
                dq_b = chunk.window_product(ds_win, chunk.key_window)
                chunk.scatter_window(dk_rows, ds_win, q_b)
                if s_out is not None:
                    p_out = s_out.sub_(lse_b).exp_()
                    kept_out = p_out if keep_out is None else p_out * keep_out
                    chunk.scatter_outside(dv_rows, kept_out, do_b)
                    dp_out = torch.einsum("bhirc,bhic->bhir", chunk.value_outside, do_b)
                    if keep_out is not None:
                        dp_out.mul_(keep_out)
                    ds_out = dp_out.sub_(delta_b).mul_(p_out)
                    dq_b += torch.einsum("bhir,bhirc->bhic", ds_out, chunk.key_outside)
                    chunk.scatter_outside(dk_rows, ds_out, q_b)
                dq[:, :, chunk.rows] = dq_b.mul_(scale)
            dq = dq[:, :, :length]
            dk = _fold_rows(dk_rows, batch, heads)
            dv = _fold_rows(dv_rows, batch, heads)
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
    # One spare column receives the padding slots, so scatter never sees duplicate targets.
    length, padded, window = plan.length, plan.padded_length, plan.window
    keep = torch.zeros(batch, heads, padded, length + 1, dtype=torch.bool, device=device)
    slots = window + plan.num_outside
    for block in range(plan.num_blocks):
        rows = slice(block * plan.block_size, (block + 1) * plan.block_size)
        block_keep = _chunk_keep(
            seed, range(block, block + 1), batch, heads, plan.block_size, slots, dropout_p, device
        )
        window_index = plan.window_index[block].to(device).expand(batch, heads, plan.block_size, -1)
        keep[:, :, rows].scatter_(3, window_index, block_keep[..., :window])
        if plan.num_outside:
            index = plan.outside_index[rows].to(device)
            index = index.masked_fill(plan.outside_blocked[rows].to(device), length)
            keep[:, :, rows].scatter_(3, index.expand(batch, heads, -1, -1), block_keep[..., window:])
    return keep[:, :, :length, :length]


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

    Band: row i allows `[max(0, i - k//2), min(L, i + k//2 + 1))` with `k = max(1, int(L (1 - 0.9)))`
    (upstream's arithmetic: 1 - 0.9 is 0.0999…, so L = 80 gives k = 7);
    if k > 4, each row also allows `max(1, k//4)` distinct random columns. Random draws use
    `generator` (CPU) and the mask is then moved to `device`.
    """
    k = max(1, int(length * (1 - 0.9)))
    index = torch.arange(length, device="cpu")  # on the CPU whatever the default device (the generator's)
    offset = index[None, :] - index[:, None]
    allowed = (offset >= -(k // 2)) & (offset <= k // 2)
    if k > 4:
        n_random = max(1, k // 4)
        scores = torch.rand(length, length, generator=generator, device="cpu")
        allowed.scatter_(1, scores.topk(n_random, dim=1).indices, True)
    return (~allowed).to(device)


def _in_projection(mha: torch.nn.MultiheadAttention, x: torch.Tensor):
    """q, k, v [B, H, L, c] of a batch-first packed-projection ``nn.MultiheadAttention`` (the HAE blocks')."""
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(
            "multihead_self_attention needs batch_first=True, equal q/k/v embed dims, "
            "no add_bias_kv and no add_zero_attn"
        )
    batch, length, _ = x.shape
    qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    return (t.view(batch, length, mha.num_heads, mha.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


def dense_masked_sdpa(
    mha: torch.nn.MultiheadAttention,
    x: torch.Tensor,
    mask: torch.Tensor,
    max_chunk_bytes: int = 1 << 28,
) -> torch.Tensor:
    """`mha(x, x, x, attn_mask=mask, need_weights=False)[0]` through `scaled_dot_product_attention` with the dense
    bool mask (True = may not attend); attention dropout (`mha.dropout`) in training mode.

    On a GPU the fused kernels take the mask and store no L x L tensor, so this is the HAE attention there, in
    training too. On a CPU the kernels materialise the [rows, H, L, L] scores (and fall back to the math kernel,
    which saves them for backward, under dropout), so there it serves inference on short sequences: the batch is
    split so those scores stay under `max_chunk_bytes` (docs/benchmarks.md)."""
    batch, length, _ = x.shape
    q, k, v = _in_projection(mha, x)
    allowed = ~mask.to(device=x.device, dtype=torch.bool)
    dropout_p = mha.dropout if mha.training else 0.0
    rows = batch
    if x.device.type == "cpu":
        rows = max(1, max_chunk_bytes // (mha.num_heads * length * length * 4))
    out = torch.cat([F.scaled_dot_product_attention(q[i:i + rows], k[i:i + rows], v[i:i + rows], attn_mask=allowed,
                                                    dropout_p=dropout_p) for i in range(0, batch, rows)])
    return mha.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


def multihead_self_attention(
    mha: torch.nn.MultiheadAttention,
    x: torch.Tensor,
    plan: MaskPlan,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """`mha(x, x, x, attn_mask=mask, need_weights=False)[0]` through `masked_attention`.

    For a batch-first self-attention `nn.MultiheadAttention` with packed in-projection (the HAE
    blocks' configuration); x is [B, L, E]. Attention dropout uses `mha.dropout` in training mode.
    """
    batch, length, _ = x.shape
    q, k, v = _in_projection(mha, x)
    out = masked_attention(q, k, v, plan, dropout_p=mha.dropout, training=mha.training, seed=seed)
    return mha.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
