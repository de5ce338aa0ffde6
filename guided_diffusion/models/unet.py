"""One UNet skeleton for every variant (v1, v2, hae, hae_lite, hae_v2, hae_v2_conservative).

A variant is a choice, not a copy:

* its *flavour*: upstream's files differ in where SiLU sits (flavour A: ``v2``, ``hae`` have no
  SiLU after a ResBlock's first norm, nor before the output conv; flavour B: ``v1``, ``hae_lite``,
  ``hae_v2`` have SiLU everywhere). State-dict keys are the same, the function is not, so a
  checkpoint is only meaningful with its own flavour;
* its attention: conditional (the v2 family's ``encoder_kv`` class tokens) or plain self-attention
  (``v1``, the classifier in ``classifier.py``, built from the same blocks);
* its HAE block design (``hae.py``), placed before each decoder upsampling;
* how attention is computed: each attention module holds a processor (``processors.py``),
  ``"reference"`` (upstream's materialised computation) or ``"fused"`` (the same function with no
  L×L or B×D×D tensors; ``attention.py``, ``hae.py``), set model-wide by ``set_attention_impl`` /
  ``set_attn_processor``. ``v1`` and ``v2`` default to ``"fused"``; ``hae``, ``hae_lite`` and ``hae_v2``
  to ``"reference"`` (upstream's HAE computation, the baseline of the benchmarks).

``HAEUNetModelV2Conservative`` is ``HAEUNetModelV2`` with the fused computation: same module tree,
same weights, same outputs, a fraction of the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.models.attention import SPATIAL_PROCESSORS, Conditioning, SpatialAttentionProcessor
from guided_diffusion.models.hae import HAE_DESIGNS, HAEDesign, HybridCNNTransformerBlock, MultiScaleSparseTransformer, MASK_SEED
from guided_diffusion.models.processors import AttentionProcessorsMixin, HoldsAttentionProcessor
from guided_diffusion.models.nn import (
    TimestepBlock,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    embedding_mlp,
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


class AttentionBlock(HoldsAttentionProcessor, nn.Module):
    """Spatial self-attention; with ``encoder_channels`` its keys also include the D class tokens.

    Holds the weights; its processor (``attention.py``) computes the attention.
    """

    processor_type = SpatialAttentionProcessor
    builtin_processors = SPATIAL_PROCESSORS

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        encoder_channels: Optional[int] = None,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if encoder_channels is not None and use_new_attention_order:
            # the encoder tokens' channels are grouped per head as (k_h, v_h): legacy layout only
            raise ValueError("conditional attention (encoder_kv) supports only the legacy head order")
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if encoder_channels is not None:
            self.encoder_kv = conv_nd(1, encoder_channels, channels * 2, 1)
        else:
            self.encoder_kv = None
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))
        self.set_processor("reference")

    def forward(self, x: torch.Tensor, cond: Optional[Conditioning] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, cond), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, cond: Optional[Conditioning]) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.processor(self, qkv, cond if self.encoder_kv is not None else None)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


NullArg = Union[bool, torch.Tensor]


def reject_use_fp16(use_fp16: bool) -> None:
    """Upstream's ``convert_to_fp16`` path is not offered; mixed precision goes through autocast."""
    if use_fp16:
        raise ValueError(
            "use_fp16 (upstream's convert_to_fp16) is not supported: it crashes for these models. "
            "Use mixed precision through torch.autocast instead (train.py --precision bf16|fp16)."
        )


@dataclass(frozen=True)
class BlockFactory:
    """The choices one model makes for its ResBlocks and attention blocks (shared by every network)."""

    emb_dim: int
    dropout: float
    dims: int
    use_checkpoint: bool
    use_scale_shift_norm: bool
    silu_everywhere: bool
    num_head_channels: int
    encoder_channels: Optional[int]  # conditional attention (v2 family) or plain self-attention (v1)
    use_new_attention_order: bool = False

    def res(self, ch_in: int, ch_out: int, **kw) -> ResBlock:
        return ResBlock(
            ch_in, self.emb_dim, self.dropout, out_channels=ch_out, dims=self.dims, use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm, silu_everywhere=self.silu_everywhere, **kw,
        )

    def attention(self, ch: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(
            ch, num_heads, self.num_head_channels, self.use_checkpoint, encoder_channels=self.encoder_channels,
            use_new_attention_order=self.use_new_attention_order,
        )


def build_encoder(
    blocks: BlockFactory,
    in_channels: int,
    model_channels: int,
    channel_mult: Sequence[float],
    num_res_blocks: int,
    attention_ds: Sequence[int],
    num_heads: int,
    resblock_updown: bool,
    conv_resample: bool,
) -> Tuple[nn.ModuleList, List[int], int, int]:
    """The encoder half (``input_blocks``): returns the blocks, their output channels, the last
    channel count and the final downsample factor."""
    ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(blocks.dims, in_channels, ch, 3, padding=1))])
    skip_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: List[nn.Module] = [blocks.res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_ds:
                layers.append(blocks.attention(ch, num_heads))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_chans.append(ch)
        if level != len(channel_mult) - 1:
            down = blocks.res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, blocks.dims)
            input_blocks.append(TimestepEmbedSequential(down))
            skip_chans.append(ch)
            ds *= 2
    return input_blocks, skip_chans, ch, ds


