"""Construction from flags: dispatch, derived settings, clear errors for bad configuration."""

from __future__ import annotations

import argparse

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.models.unet import HAEUNetModelV2, HAEUNetModelV2Conservative, UNetModel

SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,1,2", attention_resolutions="16,8",
             in_channels=4, class_cond=True, num_heads=4)


def small(**kw):
    return su.create_model(**{**SMALL, **kw})


def test_dispatch_on_unet_ver():
    assert type(small(unet_ver="v2")) is UNetModel
    assert type(small(unet_ver="hae_v2", use_hae=True)) is HAEUNetModelV2
    assert type(small(unet_ver="hae_v2_conservative", use_hae=True)) is HAEUNetModelV2Conservative


def test_unknown_unet_ver_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown unet_ver 'v3'.*hae_v2_conservative"):
        small(unet_ver="v3")


def test_channel_mult_and_attention_resolutions():
    assert su.parse_channel_mult("", 128) == (1, 1, 2, 3, 4)
    assert su.parse_channel_mult("1,2,2", 77) == (1, 2, 2)
    with pytest.raises(ValueError, match="no default channel_mult for image_size 96"):
        su.parse_channel_mult("", 96)
    with pytest.raises(ValueError, match="channel_mult must be comma-separated integers"):
        su.parse_channel_mult("1,x", 64)
    assert su.parse_attention_resolutions("32,16,8", 128) == (4, 8, 16)
    model = small(unet_ver="v2")
    assert model.attention_resolutions == (2, 4)
    assert model.channel_mult == (1, 1, 1, 2)


def test_out_channels_rule():
    assert su.out_channels_for(4, False) == 4 and su.out_channels_for(4, True) == 8
    assert su.out_channels_for(1, False) == 1 and su.out_channels_for(2, False) == 3
    assert small(learn_sigma=True).out_channels == 8


def test_hae_needs_use_hae_flag_like_upstream():
    assert not small(unet_ver="hae_v2").hae_transformers()  # defaults: use_hae False
    assert len(small(unet_ver="hae_v2", use_hae=True).hae_transformers()) == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_channels=48), "multiples of 32"),
        (dict(num_heads=3), "not divisible by num_heads"),
        (dict(num_head_channels=24), "not divisible by num_head_channels"),
        (dict(image_size=36), "not divisible by 2"),
        (dict(use_fp16=True), "torch.autocast"),
        (dict(class_cond=True, clf_free=False), "clf_free=True"),
        (dict(class_cond=True, num_classes=0), "num_classes"),
    ],
)
def test_bad_configuration_is_a_clear_error(flags, message):
    with pytest.raises(ValueError, match=message):
        small(**flags)


def test_bad_calls_are_clear_errors():
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 1])
    cond_model = small()
    uncond_model = small(class_cond=False)
    with pytest.raises(ValueError, match="unconditional model"):
        uncond_model(x, t, y=y)
    with pytest.raises(ValueError, match="needs labels y"):
        cond_model(x, t, clf_free=True)
    with pytest.raises(ValueError, match="invalid condition setup"):
        cond_model(x, t, y=y)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        cond_model(x, t, y=y, threshold=1.5)
    with pytest.raises(ValueError, match="per-row null mask has 3 entries"):
        cond_model(x, t, y=y, clf_free=True, null=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="set_hae_masks got 1 masks for 3 HAE blocks"):
        small(unet_ver="hae_v2", use_hae=True).set_hae_masks([torch.zeros(4, 4, dtype=torch.bool)])


def test_odd_image_sizes_do_not_crash():
    """Maps whose sides are not multiples of the patch sizes just skip those scales."""
    model = su.create_model(image_size=48, num_channels=32, num_res_blocks=1, channel_mult="1,1,2",
                            attention_resolutions="12", in_channels=1, class_cond=True,
                            unet_ver="hae_v2_conservative", use_hae=True)
    out = model(torch.randn(1, 1, 48, 48), torch.tensor([5]), y=torch.tensor([1]), clf_free=True)
    assert out.shape == (1, 1, 48, 48) and torch.isfinite(out).all()


def test_create_model_and_diffusion_and_argparser():
    defaults = su.model_and_diffusion_defaults()
    for key in ("unet_ver", "use_hae", "bottleneck_ratio", "memory_optimization", "zero_threshold"):
        assert key in defaults
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--use_hae", "True", "--unet_ver", "hae_v2_conservative", "--image_size", "32",
                              "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,1,1,2",
                              "--in_channels", "4", "--class_cond", "true", "--diffusion_steps", "50",
                              "--timestep_respacing", "10"])
    model, diffusion = su.create_model_and_diffusion(**su.args_to_dict(args, defaults.keys()))
    assert isinstance(model, HAEUNetModelV2Conservative) and model.use_hae
    assert diffusion.num_timesteps == 10
    with pytest.raises(TypeError, match="unknown model/diffusion flags"):
        su.create_model_and_diffusion(bogus=1)
    with pytest.raises(argparse.ArgumentTypeError):
        su.str2bool("maybe")
