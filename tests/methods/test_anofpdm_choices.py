"""AnoFPDM decisions pinned by hand-built cases: what is classified, the tie rule, the component filter."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.methods import anofpdm as af
from guided_diffusion.methods import postprocess
from guided_diffusion.script_util import create_gaussian_diffusion


def _stats(mse_guided, mse_unguided, sam_mean, divergence=None):
    g = torch.as_tensor(mse_guided, dtype=torch.float32)
    div = torch.ones_like(g) if divergence is None else torch.as_tensor(divergence, dtype=torch.float32)
    return af.StepStats(mse_guided=g, mse_unguided=torch.as_tensor(mse_unguided, dtype=torch.float32),
                        divergence=div, sam_mean=torch.as_tensor(sam_mean, dtype=torch.float32))


def _result(stats, h=8):
    b, _, m = stats.mse_guided.shape
    return af.ForwardResult(stats=stats, maps=torch.zeros(b, m, h, h), end_step=torch.zeros(b, m, dtype=torch.long))


# ------------------------------------------------------------------ classification uses the guided MSE


def test_classification_uses_the_guided_mse_not_the_map_statistic():
    """Upstream classifies on cos_t(mean MSE_w, mean MSE_∅) whatever the sub-anomaly map (validation fits thr_01
    on that same quantity). Slice 0: MSE_w proportional to MSE_∅ (cos 1) but a map statistic orthogonal to it;
    slice 1 the other way round."""
    up = [1.0, 2.0, 3.0, 4.0]
    ortho = [4.0, -2.0, 0.0, 0.0]  # orthogonal to `up`: 4 - 4 = 0
    mse_u = torch.tensor([up, up])[..., None]
    mse_g = torch.tensor([[2 * v for v in up], ortho])[..., None]
    sam = torch.tensor([ortho, [2 * v for v in up]])[..., None]
    stats = _stats(mse_g, mse_u, sam)
    sim = af.classification_similarity(stats)
    assert sim.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    for mode in af.SUB_ANOMALY_MODES:
        cfg = af.ForwardConfig(w=2.0, forward_steps=4, modality=[0], sub_anomaly=mode)
        out = af.segment_batch(_result(stats), af.Hyperparams(thr_01=0.5, diff_max=[1.0]), cfg)
        assert out["pred_label"].tolist() == [0, 1], mode
    # validation fits thr_01 on the same similarity
    hp = af.fit_hyperparams(stats, torch.tensor([0, 1]))
    assert hp.n_errors == 0


class _LesionOracle(torch.nn.Module):
    """eps that maps x_t to x0 (null rows) or to x0 minus a lesion scaled by s(t) (healthy rows), both off by
    the same small step-dependent error, as a real model would be."""

    def __init__(self, diffusion, x0, lesion, strength):
        super().__init__()
        self.abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)
        self.x0, self.lesion, self.strength = x0, lesion, strength

    def forward(self, x, t, y=None, null=False, clf_free=False, threshold=-1):
        reps = x.shape[0] // self.x0.shape[0]
        x0 = self.x0.repeat(reps, 1, 1, 1)
        healthy = x0 - self.lesion.repeat(reps, 1, 1, 1) * self.strength[t][:, None, None, None]
        target = torch.where(torch.as_tensor(null).expand(x.shape[0])[:, None, None, None], x0, healthy)
        target = target + 0.01 * (1 + t[:, None, None, None]) * torch.cos(torch.arange(x.shape[-1]) * 1.7)
        a = self.abar[t][:, None, None, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()


def test_map_mode_changes_the_maps_but_not_the_classification():
    diffusion = create_gaussian_diffusion(steps=50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 0.8 - 0.4
    lesion = torch.zeros(3, 1, 8, 8)
    lesion[0, :, 2:5, 2:5] = 0.2
    lesion[1, :, 1:7, 1:7] = 0.05
    strength = torch.zeros(50)
    strength[:5] = torch.tensor([0.1, 0.4, 1.0, 0.7, 0.2])
    out = {}
    for mode in af.SUB_ANOMALY_MODES:
        cfg = af.ForwardConfig(w=2.0, forward_steps=5, modality=[0], sub_anomaly=mode)
        res = af.ForwardProcess(_LesionOracle(diffusion, x0, lesion, strength), diffusion, cfg).run(
            x0, generator=torch.Generator().manual_seed(1))
        out[mode] = (res, af.segment_batch(res, af.Hyperparams(thr_01=0.99, diff_max=[1.0]), cfg))
    ref_res, ref_seg = out["input"]
    for mode in ("gradient", "gradient_para"):
        res, seg = out[mode]
        assert not torch.allclose(res.stats.sam_mean, ref_res.stats.sam_mean)  # the maps do differ
        torch.testing.assert_close(seg["similarity"], ref_seg["similarity"], rtol=0, atol=0)
        assert torch.equal(seg["pred_label"], ref_seg["pred_label"])


# ------------------------------------------------------------------ the tie rule


def test_classification_tie_counts_as_unhealthy():
    """Upstream: ``if sim <= thr_01: unhealthy``. The similarity of [1, 0] and [1, 1] is 1/sqrt(2)."""
    stats = _stats([[[1.0], [0.0]]], [[[1.0], [1.0]]], [[[1.0], [0.0]]])
    sim = af.classification_similarity(stats)
    assert sim.item() == pytest.approx(1 / math.sqrt(2), abs=1e-7)
    tie = float(sim.item())  # exactly the float32 similarity
    below = float(np.nextafter(np.float32(tie), np.float32(-1)))
    cfg = af.ForwardConfig(w=2.0, forward_steps=2, modality=[0])
    labels = {}
    for name, thr in (("tie", tie), ("below", below)):
        out = af.segment_batch(_result(stats), af.Hyperparams(thr_01=thr, diff_max=[1.0]), cfg)
        labels[name] = out["pred_label"].item()
    assert labels == {"tie": 1, "below": 0}
    assert af.classify(torch.tensor([0.5, 0.5 + 2**-20, 0.5 - 2**-20]), 0.5).tolist() == [1, 0, 1]


def test_validation_error_count_treats_a_tie_as_correct_for_both_labels():
    """Upstream's error count is #(unhealthy > thr) + #(healthy < thr): a slice exactly at thr is no error."""
    sim = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    thr, n_err = af.select_classification_threshold(sim, labels)
    assert thr == 0.9 and n_err == 0


