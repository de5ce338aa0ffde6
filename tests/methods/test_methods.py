"""The baseline methods (AnoDDPM, classifier-guided DDIM, DDIB), their threshold search and the method interface.

Reconstructions run on oracle models whose answers are known: an ε-oracle that makes x̂0 equal a known healthy
image h at every noise level, so every method must reconstruct h exactly and its anomaly map must equal the planted
anomaly; guidance on a classifier whose log-probability gradient is written out below.
"""


import numpy as np
import pytest
import torch
from scipy import ndimage

from guided_diffusion.methods import threshold
from guided_diffusion.methods.anoddpm import AnoDDPM
from guided_diffusion.methods.base import BatchContext, SliceOutput, model_fn
from guided_diffusion.methods import registry
from guided_diffusion.methods.clf_guided import ClassifierGuided, classifier_guided
from guided_diffusion.methods.ddib import DDIB
from guided_diffusion.methods.postprocess import threshold_mask
from guided_diffusion.methods.reconstruction import reconstruction_map
from guided_diffusion.script_util import create_gaussian_diffusion

H = 16
# the linear schedule of 1000 steps, written out (independent of the code under test)
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


class HealthyOracle(torch.nn.Module):
    """ε(x, t) = (x − √ᾱ_t h) / √(1 − ᾱ_t): every prediction of x0 is h, whatever the label or null flag."""

    def __init__(self, healthy: torch.Tensor, num_classes=None, clf_free=True, learn_sigma=False):
        super().__init__()
        self.h, self.num_classes, self.clf_free, self.learn_sigma = healthy, num_classes, clf_free, learn_sigma
        self.calls = []

    def forward(self, x, t, y=None, null=False, clf_free=False, **kw):
        self.calls.append({"t": t.clone(), "x": x.clone(), "y": None if y is None else y.clone(), "null": null,
                           "clf_free": clf_free})
        h = self.h.repeat(x.shape[0] // self.h.shape[0], 1, 1, 1)
        a = torch.as_tensor(ABAR, dtype=torch.float64)[t.long()].reshape(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * h.double()) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def _images():
    """Healthy h in [-0.8, 0.8] (3 slices, 2 channels), x0 = h + planted anomaly d, and the expected map."""
    yy, xx = np.mgrid[:H, :H]
    h = np.stack([np.stack([0.8 * np.sin(xx / 3 + c + n) * np.cos(yy / 4) for c in range(2)]) for n in range(3)])
    d = np.zeros_like(h)
    d[0, 0, 4:9, 5:10] = 0.6  # slice 0: channel 0 only, 25 px
    d[1, :, 8:12, 2:6] = 0.5  # slice 1: both channels, 16 px
    # slice 2 healthy
    expected = ndimage.median_filter((d ** 2).mean(1, keepdims=True), size=(1, 1, 5, 5), mode="mirror")
    return torch.tensor(h, dtype=torch.float32), torch.tensor(h + d, dtype=torch.float32), expected


def _common(**kw):
    return dict(modality=[0, 1], median_kernel=5, cc_max_size=3, **kw)


# ------------------------------------------------------------------ threshold search on a hand-built case


def _threshold_case():
    """Slice A (unhealthy): lesion 16 px at 0.305, a 20-px false-positive patch at 0.12; slice B (healthy):
    a 25-px false-positive patch at 0.195 and two isolated pixels at 0.25 (removed by a 3-px component filter)."""
    maps = np.zeros((2, 1, H, H), np.float32)
    gt = np.zeros((2, 1, H, H), bool)
    maps[0, 0, 2:6, 2:6] = 0.305
    gt[0, 0, 2:6, 2:6] = True
    maps[0, 0, 10:14, 9:14] = 0.12
    maps[1, 0, 5:10, 5:10] = 0.195
    maps[1, 0, 0, 15] = maps[1, 0, 15, 0] = 0.25
    return maps, gt


def test_threshold_search_finds_the_known_best_threshold():
    maps, gt = _threshold_case()
    grid = threshold.threshold_grid()
    assert len(grid) == 69 and grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(0.69)
    thr, dice, curve = threshold.search_threshold(maps, gt, cc_max_size=3)
    # thr <= 0.12: A = 2*16/(36+16), B = 0; 0.12 < thr <= 0.195: A = 1, B = 0; 0.195 < thr <= 0.305: both 1
    assert thr == pytest.approx(0.20) and dice == pytest.approx(1.0)
    i = {round(g, 2): k for k, g in enumerate(grid)}
    assert curve[i[0.10]] == pytest.approx((32 / 52 + 1e-6 / (25 + 1e-6)) / 2, abs=1e-6)
    assert curve[i[0.15]] == pytest.approx(0.5, abs=1e-6)
    assert curve[i[0.30]] == pytest.approx(1.0)
    assert curve[i[0.31]] == pytest.approx(0.5)  # the lesion is lost, B stays empty
    # without the component filter B is empty only above 0.25
    thr, dice, curve = threshold.search_threshold(maps, gt, cc_max_size=0)
    assert thr == pytest.approx(0.26) and dice == pytest.approx(1.0)
    assert curve[i[0.25]] == pytest.approx((1 + 1e-6 / (2 + 1e-6)) / 2)


def test_threshold_search_compares_in_float32():
    # a map value equal to float32(0.2) counts as >= 0.2 (upstream: float32 tensor >= python float)
    maps = np.full((1, 1, 4, 4), np.float32(0.2))
    gt = np.ones((1, 1, 4, 4), bool)
    dice = threshold.mixed_dice_by_threshold(maps, gt, [0.2, 0.2000001], cc_max_size=0)
    assert dice[0] == pytest.approx(1.0) and dice[1] == pytest.approx(1e-6 / (16 + 1e-6))
    with pytest.raises(ValueError, match="N, 1, H, W"):
        threshold.mixed_dice_by_threshold(maps[0], gt[0], [0.1])
    with pytest.raises(ValueError, match="step"):
        threshold.threshold_grid(0.1, 0.7, 0)


def upstream_optimal_threshold(maps: np.ndarray, gt: np.ndarray) -> float:
    """Upstream ``obtain_optimal_threshold``'s loop, written from its code (component filter left out: callers
    use components above its size): torch float32 masks and Dice (``dice_coeff``), strict ``>`` from 0."""
    maps_t, gt_t = torch.from_numpy(maps), torch.from_numpy(gt)
    dice_max, thr_opt = 0, 0
    for thr in np.arange(0.01, 0.7, 0.01):
        recon = maps_t >= thr
        intersection = torch.logical_and(recon, gt_t).sum(dim=[1, 2, 3])
        union = torch.sum(recon, dim=[1, 2, 3]) + torch.sum(gt_t, dim=[1, 2, 3])
        dice = torch.mean((2.0 * intersection + 0.000001) / (union + 0.000001)).item()
        if dice > dice_max:
            dice_max, thr_opt = dice, thr
    return thr_opt


def test_threshold_ties_are_broken_as_upstream_on_a_dice_plateau():
    """Issue 19's case: a healthy slice with a 12x12 false-positive square at 0.45 around an 8x8 square at 0.75, an
    unhealthy slice whose 8x8 lesion has 0.58. Up to 0.58 the lesion is found (Dice 1) and the healthy slice scores
    1e-6 / (|P| + 1e-6): 1e-6/144 up to 0.45, 1e-6/64 above, so the float64 mean rises by 4e-9 at 0.46 - below
    float32 resolution at 0.5 (6e-8). Upstream (float32, strict >) keeps 0.01; a float64 argmax would pick 0.46."""
    maps = np.zeros((2, 1, H, H), np.float32)
    gt = np.zeros((2, 1, H, H), bool)
    maps[0, 0, 2:14, 2:14] = 0.45
    maps[0, 0, 4:12, 4:12] = 0.75
    maps[1, 0, 4:12, 4:12] = 0.58
    gt[1, 0, 4:12, 4:12] = True
    thr, dice, curve = threshold.search_threshold(maps, gt)  # upstream's grid and 40-px component filter
    assert thr == pytest.approx(0.01) == upstream_optimal_threshold(maps, gt)
    assert dice == 0.5 and curve[44] == curve[45] == 0.5  # 0.45 and 0.46: equal in float32
    grid = threshold.threshold_grid()
    p = np.where(grid <= 0.45 + 1e-9, 144, 64)  # the healthy slice's prediction, by hand
    f64 = np.where(grid <= 0.58 + 1e-9, (1 + 1e-6 / (p + 1e-6)) / 2, 1e-6 / (64 + 1e-6) / 2)
    assert grid[np.argmax(f64)] == pytest.approx(0.46)  # what a float64 comparison picks


@pytest.mark.parametrize("seed", range(12))
def test_threshold_search_picks_upstreams_threshold_on_random_plateaus(seed):
    """Random blocky maps on a 0.05 grid of levels, lesions on some slices, false positives on healthy ones."""
    rng = np.random.default_rng(seed)
    n = 6
    maps = np.zeros((n, 1, H, H), np.float32)
    gt = np.zeros((n, 1, H, H), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            r, c, h, w = rng.integers(0, H - 4, 2).tolist() + rng.integers(2, 8, 2).tolist()
            maps[i, 0, r:r + h, c:c + w] = np.float32(rng.integers(1, 14) * 0.05 + 0.003)
        if i % 2 == 0:
            r, c = rng.integers(0, H - 6, 2)
            gt[i, 0, r:r + 6, c:c + 6] = True
    thr, _, _ = threshold.search_threshold(maps, gt, cc_max_size=0)
    assert thr == pytest.approx(upstream_optimal_threshold(maps, gt))


def test_threshold_map_labels_before_the_component_filter():
    amap = torch.zeros(2, 1, 8, 8)
    amap[0, 0, 1, 1] = 0.5  # one pixel: removed by the filter, but the slice is predicted unhealthy (upstream)
    amap[1, 0, 2:6, 2:6] = 0.5
    mask, label = threshold_mask(amap, 0.3, cc_max_size=3)
    assert label.tolist() == [1, 1]
    assert mask[0].sum() == 0 and mask[1].sum() == 16


# ------------------------------------------------------------------ reconstructions on the ε-oracle


@pytest.mark.parametrize("noise_type, use_ddpm", [("gaussian", True), ("simplex", True), ("gaussian", False)])
def test_anoddpm_reconstructs_the_healthy_image_and_maps_the_planted_anomaly(noise_type, use_ddpm):
    h, x0, expected = _images()
    diffusion = create_gaussian_diffusion(steps=1000)
    model = HealthyOracle(h)
    method = AnoDDPM(model, diffusion, sample_steps=6, noise_type=noise_type, use_ddpm=use_ddpm, **_common())
    x_hat = method.reconstruct(x0, BatchContext.for_seed(3))
    torch.testing.assert_close(x_hat, h, atol=1e-4, rtol=0)
    # noised to step S-1 = 5 with this context's noise, then S model calls from t = 5 down to 0
    assert [int(c["t"][0]) for c in model.calls] == [5, 4, 3, 2, 1, 0]
    a5 = ABAR[5]
    eps = (model.calls[0]["x"] - np.sqrt(a5) * x0) / np.sqrt(1 - a5)
    if noise_type == "gaussian":
        torch.testing.assert_close(eps, torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)),
                                   atol=1e-3, rtol=0)
    else:  # simplex fields: smooth, so neighbouring pixels are strongly correlated (Gaussian noise: not at all)
        e = eps.numpy()
        corr = np.corrcoef(e[..., :-1].ravel(), e[..., 1:].ravel())[0, 1]
        assert corr > 0.8 and 0.05 < e.std() < 1.0
    # DDIM keeps the noise component deterministic: x_{t-1} - √ᾱ h = √((1-ᾱ_{t-1})/(1-ᾱ_t)) (x_t - √ᾱ_t h)
    x5, x4 = model.calls[0]["x"], model.calls[1]["x"]
    ddim_next = np.sqrt(ABAR[4]) * h + np.sqrt((1 - ABAR[4]) / (1 - a5)) * (x5 - np.sqrt(a5) * h)
    assert torch.allclose(x4, ddim_next.float(), atol=1e-4) == (not use_ddpm)

    out = method.test_batch(x0, {"threshold": 0.05}, BatchContext.for_seed(3))
    out.check(3, H, H, method.name)
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected, atol=1e-4)
    assert out.mask.numpy().tolist() == (expected >= 0.05).tolist()
    assert out.pred_label.tolist() == [1, 1, 0]


