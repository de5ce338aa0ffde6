"""Every default that follows the image size, checked at two sizes (32 and 128 px) against its rule written out.

Found by grepping ``image_size`` outside models/ and diffusion/:
- the component filter's size (``methods/postprocess.default_component_size``, the flags' ``--cc_filter_size -1``);
- the UNet's default ``channel_mult`` (``script_util.DEFAULT_CHANNEL_MULT``, guided-diffusion's table) and the
  feature-map size at its bottleneck;
- ``attention_resolutions`` (feature-map sizes in pixels) -> downsample factors, and where attention then runs;
- the classifier's ``channel_mult`` (always the table's) and its attention pool's positional embedding;
- the training preview grid (``--sample_shape`` default N C H W);
- the HAE blocks' feature maps and their regional tokens (patch sizes 4 and 8 where they divide the map);
- the preprocessed data folder name; the synthetic data's voxel size (from the volume shape, not image_size).
Not derived from the image size: the median window (upstream's 5 px at any size) and the quickstart's
CHANNEL_MULT / ATTENTION / MEDIAN_KERNEL (constants for its IMAGE_SIZE=32; config/run_quickstart.sh says so).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.data.preprocess import default_output_dir
from guided_diffusion.methods.postprocess import component_size, default_component_size
from guided_diffusion.models.classifier import AttentionPool2d
from guided_diffusion.models.hae import MultiScaleSparseTransformer
from guided_diffusion.models.unet import AttentionBlock

SIZES = (32, 128)
# guided-diffusion's create_model / create_classifier table (written out here, not read from the code)
UPSTREAM_CHANNEL_MULT = {32: (1, 2, 2, 2), 128: (1, 1, 2, 3, 4)}


def test_component_filter_size_scales_with_the_image_area(tmp_path):
    # upstream: 40 px at 128 px; 40 * (32/128)^2 = 2.5, which Python's round() takes to the even 2
    expected = {32: 2, 128: 40}
    for size in SIZES:
        assert default_component_size(size) == expected[size]
        assert component_size(-1, size) == expected[size] and component_size(7, size) == 7
    assert default_component_size(64) == 10 and default_component_size(256) == 160
    # the evaluation flag --cc_filter_size -1 resolves to it at each --image_size
    from guided_diffusion.commands import evaluate

    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    for size in SIZES:
        settings, _ = evaluate.parse(
            ["--data_dir", str(tmp_path / "data"), "--model_dir", str(tmp_path / "model"), "--w", "2",
             "--image_size", str(size), "--in_channels", "4", "--num_classes", "2"])
        assert settings.inference.component_size == expected[size]


def _attention_inputs(model: torch.nn.Module, kind: type) -> list:
    seen = []
    for m in model.modules():
        if isinstance(m, kind):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[2:])))
    return seen


@pytest.mark.parametrize("size", SIZES)
def test_default_channel_mult_bottleneck_and_attention_resolutions(size):
    mult = UPSTREAM_CHANNEL_MULT[size]
    assert su.parse_channel_mult("", size) == mult
    # attention_resolutions are feature-map sizes in pixels: downsample factor = image_size // r
    assert su.parse_attention_resolutions("16,8", size) == (size // 16, size // 8)
    torch.manual_seed(0)
    model = su.create_model(image_size=size, num_channels=32, num_res_blocks=1, channel_mult="",
                            attention_resolutions="16,8", in_channels=1, unet_ver="v1").eval()
    attention = _attention_inputs(model, AttentionBlock)
    bottleneck = []
    model.middle_block.register_forward_hook(lambda mod, inp, out: bottleneck.append(tuple(out.shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size), torch.tensor([10]))
    assert out.shape == (1, 1, size, size)
    side = size // 2 ** (len(mult) - 1)  # one downsampling between consecutive levels
    assert bottleneck == [(1, 32 * mult[-1], side, side)]
    assert set(attention) == {(16, 16), (8, 8), (side, side)}  # the same maps at both sizes, plus the middle block's


@pytest.mark.parametrize("size", SIZES)
def test_classifier_follows_the_image_size(size):
    mult = UPSTREAM_CHANNEL_MULT[size]
    torch.manual_seed(0)
    clf = su.create_classifier(image_size=size, classifier_width=64, classifier_depth=1, in_channels=1).eval()
    pool = next(m for m in clf.modules() if isinstance(m, AttentionPool2d))
    side = size // 2 ** (len(mult) - 1)
    assert pool.positional_embedding.shape == (64 * mult[-1], side * side + 1)  # the final map plus its mean token
    attention = _attention_inputs(clf, AttentionBlock)
    with torch.no_grad():
        logits = clf(torch.randn(1, 1, size, size), torch.tensor([10]))
    assert logits.shape == (1, 2)
    # classifier_attention_resolutions "32,16,8": every one of those maps the encoder has, plus the middle block's
    assert set(attention) == {(r, r) for r in (32, 16, 8) if r <= size} | {(side, side)}


@pytest.mark.parametrize("size", SIZES)
def test_training_preview_shape_follows_the_image_size(tmp_path, size):
    from guided_diffusion.commands import train

    settings, _ = train.parse(["--data_dir", str(tmp_path), "--in_channels", "4", "--image_size", str(size)])
    assert settings.sample_shape == [12, 4, size, size]


@pytest.mark.parametrize("size", SIZES)
def test_hae_blocks_feature_maps_and_regional_tokens(size, monkeypatch):
    """One HAE block before each decoder upsampling: maps size / 2^k for k = 1 .. levels - 1. Each block attends
    over h*w pixel tokens plus (h/p)*(w/p) regional tokens for every patch size p in (4, 8) dividing h and w."""
    seen = []

    def record(self, x):
        h, w = x.shape[2:]
        seen.append((h, self.tokens(x).shape[1]))
        return x

    monkeypatch.setattr(MultiScaleSparseTransformer, "forward", record)
    torch.manual_seed(0)
    model = su.create_model(image_size=size, num_channels=32, num_res_blocks=1, channel_mult="",
                            attention_resolutions="16,8", in_channels=1, num_classes=2, class_cond=True,
                            unet_ver="hae_v2", use_hae=True).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, size, size), torch.tensor([10]), y=torch.tensor([0]), clf_free=True)
    levels = len(UPSTREAM_CHANNEL_MULT[size])
    maps = [size // 2 ** k for k in range(levels - 1, 0, -1)]  # decoder order: coarsest first
    assert [h for h, _ in seen] == maps
    for h, length in seen:
        assert length == h * h + sum((h // p) ** 2 for p in (4, 8) if h % p == 0), h
    if size == 128:  # the production maps: 8, 16, 32, 64 px -> 69, 276, 1104, 4416 tokens
        assert [n for _, n in seen] == [69, 276, 1104, 4416]


def test_preprocessed_folder_name_and_synthetic_voxel_size(tmp_path):
    for size in SIZES:
        assert default_output_dir(tmp_path / "BraTS21", "all", 0, 0, size) == \
            Path(tmp_path / f"preprocessed_data_all_00_{size}").absolute()
    pytest.importorskip("nilearn")
    import numpy as np

    from guided_diffusion.data import synthetic

    # smaller synthetic volumes cover the same 240-mm field of view: voxel size 240 / X mm
    for shape, mm in (((48, 48, 31), 5.0), ((120, 120, 78), 2.0)):
        tissue, spacing = synthetic.warp_templates(np.random.default_rng(0), shape)
        assert spacing == mm and tuple(tissue.shape[1:]) == shape


def test_image_sizes_without_a_default_are_named():
    with pytest.raises(ValueError, match="no default channel_mult for image_size 96"):
        su.parse_channel_mult("", 96)
    with pytest.raises(ValueError, match="image_size 96 is not one of"):
        su.create_classifier(image_size=96)
