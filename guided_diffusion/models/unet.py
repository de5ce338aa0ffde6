"""One UNet skeleton for every variant (v2, hae, hae_lite, hae_v2, hae_v2_conservative).

A variant is a choice, not a copy:

* its *flavour*: upstream's files differ in where SiLU sits (flavour A: ``v2``, ``hae`` have no
  SiLU after a ResBlock's first norm, nor before the output conv; flavour B: ``hae_lite``,
  ``hae_v2`` have SiLU everywhere). State-dict keys are the same, the function is not, so a
  checkpoint is only meaningful with its own flavour;
* its HAE block design (``hae.py``), placed before each decoder upsampling;
* how attention is computed: ``"reference"`` (upstream's materialised computation) or
  ``"fused"`` (the same function with no L×L or B×D×D tensors; ``attention.py``, ``hae.py``).

``HAEUNetModelV2Conservative`` is ``HAEUNetModelV2`` with the fused computation: same module tree,
same weights, same outputs, a fraction of the memory.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.models.attention import ATTENTION_IMPLS, Conditioning
from guided_diffusion.models.hae import HybridCNNTransformerBlock, MultiScaleSparseTransformer, MASK_SEED
from guided_diffusion.models.nn import (
    TimestepBlock,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    norm_act,
    normalization,
    silu_or_identity,
    timestep_embedding,
    zero_module,
)


class TimestepEmbedSequential(nn.Sequential):
    """Routes the timestep embedding to ResBlocks/HAE blocks and the condition to attention."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: Optional[Conditioning] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, cond)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (optionally scale-shift), up/down-sampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        silu_everywhere: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.recompute_norm_act = False
        self.in_layers = nn.Sequential(
            normalization(channels), silu_or_identity(silu_everywhere), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            silu_or_identity(silu_everywhere or use_scale_shift_norm),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = norm_act(self.in_layers[0], self.in_layers[1], x, recompute=self.recompute_norm_act)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm_act(self.out_layers[0], self.out_layers[1], h, scale, shift, recompute=self.recompute_norm_act)
        else:
            h = norm_act(self.out_layers[0], self.out_layers[1], h + e, recompute=self.recompute_norm_act)
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention whose keys also include the D class-conditional encoder tokens."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        encoder_channels: Optional[int] = None,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.attention_impl = "reference"
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if encoder_channels is not None:
            self.encoder_kv = conv_nd(1, encoder_channels, channels * 2, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor, cond: Optional[Conditioning] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, cond), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, cond: Optional[Conditioning]) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = ATTENTION_IMPLS[self.attention_impl](qkv, self.num_heads, getattr(self, "encoder_kv", None), cond)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


NullArg = Union[bool, torch.Tensor]