def test_anoddpm_accepts_the_null_prediction_of_a_classifier_free_model_and_refuses_a_plain_conditional_one():
    h, x0, _ = _images()
    diffusion = create_gaussian_diffusion(steps=1000)
    model = HealthyOracle(h, num_classes=2, clf_free=True)
    AnoDDPM(model, diffusion, sample_steps=3, use_ddpm=False, **_common()).reconstruct(x0, BatchContext.for_seed(0))
    assert all(c["null"] is True and c["clf_free"] for c in model.calls)
    with pytest.raises(ValueError, match="unconditionally.*--clf_free False"):
        AnoDDPM(HealthyOracle(h, num_classes=2, clf_free=False), diffusion, sample_steps=3, **_common())
    with pytest.raises(ValueError, match="--sample_steps must lie in"):
        AnoDDPM(HealthyOracle(h), diffusion, sample_steps=1001, **_common())
    with pytest.raises(ValueError, match="--noise_type"):
        AnoDDPM(HealthyOracle(h), diffusion, sample_steps=3, noise_type="perlin", **_common())


@pytest.mark.parametrize("legacy", [False, True])
def test_ddib_levels_and_exact_reconstruction(legacy):
    h, x0, expected = _images()
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim10")  # kept steps 0, 100, ..., 900
    model = HealthyOracle(h, num_classes=2, clf_free=True)
    S = 4
    method = DDIB(model, diffusion, sample_steps=S, w=1.5, legacy_ddib=legacy, **_common())
    out = method.test_batch(x0, {"threshold": 0.05}, BatchContext.for_seed(0))
    np.testing.assert_allclose(out.anomaly_map.numpy(), expected, atol=1e-4)
    enc = [c for c in model.calls if c["null"] is True]
    dec = [c for c in model.calls if c["null"] is not True]
    assert len(enc) == S and len(dec) == S
    # encoding: correct = from the clean level to level S-1, ε at each latent's own level (0, 0, 100, 200);
    # upstream = x0 taken as level 0, S steps to level S (0, 100, 200, 300); decoding starts at S-1 either way
    assert [int(c["t"][0]) for c in enc] == ([0, 100, 200, 300] if legacy else [0, 0, 100, 200])
    assert [int(c["t"][0]) for c in dec] == [300, 200, 100, 0]
    # decoding: one batched forward of conditional (healthy) and null rows per step
    assert all(c["x"].shape[0] == 6 and c["y"].tolist() == [0] * 6 and c["null"].tolist() == [False] * 3 + [True] * 3
               for c in dec)
    # the latent decoded first is the encoder's last output: level 300 (correct) or 400 labelled 300 (upstream)
    first = dec[0]["x"][:3]
    level = 4 if legacy else 3
    a = ABAR[100 * level]
    eps_last = (enc[-1]["x"] - np.sqrt(ABAR[int(enc[-1]["t"][0])]) * h) / np.sqrt(1 - ABAR[int(enc[-1]["t"][0])])
    torch.testing.assert_close(first, (np.sqrt(a) * h + np.sqrt(1 - a) * eps_last).float(), atol=1e-4, rtol=0)


