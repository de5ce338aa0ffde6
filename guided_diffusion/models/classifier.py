"""The noisy-image classifier of classifier-guided sampling (upstream ``unet_v1.EncoderUNetModel``).

It is the v1 UNet's encoder and middle block (the same blocks, built by the same functions as
``unet.UNetModel``: flavour B, plain self-attention) followed by a pooling head that maps the
final feature map to logits. ``classifier(x, timesteps)`` returns ``[B, out_channels]`` logits;
guidance uses the input gradient of their log-softmax.

Pooling heads (``pool``): ``"attention"`` (upstream's configs; GroupNorm, SiLU, then CLIP's
attention pool) and ``"adaptive"`` (GroupNorm, SiLU, global average, zero-initialised 1×1 conv).
Upstream's ``"spatial"`` / ``"spatial_v2"`` heads are not offered.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from guided_diffusion.models.attention import SPATIAL_PROCESSORS, SpatialAttentionProcessor
from guided_diffusion.models.nn import conv_nd, embedding_mlp, normalization, timestep_embedding, zero_module
from guided_diffusion.models.processors import AttentionProcessorsMixin, HoldsAttentionProcessor
from guided_diffusion.models.unet import BlockFactory, build_encoder, build_middle, reject_use_fp16

CLASSIFIER_POOLS = ("attention", "adaptive")


class AttentionPool2d(HoldsAttentionProcessor, nn.Module):
    """CLIP's attention pool: the mean token attends over itself and the H·W positions.

    Tokens are [mean over positions, positions in raster order] plus a learned positional
    embedding [C, H·W + 1]; one ``qkv_proj`` 1×1 conv, multi-head attention with q, k, v split
    before the heads (upstream ``QKVAttention``), ``c_proj``; the output is the mean token's.
    The attention is computed by a spatial processor, as in ``AttentionBlock``.
    """

    processor_type = SpatialAttentionProcessor
    builtin_processors = SPATIAL_PROCESSORS
    legacy_order = False
    encoder_kv = None

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: Optional[int] = None):
        super().__init__()
        if embed_dim % num_head_channels:
            raise ValueError(f"attention pool: channels {embed_dim} not divisible by num_head_channels {num_head_channels}")
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_head_channels
        self.set_processor("reference")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        if x.shape[-1] + 1 != self.positional_embedding.shape[1]:
            raise ValueError(
                f"attention pool built for {self.spatial_dim}×{self.spatial_dim} feature maps got {tuple(spatial)}: "
                "the classifier only accepts images of its image_size"
            )
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        h = self.processor(self, self.qkv_proj(x), None)
        return self.c_proj(h[:, :, :1])[:, :, 0]  # only the mean token is read: project it alone


class EncoderUNetModel(AttentionProcessorsMixin, nn.Module):
    """Upstream ``unet_v1.EncoderUNetModel``: the UNet's encoder and middle block, then a pool.

    Constructor arguments follow upstream (``attention_resolutions`` holds downsample factors;
    ``num_heads_upsample`` is accepted and unused, as there). ``forward(x, timesteps)`` -> logits.
    """

    silu_everywhere = True  # flavour B: upstream's unet_v1 blocks

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        reject_use_fp16(use_fp16)
        if pool not in CLASSIFIER_POOLS:
            raise ValueError(
                f"classifier_pool {pool!r} is not supported; choose one of {', '.join(CLASSIFIER_POOLS)} "
                "(upstream's configs use attention)"
            )
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("the attention pool needs num_head_channels (upstream's create_classifier uses 64)")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.use_checkpoint = use_checkpoint
        self.pool = pool

        emb_dim = model_channels * 4
        self.time_embed = embedding_mlp(model_channels, emb_dim)
        blocks = BlockFactory(
            emb_dim, dropout, dims, use_checkpoint, use_scale_shift_norm, self.silu_everywhere, num_head_channels,
            encoder_channels=None, use_new_attention_order=use_new_attention_order,
        )
        self.input_blocks, _, ch, ds = build_encoder(
            blocks, in_channels, model_channels, channel_mult, num_res_blocks, self.attention_resolutions, num_heads,
            resblock_updown, conv_resample,
        )
        self.middle_block = build_middle(blocks, ch, num_heads)
        if pool == "attention":
            head = [AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)]
        else:
            head = [nn.AdaptiveAvgPool2d((1, 1)), zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten()]
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), *head)  # upstream's keys: out.0, out.2 (out.3)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        return self.out(self.middle_block(h, emb))