# ------------------------------------------------------------------ the component filter counts pixels


def test_component_filter_counts_pixels_like_upstream_ring():
    """An 11x11 square outline is 40 px around an 81-px hole: upstream (skimage ``filled_area`` on a [1, H, W]
    volume, where no hole can be enclosed) removes it at 40; a 44-px 12x12 outline is kept."""
    m = np.zeros((2, 1, 32, 32), bool)
    m[0, 0, 2:13, 2:13] = True
    m[0, 0, 3:12, 3:12] = False
    assert m[0].sum() == 40 and (~m[0, 0, 2:13, 2:13]).sum() == 81
    m[1, 0, 10:22, 10:22] = True
    m[1, 0, 11:21, 11:21] = False
    assert m[1].sum() == 44
    out = postprocess.remove_small_components(m, 40)
    assert out[0].sum() == 0
    assert np.array_equal(out[1], m[1])
    # one pixel more makes the first ring survive
    m[0, 0, 7, 7] = True  # inside the hole, a separate 1-px component: removed
    m[0, 0, 1, 2] = True  # touching the ring: 41 px
    out = postprocess.remove_small_components(m, 40)
    assert out[0].sum() == 41 and not out[0, 0, 7, 7]


def test_component_filter_in_segment_batch_uses_the_pixel_count():
    """segment_batch applies the same rule: a 40-px ring that is over the threshold is removed from the mask."""
    h = 32
    maps = torch.zeros(1, 1, h, h)
    maps[0, 0, 2:13, 2:13] = 1.0
    maps[0, 0, 3:12, 3:12] = 0.0
    # M_t = 0 gives the quantile b = 0.98: position 0.98 * 1023 lies among the 40 ones at the top
    stats = _stats([[[1.0], [2.0]]], [[[1.0], [2.0]]], [[[1.0], [2.0]]], divergence=[[[0.0], [0.0]]])
    res = af.ForwardResult(stats=stats, maps=maps, end_step=torch.ones(1, 1, dtype=torch.long))
    cfg = af.ForwardConfig(w=2.0, forward_steps=2, modality=[0])
    hyper = af.Hyperparams(thr_01=0.5, diff_max=[1.0])
    kept = af.segment_batch(res, hyper, cfg, median_kernel=1, cc_max_size=0)["mask"]
    assert kept.sum() == 40
    removed = af.segment_batch(res, hyper, cfg, median_kernel=1, cc_max_size=40)["mask"]
    assert removed.sum() == 0