def build_middle(blocks: BlockFactory, ch: int, num_heads: int) -> TimestepEmbedSequential:
    """ResBlock, attention (whatever ``attention_resolutions`` says), ResBlock."""
    return TimestepEmbedSequential(blocks.res(ch, ch), blocks.attention(ch, num_heads), blocks.res(ch, ch))


class UNetModel(AttentionProcessorsMixin, nn.Module):
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
    hae_design: Optional[HAEDesign] = None
    # the fused processors: upstream's function without its L×L and B×D×D tensors (less memory, less time)
    default_attention_impl = "fused"
    conditional_attention = True  # attention also sees the D class tokens encoder_kv(c cᵀ) (v2 family)
    honours_attention_order = False  # upstream's v2-family files accept use_new_attention_order and ignore it

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
        reject_use_fp16(use_fp16)
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
        self.clf_free = clf_free
        self.use_checkpoint = use_checkpoint
        self.use_hae = use_hae and self.hae_design is not None
        self.memory_optimization = memory_optimization
        self.zero_threshold = zero_threshold  # accepted for upstream command lines; null rows are known from the call

        emb_dim = model_channels * 4
        self.time_embed = embedding_mlp(model_channels, emb_dim)
        if num_classes is not None:
            self.build_label_embedding(num_classes, clf_free)

        blocks = BlockFactory(
            emb_dim, dropout, dims, use_checkpoint, use_scale_shift_norm, self.silu_everywhere, num_head_channels,
            encoder_channels=emb_dim if self.conditional_attention else None,
            use_new_attention_order=use_new_attention_order and self.honours_attention_order,
        )
        self.input_blocks, skip_chans, ch, ds = build_encoder(
            blocks, in_channels, model_channels, channel_mult, num_res_blocks, self.attention_resolutions, num_heads,
            resblock_updown, conv_resample,
        )
        input_ch = skip_chans[0]
        self.middle_block = build_middle(blocks, ch, num_heads)

        self.output_blocks = nn.ModuleList([])
        hae_sizes = []  # feature-map size at each HAE block, in forward order
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [blocks.res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(blocks.attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if self.use_hae:
                        hae_sizes.append(image_size // ds)
                        layers.append(
                            HybridCNNTransformerBlock(
                                ch, emb_dim, self.hae_design, dropout=dropout,
                                use_checkpoint=use_checkpoint, bottleneck_ratio=bottleneck_ratio,
                            )
                        )
                    layers.append(blocks.res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), silu_or_identity(self.silu_everywhere), zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1))
        )
        for index, (block, size) in enumerate(zip(self.hae_transformers(), hae_sizes)):
            block.mask_seed = MASK_SEED + index
            block.prepare_masks(size, size)  # at the model's resolution; other sizes build theirs at first use
        self.set_attention_impl(attention_impl or self.default_attention_impl)
        self.set_recompute_norm_act(False)

    def build_label_embedding(self, num_classes: int, clf_free: bool) -> None:
        """``label_emb`` (Embedding(num_classes, mc)) and ``class_emb`` (MLP mc -> 4·mc -> 4·mc)."""
        if not clf_free:
            raise ValueError("class-conditional models need clf_free=True (upstream's other branch is unusable)")
        emb_dim = 4 * self.model_channels
        self.label_emb = nn.Embedding(num_classes, self.model_channels)
        self.class_emb = embedding_mlp(self.model_channels, emb_dim)

    # -- configuration ------------------------------------------------------------------------
    def hae_transformers(self) -> List[MultiScaleSparseTransformer]:
        """The HAE blocks' transformer branches, in the order the forward pass runs them."""
        return [m for m in self.output_blocks.modules() if isinstance(m, MultiScaleSparseTransformer)]

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
            self.prepare_attention(cond)
        elif y is not None:
            raise ValueError("labels y were given to an unconditional model (built without class_cond)")
        return self.run_unet(x, emb, cond)

    def run_unet(self, x: torch.Tensor, emb: torch.Tensor, cond: Optional[Conditioning]) -> torch.Tensor:
        """Encoder, middle, decoder and output head, given the embedding and the attention condition."""
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, cond)
            hs.append(h)
        h = self.middle_block(h, emb, cond)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out(h)


