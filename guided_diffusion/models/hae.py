"""Hybrid CNN-Transformer (HAE) blocks: one block class, three upstream designs.

An HAE block sits before each decoder upsampling. It runs a CNN branch and a multi-scale
"sparse" transformer branch on ``x + emb_layers(emb)`` and fuses them:

=============  ==========================  ===========================  ================
design          regional tokens             transformer MLP              fusion
=============  ==========================  ===========================  ================
``hae``         Linear(C·p² → C) per patch  Linear C→4C→C                conv1x1(cat)
``hae_lite``    mean of 1×1-conv features   Linear C→4C→C                conv1x1(mean)
``hae_v2``      mean of 1×1-conv features   bottleneck C→C·r→C           conv1x1(mean)
=============  ==========================  ===========================  ================

The token sequence is the H·W pixel tokens (raster order) followed by the tokens of 4×4 and 8×8
patches; a scale p is used only when H and W are divisible by p (upstream's rule). One
``nn.MultiheadAttention`` (8 heads) attends over the sequence under a fixed sparse mask and only
the pixel outputs are kept.

Masks (decisions §3): upstream's structure and density, but drawn once per block and length from
a fixed seed (on the CPU, so every device sees the same mask), cached on the model's device, and
shared by the conditional and null passes. The block's processor (``processors.py``) computes the
masked attention: ``"reference"`` calls ``nn.MultiheadAttention`` as upstream does (dense L×L
weights); ``"fused"`` uses a block-sparse kernel that stores no L×L tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.models.nn import TimestepBlock, checkpoint, norm_act, normalization
from guided_diffusion.models.processors import AttentionProcessor, HoldsAttentionProcessor
from guided_diffusion.models.sparse_attention import (
    band_random_mask,
    build_mask_plan,
    dense_masked_sdpa,
    multihead_self_attention,
)

PATCH_SIZES = (4, 8)
HAE_NUM_HEADS = 8
MASK_SEED = 20240607


@dataclass(frozen=True)
class HAEDesign:
    """One upstream HAE block design: three independent choices (the table above)."""

    name: str
    per_patch_projection: bool  # regional tokens: Linear(C·p² → C) per patch, else mean of a shared 1×1 conv
    bottleneck_mlp: bool  # transformer MLP C → C·r → C, else C → 4C → C
    concat_fusion: bool  # fusion conv over cat(conv, transformer), else over their mean


HAE_DESIGNS: Dict[str, HAEDesign] = {
    d.name: d
    for d in (
        HAEDesign("hae", per_patch_projection=True, bottleneck_mlp=False, concat_fusion=True),
        HAEDesign("hae_lite", per_patch_projection=False, bottleneck_mlp=False, concat_fusion=False),
        HAEDesign("hae_v2", per_patch_projection=False, bottleneck_mlp=True, concat_fusion=False),
    )
}


def hae_design(design: Union[str, HAEDesign]) -> HAEDesign:
    if isinstance(design, HAEDesign):
        return design
    if design not in HAE_DESIGNS:
        raise ValueError(f"unknown HAE design {design!r}; designs: {', '.join(HAE_DESIGNS)}")
    return HAE_DESIGNS[design]


def hae_mask(length: int, seed: int) -> torch.Tensor:
    """The built-in mask of a block: upstream's structure, drawn once from ``seed`` on the CPU."""
    return band_random_mask(length, torch.Generator().manual_seed(seed))


class BottleneckMLP(nn.Module):
    """HAE V2's MLP: C -> max(1, int(C·r)) -> C (keys ``mlp.mlp.0`` / ``mlp.mlp.3``)."""

    def __init__(self, channels: int, ratio: float, dropout: float):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, channels), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def wide_mlp(channels: int, dropout: float) -> nn.Sequential:
    """hae / hae_lite MLP: C -> 4C -> C (keys ``mlp.0`` / ``mlp.3``)."""
    return nn.Sequential(
        nn.Linear(channels, 4 * channels), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * channels, channels), nn.Dropout(dropout)
    )