# ------------------------------------------------------------------ upstream's recorded fallback values


def test_recorded_fallback_refused_for_another_function():
    default = af.ForwardConfig(w=2.0, forward_steps=600)  # the project's default function: null UGP
    with pytest.raises(ValueError) as err:
        af.upstream_fallback_hyperparams("brats", 600, 2, default)
    msg = str(err.value)
    assert "--ugp_mode upstream" in msg and "--legacy_ddim_encoding True" in msg and "--hyperparams_file" in msg
    assert "--w 2" not in msg and "--null True" not in msg  # those already match
    upstream = af.ForwardConfig(w=2.0, forward_steps=600, ugp_mode="upstream", legacy_ddim_encoding=True)
    hp = af.upstream_fallback_hyperparams("brats", 600, 2, upstream)
    assert (hp.thr_01, hp.diff_max) == (0.99487984, [0.0509, 0.0397])
    for wrong, flag in ((dict(w=3.0), "--w 2"), (dict(encode_null=False), "--null True"),
                        (dict(ddim=False), "--d_reverse True")):
        cfg = af.ForwardConfig(**{**vars(upstream), **wrong})
        with pytest.raises(ValueError, match=flag.replace("-", "\\-")):
            af.upstream_fallback_hyperparams("brats", 600, 2, cfg)
    # ATLAS was recorded at w = 20 (the paper selects 30)
    atlas = af.ForwardConfig(w=30.0, forward_steps=600, modality=[0], ugp_mode="upstream", legacy_ddim_encoding=True)
    with pytest.raises(ValueError, match="\\-\\-w 20"):
        af.upstream_fallback_hyperparams("atlas", 600, 1, atlas)
    atlas.w = 20.0
    assert af.upstream_fallback_hyperparams("atlas", 600, 1, atlas).thr_01 == 0.72853965


# ------------------------------------------------------------------ flags -> method (gaps found by mutation testing)


def _inference(*argv):
    """AnoFPDM's settings from command-line flags (a tiny v2 model for a folder without config.json)."""
    from guided_diffusion.commands import evaluate
    from guided_diffusion.methods.settings import inference_from_flags

    values = vars(evaluate.create_parser().parse_args(["--w", "2", "--image_size", "32", "--in_channels", "4",
                                                       *argv]))
    return inference_from_flags(values, set(), method="anofpdm", dataset=values["name"])


def _forward_config(*argv):
    s = _inference(*argv)
    return af.forward_config(s.options, s.maps.modality)


def _built(monkeypatch, *argv):
    """AnoFPDM built from the flags, its model loading replaced by an identity model."""
    from guided_diffusion.loading import ModelSource

    monkeypatch.setattr(ModelSource, "load", lambda self, device, warn=None: (torch.nn.Identity(), None, "m.pt"))
    return af.AnoFPDM.build(_inference(*argv), torch.device("cpu"))


def test_flags_give_the_forward_config():
    cfg = _forward_config("--forward_steps", "10", "--modality", "3", "0", "--subset_interval", "0",
                          "--use_gradient_para_sam", "True")
    assert (cfg.modality, cfg.sub_anomaly, cfg.interval, cfg.forward_steps) == ([3, 0], "gradient_para", 1, 10)
    assert _forward_config("--use_gradient_sam", "True").sub_anomaly == "gradient"
    assert _forward_config().sub_anomaly == "input"
    assert _forward_config("--subset_interval", "3").interval == 3
    assert _forward_config("--subset_interval", "-1").interval == 1  # upstream: every step


@pytest.mark.parametrize("image_size, flag, want", [(128, -1, 40), (64, -1, 10), (256, -1, 160), (64, 0, 0),
                                                     (64, 7, 7)])
def test_component_filter_size_scales_with_the_image_area(monkeypatch, image_size, flag, want):
    # upstream's 40 px at 128 x 128, scaled by the pixel count (40 (s / 128)^2); 0 switches the filter off

    assert _built(monkeypatch, "--image_size", str(image_size), "--cc_filter_size", str(flag)).cc_max_size == want


@pytest.mark.parametrize("a, b", [(0.5, 1.5), (-0.1, 0.9), (0.9, 0.5)])
def test_quantiles_outside_zero_one_or_reversed_are_refused(a, b):
    with pytest.raises(ValueError, match="quantile_a"):
        _inference("--forward_steps", "10", "--quantile_a", str(a), "--quantile_b", str(b))


