"""Spatial self-attention with class-conditional extra keys: one set of weights, two ways to compute.

Every ``AttentionBlock`` of the class-conditional UNets sees, besides its T spatial tokens, the
D = 4·model_channels "encoder" tokens ``encoder_kv(c cᵀ)`` built from the class embedding c.
Because a 1×1 convolution acts on the columns of ``c cᵀ`` independently,

    encoder_kv(c cᵀ)[:, j] = c_j · (W c) + β        (W, β: the conv's weight and bias),

so the D extra keys and values lie on one line and can be formed from ``u = W c`` and ``c``
without the B×D×D tensor. A null row (c = 0) makes all D keys equal to β: D identical keys are one
key whose logit gains ln D. Both identities are exact.

``reference_attention`` is upstream's computation (materialised ``c cᵀ`` and L×L weights);
``fused_attention`` uses the identities above and ``scaled_dot_product_attention``, so no L×L
probability matrix is stored for backward. ``ReferenceAttentionProcessor`` and
``FusedAttentionProcessor`` are the two processors (``processors.py``) of every spatial attention
module (the UNets' ``AttentionBlock``, the classifier's attention pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from guided_diffusion.models.processors import AttentionProcessor


@dataclass
class Conditioning:
    """What the class condition contributes to one forward pass.

    ``cemb`` [B, D] is the class embedding with null rows zeroed. ``null_rows`` [B] bool marks
    the null rows when they are known only at run time (label dropout, a per-row null mask);
    ``all_null`` / ``all_cond`` record what the caller fixed statically, so the common cases
    need no mask.
    """

    cemb: torch.Tensor
    null_rows: Optional[torch.Tensor] = None
    all_null: bool = False
    all_cond: bool = False
    _cemb_mm: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def cemb_mm(self) -> torch.Tensor:
        """Upstream's materialised [B, D, D] outer product, built once per forward on demand."""
        if self._cemb_mm is None:
            self._cemb_mm = torch.einsum("ab,ac->abc", self.cemb, self.cemb)
        return self._cemb_mm


def split_heads(qkv: torch.Tensor, num_heads: int, legacy_order: bool = True):
    """[B, 3·H·c, T] -> three [B·H, c, T].

    Legacy order (upstream ``QKVAttentionLegacy``, every UNet's default): the 3·H·c channels are
    grouped per head as (q_h, k_h, v_h). New order (``QKVAttention``: v1 with
    ``use_new_attention_order``, the classifier's attention pool): q, k, v first, then heads.
    """
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        return qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    return tuple(t.reshape(bs * num_heads, ch, length) for t in qkv.chunk(3, dim=1))


def reference_attention(
    qkv: torch.Tensor, num_heads: int, encoder_kv=None, cond: Optional[Conditioning] = None, legacy_order: bool = True
):
    """Upstream QKVAttention with the encoder tokens (if any) prepended to the keys and values."""
    bs, width, length = qkv.shape
    q, k, v = split_heads(qkv, num_heads, legacy_order)
    ch = q.shape[1]
    if cond is not None:
        ekv = encoder_kv(cond.cemb_mm)  # [B, 2C, D]
        ek, ev = ekv.reshape(bs * num_heads, ch * 2, -1).split(ch, dim=1)
        k = torch.cat([ek, k], dim=-1)
        v = torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v)
    return a.reshape(bs, -1, length)


def _conditional_keys(encoder_kv, cond: Conditioning, num_heads: int, ch: int):
    """Keys/values of the D encoder tokens, [B, H, D, c] each, from u = W c (no B×D×D tensor)."""
    weight = encoder_kv.weight[:, :, 0]  # [2C, D]
    bias = encoder_kv.bias
    u = F.linear(cond.cemb, weight)  # [B, 2C]
    bs = u.shape[0]
    u = u.reshape(bs, num_heads, 2, ch)  # per head: (k, v)
    beta = bias.reshape(num_heads, 2, ch)
    c = cond.cemb.to(u.dtype)[:, None, :, None]  # [B, 1, D, 1]
    ek = c * u[:, :, None, 0] + beta[None, :, None, 0].to(u.dtype)
    ev = c * u[:, :, None, 1] + beta[None, :, None, 1].to(u.dtype)
    return ek, ev