class MaskedAttentionProcessor(AttentionProcessor):
    """Processor of an HAE block's masked attention: ``processor(module, seq [B, L, C]) -> [B, L, C]``.

    The module provides ``multihead_attn`` (the weights), ``mask(L, device)`` (bool, True = may not
    attend) and ``plan(L, device)`` (the mask's block-sparse form).
    """

    def __call__(self, module: "MultiScaleSparseTransformer", seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseMaskedAttentionProcessor(MaskedAttentionProcessor):
    """Upstream's call: ``nn.MultiheadAttention`` with the dense L×L mask."""

    name = "reference"

    def __call__(self, module: "MultiScaleSparseTransformer", seq: torch.Tensor) -> torch.Tensor:
        return module.multihead_attn(seq, seq, seq, attn_mask=module.mask(seq.shape[1], seq.device))[0]


class SparseMaskedAttentionProcessor(MaskedAttentionProcessor):
    """The exact masked attention with no L×L tensor stored for backward.

    * On a CPU, the block-sparse kernel (only allowed (query, key) pairs). Without autograd, sequences of at most
      ``dense_max_length`` tokens (the 8×8 and 16×16 HAE blocks: 69 and 276 tokens) run through
      ``scaled_dot_product_attention`` with the dense mask instead: the same function with nothing to save, 3-4×
      faster there; longer sequences (1104, 4416 tokens) keep the kernel, which is faster and lighter for them.
    * On a GPU, ``scaled_dot_product_attention`` with the dense mask, in training too: the fused kernels (CUDA's
      memory-efficient kernel, dropout included) take any mask and store no L×L tensor, and every 128×128 tile
      of an HAE mask has an allowed entry, so a block-sparse loop could skip nothing; it runs in the autocast
      dtype (bf16 under ``--precision bf16``) with no host synchronisation.
    """

    name = "fused"

    def __init__(self, dense_max_length: int = 512):
        self.dense_max_length = dense_max_length

    def __call__(self, module: "MultiScaleSparseTransformer", seq: torch.Tensor) -> torch.Tensor:
        length = seq.shape[1]
        if seq.device.type == "cuda" or (not torch.is_grad_enabled() and length <= self.dense_max_length):
            return dense_masked_sdpa(module.multihead_attn, seq, module.mask(length, seq.device))
        return multihead_self_attention(module.multihead_attn, seq, module.plan(length, seq.device))


class MultiScaleSparseTransformer(HoldsAttentionProcessor, nn.Module):
    """Masked multi-head attention over pixel and patch tokens, then an MLP; returns ``a + x``.

    ``design`` (an ``HAEDesign`` or its name) chooses the regional tokens and the MLP.
    """

    processor_type = MaskedAttentionProcessor
    builtin_processors = {"reference": DenseMaskedAttentionProcessor, "fused": SparseMaskedAttentionProcessor}

    def __init__(self, channels: int, design: Union[str, HAEDesign], dropout: float, bottleneck_ratio: float = 0.25):
        super().__init__()
        if channels % HAE_NUM_HEADS:
            raise ValueError(f"HAE attention uses {HAE_NUM_HEADS} heads: channels must be divisible by it, got {channels}")
        self.design = design = hae_design(design)
        self.local_norm = nn.LayerNorm(channels)
        self.regional_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in PATCH_SIZES)
        if design.per_patch_projection:
            self.patch_projections = nn.ModuleList(nn.Linear(channels * p * p, channels) for p in PATCH_SIZES)
        else:
            self.shared_patch_embed = nn.Conv2d(channels, channels, 1)
        self.multihead_attn = nn.MultiheadAttention(channels, HAE_NUM_HEADS, dropout=dropout, batch_first=True)
        self.norm_out = nn.LayerNorm(channels)
        self.mlp = BottleneckMLP(channels, bottleneck_ratio, dropout) if design.bottleneck_mlp else wide_mlp(channels, dropout)
        self.set_processor("reference")
        self.mask_seed = MASK_SEED
        self.installed_mask: Optional[torch.Tensor] = None
        # the built-in mask at the model's own resolution (``prepare_masks``): a buffer, so it moves with the model
        # and compiled code only reads it; not saved (``persistent=False``), so checkpoints keep upstream's keys
        self.register_buffer("builtin_mask", None, persistent=False)
        self._masks: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._plans: Dict[Tuple[int, torch.device], object] = {}

    # -- tokens -------------------------------------------------------------------------------
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        feats = x if self.design.per_patch_projection else self.shared_patch_embed(x)
        seq = [self.local_norm(feats.flatten(2).transpose(1, 2))]
        for i, p in enumerate(PATCH_SIZES):
            if h % p or w % p:
                continue
            if self.design.per_patch_projection:
                patches = feats.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
                regional = self.patch_projections[i](patches.reshape(b, (h // p) * (w // p), c * p * p))
            else:
                regional = F.avg_pool2d(feats, p).flatten(2).transpose(1, 2)
            seq.append(self.regional_norms[i](regional))
        return torch.cat(seq, dim=1)

    # -- masks --------------------------------------------------------------------------------
    @staticmethod
    def sequence_length(height: int, width: int) -> int:
        """Tokens for an h×w feature map: the pixels, plus the patches of every scale p dividing h and w."""
        return height * width + sum((height // p) * (width // p) for p in PATCH_SIZES if not height % p and not width % p)

    def prepare_masks(self, height: int, width: int) -> None:
        """Build the built-in mask (and its CPU block plan) for an h×w feature map now rather than in the first
        forward, where drawing it (a generator, Python loops, host syncs) would break a ``torch.compile`` graph."""
        device = self.multihead_attn.in_proj_weight.device
        if device.type == "meta":  # a model of shapes only (built under torch.device("meta")): nothing to draw
            return
        length = self.sequence_length(height, width)
        self.builtin_mask = hae_mask(length, self.mask_seed).to(device)
        if device.type == "cpu":
            self.plan(length, device)  # the block plan serves the CPU kernel only

    def mask(self, length: int, device: torch.device) -> torch.Tensor:
        builtin = self.builtin_mask
        if self.installed_mask is None and builtin is not None and builtin.shape[0] == length:
            return builtin.to(device)
        key = (length, device)
        if key not in self._masks:
            if self.installed_mask is not None:
                mask = self.installed_mask
                if mask.shape != (length, length):
                    raise ValueError(f"installed HAE mask has shape {tuple(mask.shape)}, this block needs ({length}, {length})")
            else:
                mask = hae_mask(length, self.mask_seed)
            self._masks[key] = mask.to(device=device, dtype=torch.bool)
        return self._masks[key]

    def plan(self, length: int, device: torch.device):
        key = (length, device)
        if key not in self._plans:
            self._plans[key] = build_mask_plan(self.mask(length, device))
        return self._plans[key]

    def install_mask(self, mask: Optional[torch.Tensor]) -> None:
        self.installed_mask = None if mask is None else mask.detach().cpu().bool()
        self._masks.clear()
        self._plans.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        a = self.processor(self, self.tokens(x))[:, : h * w]
        a = a + self.mlp(self.norm_out(a))
        # contiguous NCHW: a channels-last view here sends later convolutions down slow kernels
        return a.transpose(1, 2).reshape(b, c, h, w).contiguous() + x


class HybridCNNTransformerBlock(TimestepBlock):
    """CNN branch + multi-scale sparse transformer branch, fused, plus the block input."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        design: Union[str, HAEDesign],
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        bottleneck_ratio: float = 0.25,
    ):
        super().__init__()
        self.design = design = hae_design(design)
        self.use_checkpoint = use_checkpoint
        self.recompute_norm_act = False
        self.conv_branch = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.transformer_branch = MultiScaleSparseTransformer(channels, design, dropout, bottleneck_ratio)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        fusion_in = 2 * channels if design.concat_fusion else channels
        self.fusion_conv = nn.Conv2d(fusion_in, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        xe = x + self.emb_layers(emb).type(x.dtype)[..., None, None]
        branch = self.conv_branch
        conv = branch[2](norm_act(branch[0], branch[1], xe, recompute=self.recompute_norm_act))
        conv = branch[5](norm_act(branch[3], branch[4], conv, recompute=self.recompute_norm_act))
        trans = self.transformer_branch(xe)
        fused = torch.cat([conv, trans], dim=1) if self.design.concat_fusion else (conv + trans) / 2
        return self.fusion_conv(fused) + x
