"""What the norm + SiLU recompute saves for backward, counted from the tensor shapes (saved-tensor hooks).

Without recompute, ``act(norm(x))`` (or ``act(norm(x) * (1 + scale) + shift)``) keeps for backward, besides x:
GroupNorm's output (SiLU's input) and, with scale-shift, the normalised tensor kept by the product. With
recompute only x is kept (and the small scale/shift). The convolution after it keeps its own input either way.
"""

import pytest
import torch

from guided_diffusion.models.hae import HybridCNNTransformerBlock
from guided_diffusion.models.nn import GroupNorm32
from guided_diffusion.models.unet import HAEUNetModelV2, HAEUNetModelV2Conservative, ResBlock
from guided_diffusion.script_util import create_model

B, C, S, EMB = 2, 32, 8, 16
FULL = B * C * S * S * 4  # bytes of one float32 [B, C, S, S] activation


def saved_storages(fn, module: torch.nn.Module) -> dict:
    """{storage pointer: (bytes, shape)} of the tensors autograd saves while ``fn()`` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    found = {}

    def pack(t):
        found.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {k: v for k, v in found.items() if k not in params}


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_saves_four_activations_with_recompute(scale_shift):
    """x, SiLU-1 out (conv-1 input), h + emb (norm-2 input), SiLU-2 out (conv-2 input) with recompute; without it
    also norm-1 out and norm-2 out, and with scale-shift the modulated tensor too: 6 (7) activations."""
    torch.manual_seed(0)
    block = ResBlock(C, EMB, 0.0, out_channels=C, use_scale_shift_norm=scale_shift, silu_everywhere=True).eval()
    x = torch.randn(B, C, S, S, requires_grad=True)
    emb = torch.randn(B, EMB, requires_grad=True)
    counts = {}
    for recompute in (False, True):
        block.recompute_norm_act = recompute
        st = saved_storages(lambda: block(x, emb), block)
        full = [b for b, shape in st.values() if shape == (B, C, S, S)]
        assert all(b == FULL for b in full)
        small = sum(b for b, shape in st.values() if shape != (B, C, S, S))
        assert small < FULL / 4, st  # only [B, EMB], [B, C] statistics, [B, C, 1, 1] scale-shift
        counts[recompute] = len(full)
    assert counts == {False: 7 if scale_shift else 6, True: 4}


def _tiny(cls_name: str, **kw):
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 in_channels=1, class_cond=True, num_classes=2, use_hae=True, use_scale_shift_norm=True,
                 num_head_channels=32, unet_ver=cls_name, dropout=0.0)
    flags.update(kw)
    torch.manual_seed(0)
    return create_model(**flags)


def _activation_bytes(model, x, t, y, min_numel):
    st = saved_storages(lambda: model(x, t, y=y, clf_free=True), model)
    return sum(b for b, shape in st.values() if torch.Size(shape).numel() >= min_numel)


def test_model_recompute_saves_the_norm_outputs_of_every_resblock_and_hae_branch():
    """Across the whole Conservative model, turning the recompute off adds, for each norm + SiLU, its input's size
    once (SiLU's saved input) and once more where the ResBlock modulates by scale-shift."""
    model = _tiny("hae_v2_conservative").eval()
    assert model.recompute_norm_act  # on by default
    x, t, y = torch.randn(B, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 1])
    norm_inputs = []  # (numel of the norm's input, extra full-size tensors the recompute avoids)
    hooks = []
    for m in model.modules():
        pairs = []
        if isinstance(m, ResBlock):
            pairs = [(m.in_layers[0], 1), (m.out_layers[0], 2 if m.use_scale_shift_norm else 1)]
        elif isinstance(m, HybridCNNTransformerBlock):
            pairs = [(m.conv_branch[0], 1), (m.conv_branch[3], 1)]
        for norm, extra in pairs:
            assert isinstance(norm, GroupNorm32)
            hooks.append(norm.register_forward_hook(
                lambda mod, inp, out, extra=extra: norm_inputs.append((inp[0].numel(), extra))))
    with torch.no_grad():
        model(x, t, y=y, clf_free=True)
    for h in hooks:
        h.remove()
    assert len(norm_inputs) == 2 * sum(isinstance(m, ResBlock) for m in model.modules()) + 2 * len(
        model.hae_transformers())
    smallest = min(n for n, _ in norm_inputs)
    expected_saving = sum(4 * n * extra for n, extra in norm_inputs)

    with_recompute = _activation_bytes(model, x, t, y, smallest)
    model.set_recompute_norm_act(False)
    without = _activation_bytes(model, x, t, y, smallest)
    assert without - with_recompute == expected_saving

    # HAE V2 (no recompute) with the same weights saves what Conservative saves with the recompute off, plus
    # its dense attention; the Conservative constructor's default is the recompute-on figure
    fresh = _tiny("hae_v2_conservative").eval()
    assert _activation_bytes(fresh, x, t, y, smallest) == with_recompute
    v2 = _tiny("hae_v2").eval()
    assert isinstance(v2, HAEUNetModelV2) and not isinstance(v2, HAEUNetModelV2Conservative)
    assert not v2.recompute_norm_act
    v2.set_recompute_norm_act(True)
    v2_on = _activation_bytes(v2, x, t, y, smallest)
    v2.set_recompute_norm_act(False)
    assert _activation_bytes(v2, x, t, y, smallest) - v2_on == expected_saving