class UNetModel(nn.Module):
    """The AnoFPDM UNet (upstream ``unet_v2.UNetModel``) and the skeleton of every HAE variant.

    Constructor arguments follow upstream. ``attention_resolutions`` holds downsample factors.
    Forward: ``forward(x, timesteps, y=None, threshold=-1, null=False, clf_free=False)``:

    * ``threshold > 0`` (classifier-free training): each row's label is dropped with that
      probability, drawn from torch's RNG on the model's device;
    * ``clf_free=True``: sampling; ``null=True`` gives the null (unconditional) prediction,
      ``null=False`` the conditional one, and a bool tensor [B] mixes them per row, so a
      conditional and a null prediction can share one batched forward.
    """

    silu_everywhere = False  # flavour A
    hae_design: Optional[str] = None
    default_attention_impl = "reference"

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
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        clf_free: bool = True,
        use_hae: bool = True,
        bottleneck_ratio: float = 0.25,
        memory_optimization: bool = True,
        zero_threshold: float = 1e-6,
        attention_impl: Optional[str] = None,
    ):
        super().__init__()
        if use_fp16:
            raise ValueError(
                "use_fp16 (upstream's convert_to_fp16) is not supported: it crashes for these models. "
                "Use mixed precision through torch.autocast instead (train.py --precision bf16|fp16)."
            )
        if num_classes is not None and not clf_free:
            raise ValueError("class-conditional models need clf_free=True (upstream's other branch is unusable)")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if model_channels * min(channel_mult) % 32:
            raise ValueError(f"num_channels {model_channels} × channel_mult {tuple(channel_mult)} must give multiples of 32 (GroupNorm)")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_hae = use_hae and self.hae_design is not None
        self.memory_optimization = memory_optimization
        self.zero_threshold = zero_threshold  # accepted for upstream command lines; null rows are known from the call

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, model_channels)
            self.class_emb = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res_block(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(
                ch_in, emb_dim, dropout, out_channels=ch_out, dims=dims, use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm, silu_everywhere=self.silu_everywhere, **kw,
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_checkpoint, encoder_channels=emb_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if self.use_hae:
                        layers.append(
                            HybridCNNTransformerBlock(
                                ch, emb_dim, self.hae_design, dropout=dropout,
                                use_checkpoint=use_checkpoint, bottleneck_ratio=bottleneck_ratio,
                            )
                        )
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), silu_or_identity(self.silu_everywhere), zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1))
        )
        for index, block in enumerate(self.hae_transformers()):
            block.mask_seed = MASK_SEED + index
        self.set_attention_impl(attention_impl or self.default_attention_impl)
        self.set_recompute_norm_act(False)

    # -- configuration ------------------------------------------------------------------------
    def hae_transformers(self) -> List[MultiScaleSparseTransformer]:
        """The HAE blocks' transformer branches, in the order the forward pass runs them."""
        return [m for m in self.output_blocks.modules() if isinstance(m, MultiScaleSparseTransformer)]

    def set_attention_impl(self, impl: str) -> None:
        """Choose how attention is computed: ``"reference"`` (materialised) or ``"fused"``."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {sorted(ATTENTION_IMPLS)}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, (AttentionBlock, MultiScaleSparseTransformer)):
                m.attention_impl = impl
        self.attention_impl = impl

    def set_recompute_norm_act(self, enabled: bool) -> None:
        """Recompute GroupNorm(+scale-shift)+SiLU in backward instead of storing their outputs."""
        for m in self.modules():
            if isinstance(m, (ResBlock, HybridCNNTransformerBlock)):
                m.recompute_norm_act = enabled
        self.recompute_norm_act = enabled

    def set_hae_masks(self, masks: Optional[Sequence[Optional[torch.Tensor]]]) -> None:
        """Install one bool mask (True = may not attend) per HAE block, in forward order.

        ``None`` restores the built-in deterministic masks.
        """
        blocks = self.hae_transformers()
        if masks is None:
            masks = [None] * len(blocks)
        if len(masks) != len(blocks):
            raise ValueError(f"set_hae_masks got {len(masks)} masks for {len(blocks)} HAE blocks")
        for block, mask in zip(blocks, masks):
            block.install_mask(mask)

    # -- forward ------------------------------------------------------------------------------
    def conditioning(self, y, threshold: float, null: NullArg, clf_free: bool, batch: int, like: torch.Tensor) -> Conditioning:
        """Class embedding and null rows for one forward pass (upstream's conditioning table)."""
        def class_embedding() -> torch.Tensor:
            if y is None:
                raise ValueError("this class-conditional model needs labels y for a conditional forward")
            return self.class_emb(self.label_emb(y))

        if threshold != -1:
            if not 0 < threshold <= 1:
                raise ValueError(f"label-dropout threshold must be in (0, 1] (or -1 to disable), got {threshold}")
            cemb = class_embedding()
            dropped = torch.rand(batch, device=cemb.device) < threshold
            return Conditioning(cemb=cemb * ~dropped[:, None], null_rows=dropped)
        if not clf_free:
            raise ValueError(
                "invalid condition setup: call a class-conditional model with threshold > 0 (training with "
                "label dropout) or clf_free=True (sampling, with null=True for the null prediction)"
            )
        if isinstance(null, torch.Tensor):
            null = null.to(device=like.device, dtype=torch.bool).reshape(-1)
            if null.shape[0] != batch:
                raise ValueError(f"per-row null mask has {null.shape[0]} entries for a batch of {batch}")
            cemb = class_embedding()
            return Conditioning(cemb=cemb * ~null[:, None], null_rows=null)
        if null:
            return Conditioning(cemb=like.new_zeros(batch, self.model_channels * 4), all_null=True)
        return Conditioning(cemb=class_embedding(), all_cond=True)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        threshold: float = -1,
        null: NullArg = False,
        clf_free: bool = False,
    ) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        cond = None
        if self.num_classes is not None:
            cond = self.conditioning(y, threshold, null, clf_free, x.shape[0], emb)
            emb = emb + cond.cemb
            if self.attention_impl == "reference":
                cond.cemb_mm  # build it once here, outside any checkpointed block
        elif y is not None:
            raise ValueError("labels y were given to an unconditional model (built without class_cond)")
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, cond)
            hs.append(h)
        h = self.middle_block(h, emb, cond)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out(h)


class HAEUNetModel(UNetModel):
    """Upstream ``unet_hae.HAEUNetModel``: flavour A, per-patch linear projections."""

    hae_design = "hae"


class HAEUNetModelLite(UNetModel):
    """Upstream ``unet_hae_lite.HAEUNetModelLite``: flavour B, shared 1×1 patch embedding."""

    silu_everywhere = True
    hae_design = "hae_lite"


class HAEUNetModelV2(UNetModel):
    """Upstream ``unet_hae_v2.HAEUNetModelV2`` (flavour B, bottleneck MLP), computed as upstream does."""

    silu_everywhere = True
    hae_design = "hae_v2"


class HAEUNetModelV2Conservative(HAEUNetModelV2):
    """HAE V2 with the same weights and outputs, computed without L×L or B×D×D tensors.

    ``memory_optimization=False`` selects the materialised reference computation.
    """

    def __init__(self, *args, memory_optimization: bool = True, attention_impl: Optional[str] = None, **kwargs):
        impl = attention_impl or ("fused" if memory_optimization else "reference")
        super().__init__(*args, memory_optimization=memory_optimization, attention_impl=impl, **kwargs)
        self.set_recompute_norm_act(memory_optimization)
