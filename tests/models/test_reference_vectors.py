"""Upstream checkpoints load strictly and reproduce the recorded upstream outputs."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.script_util import create_model
from guided_diffusion.models.unet import HAEUNetModelV2Conservative

from conftest import VARIANTS_WITH_VECTORS, load_keys, load_vector, model_flags, tolerance

ALL_VARIANTS = ("v2", "hae", "hae_lite", "hae_v2", "hae_v2_conservative")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_production_keys_and_shapes(variant):
    # Conservative is HAE V2 computed differently: its checkpoint layout is HAE V2's.
    expected = load_keys("hae_v2" if variant == "hae_v2_conservative" else variant)
    flags = model_flags(expected["flags"], unet_ver=variant)
    with torch.device("meta"):
        model = create_model(**flags)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["param_count"]


@pytest.mark.parametrize("variant", VARIANTS_WITH_VECTORS + ("hae_v2_conservative",))
def test_reproduces_upstream_outputs(variant):
    vec = load_vector("hae_v2" if variant == "hae_v2_conservative" else variant)
    model = create_model(**model_flags(vec["flags"], unet_ver=variant))
    model.load_state_dict(vec["state_dict"], strict=True)
    model.eval()
    assert sum(p.numel() for p in model.parameters()) == vec["param_count"]
    for case in vec["cases"]:
        if model.use_hae:
            model.set_hae_masks(case["masks"])
            # the installed masks are used in the recorded order and at the recorded sizes
            blocks = model.hae_transformers()
            assert [tuple(m.shape) for m in case["masks"]] == [
                (s[0] * s[1] + sum((s[0] // p) * (s[1] // p) for p in (4, 8) if s[0] % p == 0 and s[1] % p == 0),) * 2
                for s in case["mask_spatial"]
            ]
            assert len(blocks) == len(case["masks"])
        with torch.no_grad():
            out = model(vec["x"], vec["t"], y=vec["y"], **case["kwargs"])
        err = (out - case["output"]).abs().max().item()
        assert err <= tolerance(case["output"]), f"{variant} {case['mode']}: max abs error {err}"


def test_masks_matter_for_the_reference_check():
    """Guard against a vacuous comparison: the built-in masks differ from the recorded ones."""
    vec = load_vector("hae_v2")
    model = create_model(**model_flags(vec["flags"]))
    model.load_state_dict(vec["state_dict"])
    model.eval()
    case = vec["cases"][0]
    with torch.no_grad():
        out = model(vec["x"], vec["t"], y=vec["y"], **case["kwargs"])
    assert (out - case["output"]).abs().max().item() > 100 * tolerance(case["output"])


def test_conservative_loads_hae_v2_checkpoint_both_ways():
    vec = load_vector("hae_v2")
    cons = create_model(**model_flags(vec["flags"], unet_ver="hae_v2_conservative"))
    assert isinstance(cons, HAEUNetModelV2Conservative)
    cons.load_state_dict(vec["state_dict"], strict=True)
    v2 = create_model(**model_flags(vec["flags"]))
    v2.load_state_dict(cons.state_dict(), strict=True)
