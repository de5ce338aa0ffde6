"""The attention-processor mechanism: modules hold weights, processors compute, one model-wide setter."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.models.attention import (
    Conditioning,
    FusedAttentionProcessor,
    ReferenceAttentionProcessor,
    SpatialAttentionProcessor,
    fused_attention,
)
from guided_diffusion.models.classifier import AttentionPool2d
from guided_diffusion.models.hae import HAE_DESIGNS, MaskedAttentionProcessor, MultiScaleSparseTransformer, hae_design
from guided_diffusion.models.unet import AttentionBlock

from conftest import load_vector, model_flags, requires_cuda, tolerance


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread (conftest)


def hae_v2_model():
    vec = load_vector("hae_v2")
    model = su.create_model(**model_flags(vec["flags"]))
    model.load_state_dict(vec["state_dict"])
    return model, vec


def saved_bytes(model, vec, **kwargs) -> int:
    """Bytes autograd saves for backward in one forward (the activation memory of a training step)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(vec["x"], vec["t"], y=vec["y"], **kwargs)
    return total, out


class CountingProcessor(SpatialAttentionProcessor):
    """A custom processor: the fused computation, counting calls and prepares."""

    name = "counting"

    def __init__(self):
        self.calls = 0
        self.prepared = []

    def prepare(self, cond):
        self.prepared.append(cond)

    def __call__(self, module, qkv, cond):
        self.calls += 1
        return fused_attention(qkv, module.num_heads, module.encoder_kv, cond, legacy_order=module.legacy_order)