def test_ddib_refuses_a_model_without_null_embedding():
    h, _, _ = _images()
    diffusion = create_gaussian_diffusion(steps=1000)
    with pytest.raises(ValueError, match="classifier-free guided model.*unconditional"):
        DDIB(HealthyOracle(h), diffusion, sample_steps=3, w=1.0, **_common())
    with pytest.raises(ValueError, match="--clf_free False"):
        DDIB(HealthyOracle(h, num_classes=2, clf_free=False), diffusion, sample_steps=3, w=1.0, **_common())
    with pytest.raises(ValueError, match="--w"):
        DDIB(HealthyOracle(h, num_classes=2), diffusion, sample_steps=3, w=-1.0, **_common())


# ------------------------------------------------------------------ classifier guidance


class MeanClassifier(torch.nn.Module):
    """logits = [a·mean(x), −a·mean(x)]: log p(0 | x) rises with the mean intensity."""

    out_channels = 2

    def __init__(self, a=3.0):
        super().__init__()
        self.a = a
        self.ts = []

    def forward(self, x, t):
        self.ts.append(t.clone())
        m = x.flatten(1).mean(1)
        return torch.stack([self.a * m, -self.a * m], 1)


def test_classifier_guided_eps_is_condition_score():
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim10")
    clf = MeanClassifier(3.0)
    x = torch.full((2, 2, 4, 4), 0.05)
    x[1] = -0.1
    t_model = torch.tensor([300, 300])  # what the wrapped model receives: original steps
    zero = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731  (x̂0 = x/√ᾱ stays inside [-1, 1])
    guided = classifier_guided(zero, clf, diffusion, label=0, scale=50.0)(x, t_model)
    # ∇ log p0 = a (1 - p0 + p1) / N = 2 a p1 / N per pixel, with p1 = sigmoid(-2 a m)
    m = x.flatten(1).mean(1)
    p1 = 1 / (1 + torch.exp(2 * 3.0 * m))
    grad = (2 * 3.0 * p1 / 32).reshape(-1, 1, 1, 1)
    expected = -np.sqrt(1 - ABAR[300]) * 50.0 * grad * torch.ones_like(x)
    torch.testing.assert_close(guided, expected.float(), atol=1e-6, rtol=1e-5)
    assert clf.ts[0].tolist() == [300, 300]
    # variance channels of a learned-sigma model pass through
    two = lambda x, t, **kw: torch.cat([torch.zeros_like(x), torch.ones_like(x)], 1)  # noqa: E731
    out = classifier_guided(two, clf, diffusion, label=0, scale=50.0)(x, t_model)
    assert out.shape[1] == 4 and torch.equal(out[:, 2:], torch.ones_like(x))