def test_recorded_fallback_carries_upstream_diff_min():
    # upstream scripts/translation_FPDM.py, --num_batches_val 0, brats, forward steps 600 and 999; atlas
    hp = af.upstream_fallback_hyperparams("brats", 600, 2)
    assert hp.diff_min == pytest.approx([5.5484e-05, 3.4732e-05])
    assert af.upstream_fallback_hyperparams("brats", 999, 2).diff_min == pytest.approx([0.0022, 0.0010])
    assert af.upstream_fallback_hyperparams("atlas", 600, 1).diff_min == pytest.approx([0.0392])


def test_fit_hyperparams_divergence_range_and_accuracy_hand_computed():
    # 4 validation slices, 2 steps, 1 modality; unhealthy slices 1 and 2 with max_t M_t 0.7 and 0.3
    up = [[1.0], [2.0]]
    mse_u = torch.tensor([up] * 4)
    # similarity 1 for slices 0, 1 (guided ∝ unguided), 0 for slices 2, 3 (orthogonal in the step axis)
    mse_g = torch.tensor([up, up, [[2.0], [-1.0]], [[2.0], [-1.0]]])
    div = torch.tensor([[[0.9], [0.1]], [[0.2], [0.7]], [[0.3], [0.1]], [[0.5], [0.6]]])
    labels = torch.tensor([0, 1, 1, 0])
    hp = af.fit_hyperparams(_stats(mse_g, mse_u, mse_u, div), labels)
    assert hp.diff_max == pytest.approx([0.7]) and hp.diff_min == pytest.approx([0.3])
    # the two classes overlap in similarity (slice 1 unhealthy at 1, slice 3 healthy at 0): some errors remain
    assert (hp.n_val, hp.n_val_unhealthy) == (4, 2)
    assert hp.val_accuracy == pytest.approx(1 - hp.n_errors / 4)
    assert 0 < hp.n_errors < 4


@pytest.mark.parametrize("last_only, include_end, want", [(False, False, (0 + 1 + 2 + 3 + 4 + 5) / 6),
                                                          (True, False, 5.0), (True, True, 6.0)])
def test_t_e_ratio_variant_follows_the_aggregation_flags(last_only, include_end, want):
    # one slice, 8 steps, 1 modality; step s's sub-anomaly map is the constant s, so the aggregated map's value
    # says which steps entered. M_t peaks at step 4: t_e = 4, x 1.5 -> 6; window [0, 6), last only: step 5
    # (step 6 with include_end).
    steps, h = 8, 6
    div = torch.zeros(1, steps, 1)
    div[0, 4, 0] = 1.0
    ones = torch.ones(1, steps, 1)
    stats = _stats(ones, ones, ones, div)
    sam = torch.arange(steps, dtype=torch.float32).view(1, steps, 1, 1, 1).expand(1, steps, 1, h, h).clone()
    res = af.ForwardResult(stats=stats, maps=torch.zeros(1, 1, h, h), end_step=torch.tensor([[4]]),
                           sub_anomaly_maps=sam)
    cfg = af.ForwardConfig(w=2.0, forward_steps=steps, modality=[0], last_only=last_only, include_end=include_end,
                           store_maps=True)
    hp = af.Hyperparams(thr_01=0.5, diff_max=[1.0], diff_min=[0.0])
    out = af.segment_batch(res, hp, cfg, t_e_ratio=1.5, median_kernel=1, cc_max_size=0)
    assert out["end_step"].tolist() == [[6]]
    torch.testing.assert_close(out["anomaly_map"], torch.full((1, 1, h, h), want))


def _process(**cfg):
    diffusion = create_gaussian_diffusion(steps=50)
    return af.ForwardProcess(None, diffusion, af.ForwardConfig(w=2.0, forward_steps=10, modality=[0], **cfg)), diffusion


def test_defaults_encode_with_the_null_embedding_and_one_step_is_valid():
    assert _forward_config().encode_null is True  # paper; upstream's False crashed
    af.ForwardConfig(w=2.0, forward_steps=1, modality=[0]).validate()
    with pytest.raises(ValueError, match="forward_steps"):
        af.ForwardConfig(w=2.0, forward_steps=0, modality=[0]).validate()