class ZeroProcessor(SpatialAttentionProcessor):
    def __call__(self, module, qkv, cond):
        return torch.zeros_like(qkv[:, : qkv.shape[1] // 3])


def test_every_attention_module_is_listed_with_its_processor():
    model, _ = hae_v2_model()
    names = model.attn_processors
    spatial = [n for n, m in model.named_modules() if isinstance(m, AttentionBlock)]
    hae = [n for n, m in model.named_modules() if isinstance(m, MultiScaleSparseTransformer)]
    assert len(spatial) == 7 and len(hae) == 3
    assert sorted(names) == sorted(spatial + hae)
    assert all(isinstance(p, ReferenceAttentionProcessor) for n, p in names.items() if n in spatial)
    assert model.attention_impl == "reference"
    model.set_attention_impl("fused")
    assert model.attention_impl == "fused"
    assert all(isinstance(model.attn_processors[n], FusedAttentionProcessor) for n in spatial)


@pytest.mark.parametrize("mode", [dict(threshold=0.5), dict(clf_free=True, null=torch.tensor([True, False, True]))],
                         ids=["label_dropout", "mixed_null"])
def test_switching_processors_changes_memory_not_outputs(mode):
    """One model instance: the fused processors save a fraction of the reference's tensors, same outputs."""
    model, vec = hae_v2_model()
    model.train()
    ref_bytes, ref = saved_bytes(model, vec, **mode)
    model.set_attention_impl("fused")
    fused_bytes, out = saved_bytes(model, vec, **mode)
    model.set_attention_impl("reference")
    again_bytes, again = saved_bytes(model, vec, **mode)
    assert (out - ref).abs().max().item() <= tolerance(ref)
    assert torch.equal(again, ref) and again_bytes == ref_bytes
    assert fused_bytes < 0.6 * ref_bytes, (fused_bytes, ref_bytes)


def test_a_custom_processor_is_installed_where_it_fits_and_used():
    model, vec = hae_v2_model()
    model.eval()
    with torch.no_grad():
        ref = model(vec["x"], vec["t"], y=vec["y"], clf_free=True)
    counting = CountingProcessor()
    model.set_attn_processor(counting)
    # a spatial processor goes to the 7 spatial blocks; the HAE blocks keep theirs
    assert sum(p is counting for p in model.attn_processors.values()) == 7
    assert model.attention_impl == "mixed"
    with torch.no_grad():
        out = model(vec["x"], vec["t"], y=vec["y"], clf_free=True)
    assert counting.calls == 7
    assert len(counting.prepared) == 1 and isinstance(counting.prepared[0], Conditioning)  # once per forward
    assert (out - ref).abs().max().item() <= tolerance(ref)
    model.set_attn_processor(ZeroProcessor())
    with torch.no_grad():
        zeroed = model(vec["x"], vec["t"], y=vec["y"], clf_free=True)
    assert (zeroed - ref).abs().max() > 0.1


def test_per_module_processors_by_name():
    model, vec = hae_v2_model()
    model.eval()
    with torch.no_grad():
        ref = model(vec["x"], vec["t"], y=vec["y"], clf_free=True, null=True)
    hae_names = [n for n, m in model.attention_modules().items() if isinstance(m, MultiScaleSparseTransformer)]
    model.set_attn_processor({n: "fused" for n in hae_names})
    assert {model.attn_processors[n].name for n in hae_names} == {"fused"}
    assert model.attention_impl == "mixed"
    with torch.no_grad():
        out = model(vec["x"], vec["t"], y=vec["y"], clf_free=True, null=True)
    assert (out - ref).abs().max().item() <= tolerance(ref)


def test_cemb_mm_is_the_reference_processors_business():
    """Only the reference spatial processor materialises c cᵀ (in prepare, once per forward)."""
    cond = Conditioning(cemb=torch.randn(2, 8), all_cond=True)
    FusedAttentionProcessor().prepare(cond)
    assert cond._cemb_mm is None
    ReferenceAttentionProcessor().prepare(cond)
    assert torch.allclose(cond._cemb_mm, cond.cemb[:, :, None] * cond.cemb[:, None, :])
    model, vec = hae_v2_model()
    d = model.model_channels * 4
    for impl, expect_bdd in (("reference", True), ("fused", False)):
        model.set_attention_impl(impl)
        shapes = []
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: shapes.extend(tuple(a.shape) for a in i if isinstance(a, torch.Tensor)))
        try:
            with torch.no_grad():
                model(vec["x"], vec["t"], y=vec["y"], clf_free=True)
        finally:
            hook.remove()
        assert ((3, d, d) in shapes) == expect_bdd, impl  # encoder_kv's input is c cᵀ only in the reference


def test_clear_errors():
    model, _ = hae_v2_model()
    with pytest.raises(ValueError, match=r"attention_impl must be one of \['fused', 'reference'\], got 'flash'"):
        model.set_attention_impl("flash")
    with pytest.raises(ValueError, match="no attention module named \\['nope'\\]"):
        model.set_attn_processor({"nope": "fused"})
    with pytest.raises(TypeError, match="AttentionBlock needs a SpatialAttentionProcessor, got CountingMasked"):
        model.set_attn_processor({"middle_block.1": CountingMasked()})
    hae_name = next(n for n, m in model.attention_modules().items() if isinstance(m, MultiScaleSparseTransformer))
    with pytest.raises(ValueError, match="unknown attention processor 'flash' for MultiScaleSparseTransformer"):
        model.set_attn_processor({hae_name: "flash"})
    v2 = su.create_model(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,1,2", in_channels=4)
    with pytest.raises(TypeError, match="no attention module of this model accepts a CountingMasked"):
        v2.set_attn_processor(CountingMasked())
    assert model.attention_impl == "reference"  # nothing was changed by the failed calls


class CountingMasked(MaskedAttentionProcessor):
    def __call__(self, module, seq):
        return seq


def test_classifier_and_pool_take_processors():
    vec = load_vector("classifier")
    classifier = su.create_classifier(**vec["flags"])
    classifier.load_state_dict(vec["state_dict"])
    classifier.eval()
    assert any(isinstance(m, AttentionPool2d) for m in classifier.attention_modules().values())
    assert len(classifier.attn_processors) == 8  # 7 AttentionBlocks + the pool
    classifier.set_attention_impl("fused")
    assert classifier.attention_impl == "fused"
    with torch.no_grad():
        logits = classifier(vec["x"], vec["t"])
    assert (logits - vec["logits"]).abs().max().item() <= tolerance(vec["logits"])


def test_hae_designs_are_a_table_of_choices():
    assert {n: (d.per_patch_projection, d.bottleneck_mlp, d.concat_fusion) for n, d in HAE_DESIGNS.items()} == {
        "hae": (True, False, True), "hae_lite": (False, False, False), "hae_v2": (False, True, False)}
    assert hae_design("hae_v2") is HAE_DESIGNS["hae_v2"]
    with pytest.raises(ValueError, match="unknown HAE design 'hae_v3'"):
        hae_design("hae_v3")
    block = MultiScaleSparseTransformer(32, "hae", dropout=0.0)
    assert hasattr(block, "patch_projections") and not hasattr(block, "shared_patch_embed")
    assert MultiScaleSparseTransformer(32, "hae_v2", dropout=0.0).mlp.mlp[0].out_features == 8


@pytest.mark.parametrize("length_hw", [(8, 8), (24, 24)])  # 64+4+1 = 69 tokens (dense path), 576+36+9 = 621 (kernel)
def test_fused_hae_processor_inference_paths_equal_upstreams_call(length_hw, monkeypatch):
    """Without autograd the fused HAE processor runs short sequences through SDPA with the dense mask and long ones
    through the block-sparse kernel; both give nn.MultiheadAttention's masked output (upstream's call)."""
    from guided_diffusion.models import hae, sparse_attention

    torch.manual_seed(0)
    block = MultiScaleSparseTransformer(32, "hae_v2", dropout=0.1).eval()
    h, w = length_hw
    seq = block.tokens(torch.randn(3, 32, h, w))
    length = seq.shape[1]
    expected = block.multihead_attn(seq, seq, seq, attn_mask=block.mask(length, seq.device))[0]  # upstream
    used = []
    for name in ("dense_masked_sdpa", "multihead_self_attention"):
        real = getattr(hae, name)
        monkeypatch.setattr(hae, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    with torch.no_grad():
        got = hae.SparseMaskedAttentionProcessor()(block, seq)
        kernel = hae.SparseMaskedAttentionProcessor(dense_max_length=0)(block, seq)
    assert used == (["dense_masked_sdpa"] if length <= 512 else ["multihead_self_attention"]) + [
        "multihead_self_attention"]
    assert (got - expected).abs().max() < 1e-5 and (kernel - expected).abs().max() < 1e-5
    # with autograd the kernel always runs: nothing L×L is saved for backward
    used.clear()
    hae.SparseMaskedAttentionProcessor()(block, seq.requires_grad_())
    assert used == ["multihead_self_attention"]
    # the dense path bounds its temporary scores by splitting the batch (here one row per chunk)
    small = sparse_attention.dense_masked_sdpa(block.multihead_attn, seq.detach(), block.mask(length, "cpu"),
                                                       max_chunk_bytes=1)
    assert (small - expected).abs().max() < 1e-5


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_fused_hae_processor_on_cuda_is_masked_sdpa_equal_to_upstreams_call(grad, monkeypatch):
    """On a GPU the fused HAE processor runs the dense mask through SDPA (no block loop, no host sync), in training
    too, and gives nn.MultiheadAttention's masked output and input gradients (float32, no TF32)."""
    from guided_diffusion import runtime
    from guided_diffusion.models import hae

    torch.manual_seed(0)
    block = MultiScaleSparseTransformer(32, "hae_v2", dropout=0.0).cuda().eval()
    seq = block.tokens(torch.randn(3, 32, 24, 24, device="cuda")).detach().requires_grad_(grad)  # 621 tokens
    length = seq.shape[1]
    used = []
    for name in ("dense_masked_sdpa", "multihead_self_attention"):
        real = getattr(hae, name)
        monkeypatch.setattr(hae, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    with runtime.cuda_backends(tf32=False), torch.set_grad_enabled(grad):
        expected = block.multihead_attn(seq, seq, seq, attn_mask=block.mask(length, seq.device))[0]
        got = hae.SparseMaskedAttentionProcessor()(block, seq)
        assert used == ["dense_masked_sdpa"]
        assert (got - expected).abs().max() < 1e-5
        if grad:
            g_expected, = torch.autograd.grad(expected.square().sum(), seq)
            g_got, = torch.autograd.grad(got.square().sum(), seq)
            assert (g_got - g_expected).abs().max() < 1e-4 * g_expected.abs().max()


# --- gaps found by mutation testing (bench/mutation.py --module attention) ---


def _attention_written_out(qkv, heads, legacy, w=None, beta=None, cemb=None):
    """softmax(q·k / sqrt(c)) v per row and head, keys = [encoder keys of c cᵀ, spatial keys].

    Encoder tokens: the 1×1 conv (weight w [2C, D], bias beta) applied to c cᵀ, i.e. column j is
    c_j (w c) + beta; per head h its channels [2hc, 2hc + c) are keys and [2hc + c, 2(h+1)c) values.
    """
    b, width, t = qkv.shape
    c = width // (3 * heads)
    out = torch.zeros(b, heads * c, t, dtype=qkv.dtype)
    for i in range(b):
        if legacy:  # per head (q_h, k_h, v_h)
            per_head = qkv[i].reshape(heads, 3 * c, t)
            qs, ks, vs = per_head[:, :c], per_head[:, c : 2 * c], per_head[:, 2 * c :]
        else:  # q, k, v first, then heads
            qs, ks, vs = qkv[i].reshape(3, heads, c, t)
        for h in range(heads):
            k, v = ks[h], vs[h]
            if w is not None:
                ekv = torch.einsum("od,d,j->oj", w, cemb[i], cemb[i]) + beta[:, None]  # [2C, D]
                k = torch.cat([ekv[2 * h * c : 2 * h * c + c], k], dim=1)
                v = torch.cat([ekv[2 * h * c + c : 2 * (h + 1) * c], v], dim=1)
            p = torch.softmax(qs[h].T @ k / c**0.5, dim=-1)  # [T, keys]
            out[i, h * c : (h + 1) * c] = v @ p.T
    return out


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_equals_the_formula_in_both_channel_orders(legacy):
    from types import SimpleNamespace

    from guided_diffusion.models.attention import reference_attention

    torch.manual_seed(0)
    heads, c, t = 2, 4, 5
    qkv = torch.randn(3, 3 * heads * c, t)
    want = _attention_written_out(qkv, heads, legacy)
    if legacy:  # the default order
        torch.testing.assert_close(reference_attention(qkv, heads), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused_attention(qkv, heads), want, atol=1e-5, rtol=1e-5)
    module = SimpleNamespace(num_heads=heads, encoder_kv=None, legacy_order=legacy)
    for processor in (ReferenceAttentionProcessor(), FusedAttentionProcessor()):
        torch.testing.assert_close(processor(module, qkv, None), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("legacy", [True, False])
def test_conditional_keys_equal_the_formula_for_every_kind_of_conditioning(legacy):
    from types import SimpleNamespace

    torch.manual_seed(1)
    heads, c, t, d = 2, 4, 5, 6
    encoder_kv = torch.nn.Conv1d(d, 2 * heads * c, 1)
    module = SimpleNamespace(num_heads=heads, encoder_kv=encoder_kv, legacy_order=legacy)
    w, beta = encoder_kv.weight.detach()[:, :, 0], encoder_kv.bias.detach()
    qkv = torch.randn(3, 3 * heads * c, t)
    cemb = torch.randn(3, d)
    null = torch.tensor([False, True, False])
    cemb_null = cemb * (~null)[:, None]  # a null row's embedding is zero
    cases = [
        (Conditioning(cemb), cemb),  # nothing fixed statically, no per-row mask
        (Conditioning(cemb, all_cond=True), cemb),
        (Conditioning(cemb_null, null_rows=null), cemb_null),
        (Conditioning(torch.zeros(3, d), all_null=True), torch.zeros(3, d)),
    ]
    with torch.no_grad():
        for cond, rows in cases:
            want = _attention_written_out(qkv, heads, legacy, w, beta, rows)
            for processor in (ReferenceAttentionProcessor(), FusedAttentionProcessor()):
                torch.testing.assert_close(processor(module, qkv, cond), want, atol=1e-5, rtol=1e-5)