class GaussianOracle(HealthyOracle):
    """The exact ε of data x0 ~ N(h, σ² I): √(1 − ᾱ) (x − √ᾱ h) / (ᾱ σ² + 1 − ᾱ) (a broad data model that
    guidance can move, unlike the point mass of HealthyOracle)."""

    sigma = 0.3

    def forward(self, x, t, y=None, null=False, clf_free=False, **kw):
        self.calls.append({"t": t.clone(), "y": None if y is None else y.clone()})
        h = self.h.repeat(x.shape[0] // self.h.shape[0], 1, 1, 1).double()
        a = torch.as_tensor(ABAR, dtype=torch.float64)[t.long()].reshape(-1, 1, 1, 1)
        eps = ((1 - a).sqrt() * (x.double() - a.sqrt() * h) / (a * self.sigma ** 2 + 1 - a)).float()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def test_classifier_guidance_moves_the_reconstruction_toward_healthy():
    h, x0, _ = _images()
    diffusion = create_gaussian_diffusion(steps=1000)
    clf = MeanClassifier(3.0)
    p_healthy = []
    for scale in (0.0, 100.0, 400.0):
        model = GaussianOracle(h, num_classes=2, clf_free=False, learn_sigma=True)
        method = ClassifierGuided(model, diffusion, clf, sample_steps=200, classifier_scale=scale, **_common())
        x_hat = method.reconstruct(x0, BatchContext.for_seed(1))
        p_healthy.append(torch.softmax(clf(x_hat, torch.zeros(3)), 1)[:, 0])
        assert all(c["y"].tolist() == [0, 0, 0] for c in model.calls)  # the DM is conditioned on healthy
        assert [int(c["t"][0]) for c in model.calls] == list(range(199, -1, -1))
    # a larger scale gives every slice a higher probability of the target class
    assert (p_healthy[1] > p_healthy[0] + 0.02).all() and (p_healthy[2] > p_healthy[1] + 0.05).all()


def test_classifier_guided_accepts_unconditional_models():
    h, x0, _ = _images()
    model = HealthyOracle(h)
    method = ClassifierGuided(model, create_gaussian_diffusion(steps=1000), MeanClassifier(), sample_steps=3,
                              classifier_scale=0.0, **_common())
    torch.testing.assert_close(method.reconstruct(x0, BatchContext.for_seed(0)), h, atol=1e-4, rtol=0)
    assert all(c["y"] is None for c in model.calls)
    with pytest.raises(ValueError, match="healthy label 5"):
        ClassifierGuided(model, create_gaussian_diffusion(steps=1000), MeanClassifier(), sample_steps=3,
                         classifier_scale=1.0, healthy_label=5, **_common())


def _classifier(tmp_path, clf_num="", given=(), **kw):
    """The classifier of tmp_path/clf as the clf_guided method resolves it, with these flags."""
    from guided_diffusion.architecture import ClassifierSettings
    from guided_diffusion.loading import resolve_classifier

    flags = dict(image_size=32, in_channels=2, classifier_width=32, classifier_depth=1,
                 classifier_attention_resolutions="8")
    flags.update(kw)
    return resolve_classifier(str(tmp_path / "clf"), clf_num, ClassifierSettings(**flags), set(given), (2, 32))


def test_classifier_checkpoint_that_does_not_fit_the_flags(tmp_path):
    from guided_diffusion.script_util import create_classifier

    with pytest.raises(ValueError, match="--clf_dir"):
        _classifier(tmp_path)
    (tmp_path / "clf").mkdir()
    torch.save(create_classifier(**_classifier(tmp_path).settings.flags()).state_dict(),
               tmp_path / "clf" / "model000007.pt")
    clf, path = _classifier(tmp_path).load(torch.device("cpu"))
    assert path.endswith("model000007.pt") and not clf.training
    with pytest.raises(RuntimeError, match=r"model000007\.pt does not fit the model built from the classifier flags "
                                           r"\(.*--classifier_width 64"):
        _classifier(tmp_path, classifier_width=64).load(torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="--clf_num 9: no such"):
        _classifier(tmp_path, clf_num="9").load(torch.device("cpu"))


def test_batch_context_deals_the_global_noise_out_to_the_processes():
    x = torch.zeros(2, 3, 8, 8)
    full = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(9))
    for rank in (0, 1):
        ctx = BatchContext.for_seed(9, rows=4, rank=rank, world=2)
        torch.testing.assert_close(ctx.randn_like(x), full[rank::2])
    one = BatchContext.for_seed(9).simplex_like(torch.zeros(4, 3, 8, 8))
    for rank in (0, 1):
        torch.testing.assert_close(BatchContext.for_seed(9, rows=4, rank=rank, world=2).simplex_like(x), one[rank::2])
    assert not torch.equal(one[0, 0], one[0, 1]) and not torch.equal(one[0], one[1])  # a field per slice, channel
    with pytest.raises(ValueError, match="share"):
        BatchContext.for_seed(0, rows=4, rank=1, world=2).randn_like(torch.zeros(3, 1, 2, 2))


