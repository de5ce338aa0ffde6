"""Small building blocks shared by every UNet variant."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so it is stable under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: 32-group GroupNorm (channels must be divisible by 32)."""
    if channels % 32:
        raise ValueError(f"GroupNorm with 32 groups needs channels divisible by 32, got {channels}")
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, computed in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(func: Callable, inputs: Sequence, enabled: bool):
    """Activation checkpointing that tolerates ``None`` inputs and replays the RNG state.

    Recomputation in backward therefore sees the same dropout draws, so gradients are those of
    the function that ran forward (upstream's version crashed on ``None`` and redrew dropout).
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False, preserve_rng_state=True)
    return func(*inputs)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _norm_act(norm: nn.Module, act: nn.Module, x: torch.Tensor, scale, shift) -> torch.Tensor:
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return act(h)


def norm_act(
    norm: nn.Module,
    act: nn.Module,
    x: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    recompute: bool = False,
) -> torch.Tensor:
    """``act(norm(x) * (1 + scale) + shift)``; with ``recompute`` only x (and scale, shift) are kept.

    Norm, modulation and SiLU are cheap elementwise work but each would store a full-size tensor
    for backward; recomputing them in backward keeps one (the input) instead of up to four.
    """
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_norm_act, norm, act, x, scale, shift, use_reentrant=False)
    return _norm_act(norm, act, x, scale, shift)


def silu_or_identity(silu: bool) -> nn.Module:
    return nn.SiLU() if silu else nn.Identity()


def embedding_mlp(channels: int, emb_dim: int) -> nn.Sequential:
    """Linear(channels, emb_dim), SiLU, Linear(emb_dim, emb_dim): the time and class embeddings (keys .0, .2)."""
    return nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


__all__ = [
    "GroupNorm32",
    "TimestepBlock",
    "normalization",
    "conv_nd",
    "avg_pool_nd",
    "zero_module",
    "timestep_embedding",
    "checkpoint",
    "silu_or_identity",
    "embedding_mlp",
    "norm_act",
]