def test_predicted_x0_is_the_formula_clipped_to_the_data_range():
    process, diffusion = _process()
    t = torch.tensor([5, 30])
    x = torch.tensor([0.5, -0.2]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    eps = torch.tensor([[-3.0, 0.1], [2.5, 0.0]]).view(2, 1, 1, 2).expand(2, 1, 2, 2).clone()
    abar = torch.as_tensor(np.asarray(diffusion.alphas_cumprod), dtype=torch.float64)[t].view(2, 1, 1, 1)
    x0 = (x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()  # x = sqrt(abar) x0 + sqrt(1 - abar) eps
    assert x0.max() > 1 and x0.min() < -1  # both bounds matter here
    torch.testing.assert_close(process._xstart(x, t, eps).double(), x0.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    unclipped, _ = _process(clip_denoised=False)
    torch.testing.assert_close(unclipped._xstart(x, t, eps).double(), x0, rtol=1e-5, atol=1e-5)
    # the inversion step clips the same way (its x̂0 is out of range here, so clipping changes the step)
    clipped_step = process._inversion_step(x, t, eps)
    torch.testing.assert_close(clipped_step, diffusion.ddim_reverse_step_from_eps(x, t, eps, clip_denoised=True))
    assert not torch.allclose(clipped_step, diffusion.ddim_reverse_step_from_eps(x, t, eps, clip_denoised=False))


@pytest.mark.parametrize("mode", ["input", "gradient_para", "gradient"])
def test_sub_anomaly_maps_are_the_paper_formulas(mode):
    # input: (x̂0_w - x0)^2; gradient_para: (x̂0_w - x̂0_∅)^2; gradient: that divided by (b_t (1 + w))^2 with
    # b_t = (1 - abar_t) / sqrt(abar_t) (the guidance term's scale in x̂0 space)
    process, diffusion = _process(sub_anomaly=mode)
    torch.manual_seed(0)
    x0g, x0u, src = (torch.randn(2, 1, 3, 3, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([4, 20])
    abar = torch.as_tensor(np.asarray(diffusion.alphas_cumprod), dtype=torch.float64)[t].view(2, 1, 1, 1)
    want = {"input": (x0g - src) ** 2, "gradient_para": (x0g - x0u) ** 2,
            "gradient": (x0g - x0u) ** 2 / (((1 - abar) / abar.sqrt()) * 3.0) ** 2}[mode]
    torch.testing.assert_close(process._sub_anomaly(x0g, x0u, src, t), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_process_runs_the_model_under_the_requested_autocast(dtype):
    diffusion = create_gaussian_diffusion(steps=50)
    cfg = af.ForwardConfig(w=2.0, forward_steps=10, modality=[0])
    with af.ForwardProcess(None, diffusion, cfg, dtype)._autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with af.ForwardProcess(None, diffusion, cfg)._autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_last_only_window_is_clipped_to_the_last_step():
    # an end step scaled past the last of T = 5 steps (t_e_ratio > 1): "last only" uses step T - 1, not step 0
    t_e = torch.tensor([[5], [9], [3]])
    w = af.aggregation_weights(t_e, 5, last_only=True, include_end=True)
    assert w[:, 0].tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]]
    w = af.aggregation_weights(torch.tensor([[7]]), 5, last_only=True)
    assert w[0, 0].tolist() == [0, 0, 0, 0, 1]


def test_build_passes_the_median_filter_and_the_data_set(monkeypatch):

    method = _built(monkeypatch, "--median_kernel", "3", "--name", "atlas", "--modality", "0", "--in_channels", "1")
    assert (method.median_kernel, method.dataset) == (3, "atlas")
    assert _built(monkeypatch).median_kernel == 5  # upstream's 5 x 5 median


@pytest.mark.parametrize("argv, want", [((), (None, False, False)), (("--max_rows", "0"), (0, False, False)),
                                        (("--max_rows", "32", "--channels_last", "true", "--compile", "1"),
                                         (32, True, True))])
def test_compute_flags_reach_the_forward_process(monkeypatch, argv, want):
    # -1 (the default) leaves the choice to the device: None in ForwardProcess
    p = _built(monkeypatch, *argv).process
    assert (p.max_rows, p.channels_last, p.compile) == want


def test_negative_rows_per_call_are_refused():
    with pytest.raises(ValueError, match="--max_rows"):
        _inference("--max_rows", "-2")