def test_model_fn_modes_and_errors():
    h, x0, _ = _images()
    t = torch.zeros(3, dtype=torch.long)
    cfree = HealthyOracle(h, num_classes=2, clf_free=True)
    model_fn(cfree, label=0)(x0, t)
    model_fn(cfree, null=True)(x0, t)
    assert cfree.calls[0]["y"].tolist() == [0, 0, 0] and cfree.calls[0]["clf_free"] is True
    assert cfree.calls[1]["null"] is True
    plain = HealthyOracle(h, num_classes=2, clf_free=False)
    model_fn(plain, label=0)(x0, t)
    assert plain.calls[0]["clf_free"] is False
    with pytest.raises(ValueError, match="no null embedding"):
        model_fn(plain, null=True)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        model_fn(HealthyOracle(h), label=0)
    with pytest.raises(ValueError, match="needs a label"):
        model_fn(cfree)


def test_slice_output_check_names_the_method():
    good = SliceOutput(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool), torch.zeros(2).long(),
                       columns={"c": np.zeros(2)})
    good.check(2, 4, 4, "m")
    bad = SliceOutput(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2).long())
    with pytest.raises(ValueError, match="m: mask"):
        bad.check(2, 4, 4, "m")
    with pytest.raises(ValueError, match="column 'c'"):
        SliceOutput(good.anomaly_map, good.mask, good.pred_label, columns={"c": np.zeros(3)}).check(2, 4, 4, "m")