class UNetModelV1(UNetModel):
    """Upstream ``unet_v1.UNetModel`` (openai guided-diffusion's UNet): flavour B, plain self-attention.

    No ``encoder_kv`` tokens; ``use_new_attention_order`` is honoured. With classes and
    ``clf_free=False`` (the classifier-guided DM) ``label_emb`` = Embedding(num_classes, 4·mc) is
    added to the time embedding; with ``clf_free=True`` the label goes through ``class_emb`` as in
    v2, with label dropout and null predictions.

    Upstream adds the label only when the call passes ``uncond=True``, which no upstream script
    does, so its class-conditional v1 models were trained and sampled with the label ignored.
    Here the label is used whenever the model has classes; ``label_only_with_uncond=True`` restores
    upstream's rule for checkpoints trained that way (its ``label_emb`` is then frozen: the default
    call never reads it, so it gets no gradient, exactly as upstream, and DDP sees no unused
    parameter).
    """

    silu_everywhere = True
    conditional_attention = False
    honours_attention_order = True

    def __init__(self, *args, label_only_with_uncond: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_only_with_uncond = label_only_with_uncond
        if label_only_with_uncond:
            if self.num_classes is None:
                raise ValueError("label_only_with_uncond needs a class-conditional v1 model (class_cond True)")
            for module in (self.label_emb, getattr(self, "class_emb", None)):
                if module is not None:
                    module.requires_grad_(False)

    def build_label_embedding(self, num_classes: int, clf_free: bool) -> None:
        if clf_free:
            super().build_label_embedding(num_classes, clf_free)
        else:
            self.label_emb = nn.Embedding(num_classes, 4 * self.model_channels)

    def label_embedding(self, y, threshold: float, null: NullArg, clf_free: bool, batch: int, like: torch.Tensor) -> torch.Tensor:
        """What the label adds to the time embedding in this call."""
        if self.clf_free:
            return self.conditioning(y, threshold, null, clf_free, batch, like).cemb
        if threshold != -1 or clf_free or isinstance(null, torch.Tensor) or null:
            raise ValueError(
                "this v1 model was built with clf_free=False (classifier-guided: Embedding(y) is added to the "
                "time embedding and there is no null embedding): call it as model(x, t, y=y); label dropout "
                "(threshold > 0), clf_free=True and null need a model built with clf_free=True"
            )
        if y is None:
            raise ValueError("this class-conditional model needs labels y for a conditional forward")
        return self.label_emb(y)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        threshold: float = -1,
        null: NullArg = False,
        clf_free: bool = False,
        uncond: Optional[bool] = None,
    ) -> torch.Tensor:
        """Upstream's signature. ``uncond`` (upstream's name): True uses the label, False ignores it
        (and ``y``, ``threshold``, ``null``, ``clf_free``) for this call; None follows the model
        (``label_only_with_uncond``)."""
        if self.num_classes is None:
            if uncond:
                raise ValueError("uncond=True asks for the label, but this v1 model has no classes (class_cond False)")
            return super().forward(x, timesteps, y=y, threshold=threshold, null=null, clf_free=clf_free)
        use_label = not self.label_only_with_uncond if uncond is None else bool(uncond)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if use_label:
            emb = emb + self.label_embedding(y, threshold, null, clf_free, x.shape[0], emb)
        return self.run_unet(x, emb, None)


class HAEUNetModel(UNetModel):
    """Upstream ``unet_hae.HAEUNetModel``: flavour A, per-patch linear projections."""

    default_attention_impl = "reference"  # upstream's computation: the baseline the fused models are measured against

    hae_design = HAE_DESIGNS["hae"]


class HAEUNetModelLite(UNetModel):
    """Upstream ``unet_hae_lite.HAEUNetModelLite``: flavour B, shared 1×1 patch embedding."""

    default_attention_impl = "reference"  # upstream's computation: the baseline the fused models are measured against

    silu_everywhere = True
    hae_design = HAE_DESIGNS["hae_lite"]


class HAEUNetModelV2(UNetModel):
    """Upstream ``unet_hae_v2.HAEUNetModelV2`` (flavour B, bottleneck MLP), computed as upstream does."""

    default_attention_impl = "reference"  # upstream's computation: the baseline the fused models are measured against

    silu_everywhere = True
    hae_design = HAE_DESIGNS["hae_v2"]


class HAEUNetModelV2Conservative(HAEUNetModelV2):
    """HAE V2 with the same weights and outputs, computed without L×L or B×D×D tensors.

    ``memory_optimization=False`` selects the materialised reference computation.
    """

    def __init__(self, *args, memory_optimization: bool = True, attention_impl: Optional[str] = None, **kwargs):
        impl = attention_impl or ("fused" if memory_optimization else "reference")
        super().__init__(*args, memory_optimization=memory_optimization, attention_impl=impl, **kwargs)
        self.set_recompute_norm_act(memory_optimization)