def fused_attention(
    qkv: torch.Tensor, num_heads: int, encoder_kv=None, cond: Optional[Conditioning] = None, legacy_order: bool = True
):
    """Same function as ``reference_attention``, through ``scaled_dot_product_attention``."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    # [B, H, T, c], contiguous: the fused kernels need a unit stride on the channel axis
    if legacy_order:
        q, k, v = qkv.reshape(bs, num_heads, 3, ch, length).transpose(-1, -2).contiguous().unbind(2)
    else:
        q, k, v = qkv.reshape(bs, 3, num_heads, ch, length).transpose(-1, -2).contiguous().unbind(1)
    mask = None
    if cond is not None:
        d = cond.cemb.shape[1]
        log_d = math.log(d)
        beta = encoder_kv.bias.reshape(num_heads, 2, ch).to(q.dtype)
        bias_k = beta[None, :, None, 0].expand(bs, -1, -1, -1)  # one key standing for D null keys
        bias_v = beta[None, :, None, 1].expand(bs, -1, -1, -1)
        if cond.all_null:
            k = torch.cat([bias_k, k], dim=2)
            v = torch.cat([bias_v, v], dim=2)
            mask = q.new_zeros(1, 1, 1, 1 + length)
            mask[..., 0] = log_d
        else:
            ek, ev = _conditional_keys(encoder_kv, cond, num_heads, ch)
            if cond.all_cond or cond.null_rows is None:
                k = torch.cat([ek.to(q.dtype), k], dim=2)
                v = torch.cat([ev.to(q.dtype), v], dim=2)
            else:
                # Rows decided at run time: every row gets the bias key and the D conditional keys,
                # and an additive mask keeps exactly one of the two (no host sync needed).
                k = torch.cat([bias_k, ek.to(q.dtype), k], dim=2)
                v = torch.cat([bias_v, ev.to(q.dtype), v], dim=2)
                null = cond.null_rows.reshape(bs, 1, 1, 1)
                neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
                bias_col = torch.where(null, torch.tensor(log_d, dtype=q.dtype, device=q.device), neg_inf)
                cond_cols = torch.where(null, neg_inf, torch.zeros((), dtype=q.dtype, device=q.device))
                mask = torch.cat(
                    [bias_col, cond_cols.expand(bs, 1, 1, d), q.new_zeros(bs, 1, 1, length)], dim=-1
                )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, c]
    return out.transpose(-1, -2).reshape(bs, -1, length)


class SpatialAttentionProcessor(AttentionProcessor):
    """Processor of a spatial attention module: ``processor(module, qkv, cond) -> [B, C, T]``.

    ``qkv`` is the module's [B, 3C, T] projection; the module provides ``num_heads``,
    ``legacy_order`` and ``encoder_kv`` (None for plain self-attention, in which case ``cond`` is None).
    """

    def __call__(self, module, qkv: torch.Tensor, cond: Optional[Conditioning]) -> torch.Tensor:
        raise NotImplementedError


class ReferenceAttentionProcessor(SpatialAttentionProcessor):
    """Upstream's computation: materialised ``c cᵀ`` through ``encoder_kv``, L×L weights."""

    name = "reference"

    def prepare(self, cond: Optional[Conditioning]) -> None:
        if cond is not None:
            cond.cemb_mm  # built once per forward, outside any checkpointed block (replays must not rebuild it)

    def __call__(self, module, qkv: torch.Tensor, cond: Optional[Conditioning]) -> torch.Tensor:
        return reference_attention(qkv, module.num_heads, module.encoder_kv, cond, legacy_order=module.legacy_order)


class FusedAttentionProcessor(SpatialAttentionProcessor):
    """The same function from ``u = W c`` and ``c`` (no B×D×D), through ``scaled_dot_product_attention``."""

    name = "fused"

    def __call__(self, module, qkv: torch.Tensor, cond: Optional[Conditioning]) -> torch.Tensor:
        return fused_attention(qkv, module.num_heads, module.encoder_kv, cond, legacy_order=module.legacy_order)


SPATIAL_PROCESSORS = {"reference": ReferenceAttentionProcessor, "fused": FusedAttentionProcessor}