def test_registry():
    assert set(registry.METHODS) >= {"anofpdm", "anoddpm", "clf_guided", "ddib"}
    assert registry.method_class("ddib") is DDIB and registry.method_class("anoddpm").uses_pixel_labels
    assert not registry.method_class("anofpdm").uses_pixel_labels
    with pytest.raises(ValueError, match="--method 'nope'.*anofpdm"):
        registry.method_class("nope")


def test_reconstruction_fit_and_fallbacks():
    h, x0, expected = _images()
    method = AnoDDPM(HealthyOracle(h), create_gaussian_diffusion(steps=1000), sample_steps=2, **_common())
    maps, gt = _threshold_case()
    hyper = method.fit({"anomaly_map": maps}, np.array([1, 0]), gt)
    assert hyper["threshold"] == pytest.approx(0.20) and hyper["n_val"] == 2 and hyper["n_val_unhealthy"] == 1
    with pytest.raises(ValueError, match="pixel labels"):
        method.fit({"anomaly_map": maps}, np.array([1, 0]), None)
    with pytest.raises(ValueError, match="--opt_thr.*0.08"):
        method.hyperparams_without_validation()
    method.opt_thr = 0.3
    assert method.hyperparams_without_validation()["threshold"] == 0.3
    with pytest.raises(ValueError, match="finite 'threshold'"):
        method.test_batch(x0, {"thr": 1}, BatchContext.for_seed(0))
    np.testing.assert_allclose(reconstruction_map(x0, h, [0, 1]).numpy(), expected, atol=1e-5)


def test_classifier_from_its_config_json(tmp_path):
    from guided_diffusion import fileio
    from guided_diffusion.script_util import classifier_and_diffusion_defaults, create_classifier

    (tmp_path / "clf").mkdir()
    from guided_diffusion.architecture import ClassifierSettings

    flags = ClassifierSettings(image_size=32, in_channels=2, classifier_width=32, classifier_depth=1,
                               classifier_attention_resolutions="8").flags()
    torch.save(create_classifier(**flags).state_dict(), tmp_path / "clf" / "model000002.pt")
    fileio.write_run_config(tmp_path / "clf", "classifier", {**classifier_and_diffusion_defaults(), **flags})
    plain = _classifier(tmp_path, classifier_width=128, classifier_depth=2)  # the parser's defaults
    clf, _ = plain.load(torch.device("cpu"))  # built as recorded, not as the defaults say
    assert clf.model_channels == 32
    with pytest.raises(fileio.RunConfigError, match="--classifier_width 64 .config.json: 32."):
        _classifier(tmp_path, classifier_width=64, given={"classifier_width"})
    fileio.write_run_config(tmp_path / "clf", "diffusion", {})
    with pytest.raises(fileio.RunConfigError, match="'diffusion' model"):
        _classifier(tmp_path)
