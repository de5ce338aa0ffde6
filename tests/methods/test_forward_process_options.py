"""How ForwardProcess runs the model (rows per call, channels_last, torch.compile) changes speed, never results.

Each option is compared with the plain reference run (all 2B rows of a step in one call, default memory format,
eager) on the same small models, weights, slices and noise: the per-step statistics and maps must agree to float
precision.
"""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.methods import anofpdm as af
from guided_diffusion.models.hae import hae_mask
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def small_model(unet_ver: str):
    flags = dict(model_and_diffusion_defaults(), image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 in_channels=4, attention_resolutions="16,8", class_cond=True, num_classes=2, unet_ver=unet_ver,
                 use_hae=unet_ver != "v2")
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero weights everywhere (the zero-initialised output convolutions included)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model.eval(), diffusion


def run(model, diffusion, cfg, **options) -> af.ForwardResult:
    x0 = torch.rand(3, 4, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return af.ForwardProcess(model, diffusion, cfg, **options).run(x0, generator=torch.Generator().manual_seed(3))


def assert_same_results(a: af.ForwardResult, b: af.ForwardResult) -> None:
    for key in ("mse_guided", "mse_unguided", "divergence", "sam_mean"):
        ref, got = getattr(a.stats, key), getattr(b.stats, key)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(b.maps, a.maps, rtol=1e-4, atol=1e-5 * a.maps.abs().max().item())
    assert torch.equal(b.end_step, a.end_step)


@pytest.mark.parametrize("unet_ver", ["v2", "hae_v2_conservative"])
@pytest.mark.parametrize("legacy", [False, True], ids=["default", "upstream_flags"])
def test_rows_per_call_and_channels_last_change_nothing(unet_ver, legacy):
    model, diffusion = small_model(unet_ver)
    cfg = af.ForwardConfig(w=2.0, forward_steps=2, modality=[0, 3], ugp_mode="upstream" if legacy else "null",
                           legacy_ddim_encoding=legacy)
    reference = run(model, diffusion, cfg, max_rows=0)
    for options in (dict(max_rows=1), dict(max_rows=2, channels_last=True)):
        assert_same_results(reference, run(model, diffusion, cfg, **options))


def test_rows_per_call_follow_the_device_and_the_feature_maps():
    model, diffusion = small_model("v2")
    cfg = af.ForwardConfig(w=2.0, forward_steps=1)
    x = torch.zeros(100, 4, 32, 32)
    # on a CPU: calls of at most cpu_call_elements elements of the first-level feature map (32 channels × 32 × 32)
    assert af.ForwardProcess(model, diffusion, cfg).rows_per_call(x) == af.ForwardProcess.cpu_call_elements // (32 * 32 * 32)
    assert af.ForwardProcess(model, diffusion, cfg).rows_per_call(torch.zeros(1, 4, 4096, 4096)) == 1
    assert af.ForwardProcess(model, diffusion, cfg, max_rows=0).rows_per_call(x) is None  # one call of 2B rows
    assert af.ForwardProcess(model, diffusion, cfg, max_rows=7).rows_per_call(x) == 7
    with pytest.raises(ValueError, match="max_rows"):
        af.ForwardProcess(model, diffusion, cfg, max_rows=-1)


def test_compile_option_traces_a_fresh_hae_model_into_whole_graphs(monkeypatch):
    """A fresh HAE model compiles without graph breaks: its masks are built at construction, not in the forward.

    ``fullgraph=True`` turns any graph break into an error; the eager backend keeps the test fast (dynamo traces the
    model exactly as for inductor, which would spend minutes generating code on a CPU)."""
    model, diffusion = small_model("hae_v2_conservative")
    real_compile = torch.compile
    compiled = []

    def strict_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", strict_compile)
    torch._dynamo.reset()
    cfg = af.ForwardConfig(w=2.0, forward_steps=2, modality=[0, 3])
    try:
        out = run(model, diffusion, cfg, compile=True)
    finally:
        torch._dynamo.reset()
    assert compiled == [model]
    assert_same_results(run(model, diffusion, cfg), out)


def test_hae_masks_are_built_at_construction_and_move_with_the_model():
    model, _ = small_model("hae_v2_conservative")
    blocks = model.hae_transformers()
    # 32 px model, channel_mult 1,2: one HAE block, before the 16 -> 32 upsampling: 16×16 pixels + 4×4 + 2×2 patches
    assert len(blocks) == 1 and blocks[0].builtin_mask.shape == (276, 276)
    assert blocks[0].sequence_length(16, 16) == 256 + 16 + 4 and blocks[0].sequence_length(12, 12) == 144 + 9
    assert blocks[0].mask(276, torch.device("cpu")) is blocks[0].builtin_mask
    assert "builtin_mask" not in "".join(model.state_dict())  # checkpoints keep upstream's keys
    assert torch.equal(blocks[0].builtin_mask, hae_mask(276, blocks[0].mask_seed))
