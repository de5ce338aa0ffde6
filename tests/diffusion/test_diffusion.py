"""Diffusion core checked against closed forms (schedules, q_sample, oracle eps-models, CFG, DDIM)."""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion.diffusion import gaussian_diffusion as gd
from guided_diffusion.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from guided_diffusion.diffusion.respace import SpacedDiffusion, space_timesteps


def make_diffusion(steps=1000, schedule="linear", respacing="", learn_sigma=False, loss_type=gd.LossType.MSE,
                   rescale_timesteps=False, var_type=None):
    betas = gd.get_named_beta_schedule(schedule, steps)
    if var_type is None:
        var_type = gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        space_timesteps(steps, respacing), betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=var_type, loss_type=loss_type, rescale_timesteps=rescale_timesteps,
    )


def oracle_model(x0, steps=1000, schedule="linear"):
    """eps-model that knows x0: returns the exact noise of x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps.

    t is the ORIGINAL step (what a respaced diffusion must pass); records every t it sees.
    """
    abar = th.from_numpy(np.cumprod(1 - gd.get_named_beta_schedule(schedule, steps)))
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.clone())
        a = abar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        ref = x0 if x.shape[0] == x0.shape[0] else th.cat([x0] * (x.shape[0] // x0.shape[0]))
        return (x - a.sqrt() * ref) / (1 - a).sqrt()

    model.seen = seen
    return model


def rand_images(b=3, c=2, h=8, w=8, seed=0, dtype=th.float64):
    g = th.Generator().manual_seed(seed)
    return (th.rand(b, c, h, w, generator=g, dtype=dtype) * 1.8 - 0.9)


# ---------------------------------------------------------------------------------------------- schedules


def test_linear_schedule_closed_form():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    abar = np.cumprod(1 - betas)
    assert abar[0] == pytest.approx(0.9999) and 3e-5 < abar[-1] < 5e-5
    # T != 1000 keeps the shape: endpoints scaled by 1000 / T
    b100 = gd.get_named_beta_schedule("linear", 100)
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_cosine_schedule_closed_form_and_clip():
    T = 100
    betas = gd.get_named_beta_schedule("cosine", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = np.cumprod(1 - betas)
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    unclipped = betas < 0.999
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-10)
    assert betas.max() == 0.999 and betas[-1] == 0.999  # cos(pi/2) = 0 would give beta = 1


def test_unknown_schedule_and_bad_betas():
    with pytest.raises(NotImplementedError, match="quadratic"):
        gd.get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError):
        gd.GaussianDiffusion(betas=np.array([0.0, 0.1]), model_mean_type=gd.ModelMeanType.EPSILON,
                             model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)


# ---------------------------------------------------------------------------------------------- q_sample


def test_q_sample_exact_with_fixed_noise():
    d = make_diffusion()
    x0, noise = rand_images(), th.randn(3, 2, 8, 8, dtype=th.float64)
    t = th.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, noise)
    abar = np.cumprod(1 - gd.get_named_beta_schedule("linear", 1000))
    for i, ti in enumerate(t.tolist()):
        th.testing.assert_close(xt[i], math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * noise[i])
    mean, var, logvar = d.q_mean_variance(x0, t)
    th.testing.assert_close(var[1], th.full_like(var[1], 1 - abar[500]))
    th.testing.assert_close(logvar, var.log())
    th.testing.assert_close(mean[2], math.sqrt(abar[999]) * x0[2])
    th.testing.assert_close(d.q_sample(x0, 500, noise)[1], xt[1])  # int t broadcasts


def test_q_sample_statistics():
    th.manual_seed(0)
    d = make_diffusion()
    x0 = th.full((20000, 1, 1, 1), 0.5)
    xt = d.q_sample(x0, th.full((20000,), 300))
    abar = d.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(0.5 * math.sqrt(abar), abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.04)


# ---------------------------------------------------------------------------------------------- oracle model


def test_oracle_eps_recovers_x0_and_zero_mse():
    d = make_diffusion()
    x0, noise = rand_images(), th.randn(3, 2, 8, 8, dtype=th.float64)
    t = th.tensor([3, 400, 999])
    xt = d.q_sample(x0, t, noise)
    model = oracle_model(x0)
    eps = model(xt, t)
    th.testing.assert_close(eps, noise)
    th.testing.assert_close(d.predict_xstart_from_eps(xt, t, eps), x0)
    th.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), noise)
    losses = d.training_losses(model, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse"} and losses["loss"].shape == (3,)
    assert losses["mse"].max().item() < 1e-20
    out = d.p_mean_variance(model, xt, t, clip_denoised=True)
    th.testing.assert_close(out["pred_xstart"], x0)
    th.testing.assert_close(out["eps"], noise)


def test_training_loss_is_eps_mse_and_kwargs_rule():
    d = make_diffusion()
    x0, noise = rand_images(dtype=th.float32), th.randn(3, 2, 8, 8)
    calls = []

    def model(x, t, **kwargs):
        calls.append(kwargs)
        return th.zeros_like(x)

    losses = d.training_losses(model, x0, th.tensor([1, 2, 3]), model_kwargs={"threshold": 0.1}, noise=noise)
    th.testing.assert_close(losses["loss"], (noise**2).mean(dim=(1, 2, 3)))
    assert calls[-1] == {}  # upstream: kwargs without "y" are all dropped (incl. threshold)
    y = th.tensor([0, 1, 1])
    d.training_losses(model, x0, th.tensor([1, 2, 3]), model_kwargs={"y": y, "threshold": 0.1}, noise=noise)
    assert calls[-1]["threshold"] == 0.1 and calls[-1]["y"] is y
    # noise_fn (e.g. simplex noise) supplies eps
    ones = d.training_losses(model, x0, th.tensor([1, 2, 3]), noise_fn=lambda x, t: th.ones_like(x))
    th.testing.assert_close(ones["mse"], th.ones(3))


class LearnedSigmaModel(th.nn.Module):
    """Outputs [eps, v]: eps from one parameter, variance value v from another."""

    def __init__(self):
        super().__init__()
        self.eps_scale = th.nn.Parameter(th.tensor(0.3))
        self.v = th.nn.Parameter(th.tensor(0.2))

    def forward(self, x, t, **kwargs):
        return th.cat([self.eps_scale * x, self.v * th.ones_like(x).tanh()], dim=1)


@pytest.mark.parametrize("loss_type", [gd.LossType.MSE, gd.LossType.RESCALED_MSE])
def test_learned_sigma_vb_term(loss_type):
    th.manual_seed(0)
    d = make_diffusion(learn_sigma=True, loss_type=loss_type, steps=100)
    model = LearnedSigmaModel()
    x0 = rand_images(dtype=th.float32)
    t = th.tensor([0, 10, 99])  # t = 0 takes the decoder NLL branch
    losses = d.training_losses(model, x0, t)
    assert set(losses) == {"loss", "mse", "vb"}
    assert th.isfinite(losses["vb"]).all() and (losses["vb"] > 0).all()
    th.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # the VB term trains only the variance: the eps part of the output is frozen
    losses["vb"].sum().backward()
    assert model.eps_scale.grad.abs().item() == 0.0 and model.v.grad.abs().item() > 0.0
    if loss_type == gd.LossType.RESCALED_MSE:
        plain = make_diffusion(learn_sigma=True, steps=100)
        th.manual_seed(1)
        noise = th.randn_like(x0)
        a = d.training_losses(model, x0, t, noise=noise)["vb"]
        b = plain.training_losses(model, x0, t, noise=noise)["vb"]
        th.testing.assert_close(a, b * 100 / 1000)


def test_kl_loss_and_fixed_variance_errors():
    d = make_diffusion(steps=50, learn_sigma=True, loss_type=gd.LossType.KL)
    losses = d.training_losses(LearnedSigmaModel(), rand_images(dtype=th.float32), th.tensor([0, 5, 49]))
    assert set(losses) == {"loss"} and th.isfinite(losses["loss"]).all()
    with pytest.raises(ValueError, match="channels"):
        make_diffusion(steps=50).training_losses(LearnedSigmaModel(), rand_images(dtype=th.float32),
                                                 th.tensor([1, 2, 3]))


def test_losses_closed_forms():
    # KL between identical Gaussians is 0; against N(0,1) it is (var + mu^2 - 1 - log var) / 2
    m, lv = th.tensor([0.3]), th.tensor([math.log(2.0)])
    assert normal_kl(m, lv, m, lv).item() == pytest.approx(0.0, abs=1e-7)
    assert normal_kl(m, lv, 0.0, 0.0).item() == pytest.approx((2 + 0.09 - 1 - math.log(2)) / 2, rel=1e-6)
    # the 256 bin probabilities of the discretised Gaussian sum to one
    bins = th.linspace(-1, 1, 256, dtype=th.float64)
    logp = discretized_gaussian_log_likelihood(bins, means=th.full_like(bins, 0.1),
                                               log_scales=th.full_like(bins, math.log(0.3)))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


# ---------------------------------------------------------------------------------------------- respacing


def test_space_timesteps():
    assert space_timesteps(1000, "") == set(range(1000))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45 and {0, 99, 100, 199, 200, 299} <= kept
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_spaced_diffusion_alphas_and_original_t():
    base = make_diffusion()
    d = make_diffusion(respacing="ddim50")
    kept = sorted(space_timesteps(1000, "ddim50"))
    assert d.num_timesteps == 50 and d.timestep_map.tolist() == kept
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)

    x0 = rand_images()
    model = oracle_model(x0)
    t = th.tensor([0, 7, 49])
    noise = th.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    th.testing.assert_close(xt, base.q_sample(x0, th.tensor([0, 140, 980]), noise))
    assert d.training_losses(model, x0, t, noise=noise)["mse"].max() < 1e-20  # oracle at the original t
    assert model.seen[-1].tolist() == [0, 140, 980]
    d.ddim_sample(model, xt, t)
    assert model.seen[-1].tolist() == [0, 140, 980]
    out = d.guided_eps(model, xt, t, y=th.tensor([0, 1, 0]), w=2.0)
    assert model.seen[-1].tolist() == [0, 140, 980] * 2
    th.testing.assert_close(out["eps"], noise)


def test_rescale_timesteps():
    d = make_diffusion(respacing="ddim10", rescale_timesteps=True)
    seen = []
    d.p_mean_variance(lambda x, t, **k: seen.append(t) or th.zeros_like(x), th.zeros(2, 1, 2, 2), th.tensor([1, 9]))
    th.testing.assert_close(seen[0], th.tensor([100.0, 900.0]))


# ---------------------------------------------------------------------------------------------- samplers


def test_uniform_sampler():
    d = make_diffusion(steps=1000, respacing="ddim20")
    sampler = create_named_schedule_sampler("uniform", d)
    assert isinstance(sampler, UniformSampler)
    np.random.seed(0)
    t, w = sampler.sample(4000, "cpu")
    assert t.dtype == th.long and w.dtype == th.float32 and t.shape == w.shape == (4000,)
    assert t.min() == 0 and t.max() == 19 and (w == 1).all()
    counts = th.bincount(t, minlength=20).float()
    assert (counts - 200).abs().max() < 60  # uniform: 200 per step expected
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("nope", d)


def test_loss_second_moment_sampler_weights():
    d = make_diffusion(steps=4, schedule="cosine")
    sampler = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(sampler, LossSecondMomentResampler)
    np.testing.assert_allclose(sampler.weights(), 1.0)  # uniform until warm
    for _ in range(10):
        sampler.update_with_all_losses([0, 1, 2, 3], [1.0, 1.0, 1.0, 3.0])
    w = sampler.weights()
    assert w[3] / w[0] == pytest.approx(3.0, rel=0.01)


# ---------------------------------------------------------------------------------------------- CFG


class RecordingCondModel:
    """eps_cond = x * (1 + y), eps_null = x - 1; records each call's kwargs."""

    def __init__(self, learn_sigma=False):
        self.calls = []
        self.learn_sigma = learn_sigma

    def __call__(self, x, t, y=None, null=False, clf_free=False, threshold=-1, **kwargs):
        self.calls.append(dict(x=x, t=t, y=y, null=null, clf_free=clf_free, threshold=threshold, **kwargs))
        null = th.as_tensor(null).reshape(-1, *([1] * (x.ndim - 1)))
        cond = x * (1 + y.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))))
        eps = th.where(null, x - 1, cond)
        return th.cat([eps, th.full_like(x, 0.5)], dim=1) if self.learn_sigma else eps


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_guided_eps_single_batched_forward(learn_sigma):
    d = make_diffusion(steps=100)
    model = RecordingCondModel(learn_sigma)
    x = th.randn(3, 2, 4, 4)
    y = th.tensor([0, 1, 1])
    mask = th.rand(3)  # a per-row model kwarg must be duplicated along with x
    out = d.guided_eps(model, x, th.tensor([1, 2, 3]), y, w=2.0,
                       model_kwargs={"threshold": 0.1, "mask": mask, "scale": 7})
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["x"].shape[0] == 6 and call["clf_free"] is True and call["threshold"] == -1
    assert call["y"].tolist() == [0, 1, 1, 0, 1, 1] and call["t"].tolist() == [1, 2, 3] * 2
    assert call["null"].dtype == th.bool and call["null"].tolist() == [False] * 3 + [True] * 3
    assert call["mask"].tolist() == th.cat([mask, mask]).tolist() and call["scale"] == 7
    eps_cond = x * (1 + y.float()).reshape(-1, 1, 1, 1)
    th.testing.assert_close(out["eps_cond"], eps_cond)
    th.testing.assert_close(out["eps_null"], x - 1)
    th.testing.assert_close(out["eps"], 3 * eps_cond - 2 * (x - 1))
    assert ("var_values" in out) == learn_sigma
    if learn_sigma:
        th.testing.assert_close(out["var_values"], th.full_like(x, 0.5))
    else:
        assert set(out) == {"eps", "eps_cond", "eps_null"}
    with pytest.raises(ValueError, match="labels"):
        d.guided_eps(model, x, 1, None, 2.0)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_guided_eps_in_calls_of_max_rows_with_one_condition_each(learn_sigma):
    d = make_diffusion(steps=100)
    model = RecordingCondModel(learn_sigma)
    x = th.randn(5, 2, 4, 4)
    y = th.tensor([0, 1, 1, 0, 1])
    mask = th.rand(5)
    out = d.guided_eps(model, x, th.arange(5), y, w=2.0, model_kwargs={"mask": mask, "scale": 7}, max_rows=2)
    # conditional rows 0-1, 2-3, 4, then null rows 0-1, 2-3, 4; each call with a fixed (bool) condition
    assert [c["x"].shape[0] for c in model.calls] == [2, 2, 1, 2, 2, 1]
    assert [c["null"] for c in model.calls] == [False] * 3 + [True] * 3
    assert th.cat([c["t"] for c in model.calls]).tolist() == list(range(5)) * 2
    assert th.cat([c["y"] for c in model.calls]).tolist() == y.tolist() * 2
    assert th.cat([c["mask"] for c in model.calls]).tolist() == mask.tolist() * 2
    assert all(c["scale"] == 7 and c["clf_free"] is True for c in model.calls)
    eps_cond = x * (1 + y.float()).reshape(-1, 1, 1, 1)
    th.testing.assert_close(out["eps_cond"], eps_cond)
    th.testing.assert_close(out["eps_null"], x - 1)
    th.testing.assert_close(out["eps"], 3 * eps_cond - 2 * (x - 1))
    assert ("var_values" in out) == learn_sigma
    with pytest.raises(ValueError, match="max_rows"):
        d.guided_eps(model, x, 1, y, 2.0, max_rows=0)


def test_condition_eps_one_condition_for_every_row():
    d = make_diffusion(steps=1000, respacing="ddim10")
    model = RecordingCondModel(learn_sigma=True)
    x = th.randn(3, 2, 4, 4)
    y = th.tensor([1, 0, 1])
    th.testing.assert_close(d.condition_eps(model, x, 2, y, null=True), x - 1)
    assert model.calls[-1]["null"] is True and model.calls[-1]["t"].tolist() == [200] * 3  # original steps
    eps = d.condition_eps(model, x, 2, None, null=False, model_kwargs={"y": y, "threshold": 0.1}, max_rows=2)
    th.testing.assert_close(eps, x * (1 + y.float()).reshape(-1, 1, 1, 1))
    assert [c["x"].shape[0] for c in model.calls[-2:]] == [2, 1]
    assert all(c["null"] is False and c["threshold"] == -1 for c in model.calls[-2:])


def test_guided_eps_takes_y_from_kwargs_and_w0_is_conditional():
    d = make_diffusion(steps=100)
    model = RecordingCondModel()
    x = th.randn(2, 1, 4, 4)
    out = d.guided_eps(model, x, 3, None, 0.0, model_kwargs={"y": th.tensor([1, 0])})
    th.testing.assert_close(out["eps"], out["eps_cond"])


def test_guided_sampling_loop_uses_one_forward_per_step():
    d = make_diffusion(steps=1000, respacing="ddim5")
    model = RecordingCondModel()
    y = th.tensor([0, 1])
    sample = d.ddim_sample_loop(model, (2, 1, 4, 4), model_kwargs={"y": y}, guidance_w=1.5)
    assert sample.shape == (2, 1, 4, 4) and th.isfinite(sample).all()
    assert len(model.calls) == 5
    assert [c["t"][0].item() for c in model.calls] == [800, 600, 400, 200, 0]
    assert all(c["null"].tolist() == [False, False, True, True] for c in model.calls)
    # learned sigma + CFG through the DDPM sampler and the cfg_model_fn wrapper
    d2 = make_diffusion(steps=1000, respacing="ddim5", learn_sigma=True)
    s2 = d2.p_sample_loop(gd.cfg_model_fn(RecordingCondModel(True), 1.5), (2, 1, 4, 4), model_kwargs={"y": y})
    assert th.isfinite(s2).all()


def test_guided_oracle_sampling_recovers_x0():
    # cond and null both oracle -> guided eps is the oracle for any w -> DDIM recovers x0 exactly
    x0 = rand_images(b=2)
    d = make_diffusion(respacing="ddim20")
    oracle = oracle_model(x0)
    xT = d.q_sample(x0, d.num_timesteps - 1, th.randn_like(x0))
    out = d.ddim_sample_loop(oracle, x0.shape, noise=xT, model_kwargs={"y": th.tensor([0, 1])},
                             guidance_w=3.0, clip_denoised=False)
    th.testing.assert_close(out, x0)


# ---------------------------------------------------------------------------------------------- DDIM


def test_ddim_step_with_oracle_eps_is_q_sample_consistent():
    d = make_diffusion(respacing="ddim50")
    x0, noise = rand_images(), th.randn(3, 2, 8, 8, dtype=th.float64)
    t = th.tensor([0, 1, 49])
    xt = d.q_sample(x0, t, noise)
    x_prev = d.ddim_step_from_eps(xt, t, noise)
    th.testing.assert_close(x_prev[1:], d.q_sample(x0, t - 1, noise)[1:])
    th.testing.assert_close(x_prev[0], x0[0])  # t = 0 lands on the clean level
    # inversion with oracle eps goes one level up on the same noise; t = -1 leaves the clean level
    th.testing.assert_close(d.ddim_reverse_step_from_eps(d.q_sample(x0, 5, noise), 5, noise), d.q_sample(x0, 6, noise))
    th.testing.assert_close(d.ddim_reverse_step_from_eps(x0, -1, noise), d.q_sample(x0, 0, noise))
    # ddim_sample (model-calling form) agrees with the step function
    out = d.ddim_sample(oracle_model(x0), xt, t, clip_denoised=False)
    th.testing.assert_close(out["sample"], x_prev)
    with pytest.raises(ValueError):
        d.ddim_reverse_step_from_eps(xt, 50, noise)


def test_ddim_eta1_noise_is_posterior_variance():
    d = make_diffusion(steps=100)
    t = th.arange(1, 100)
    abar_t = th.from_numpy(d.alphas_cumprod[1:])
    abar_prev = th.from_numpy(d.alphas_cumprod[:-1])
    sigma = d._ddim_sigma(abar_t, abar_prev, 1.0)
    np.testing.assert_allclose(sigma.numpy() ** 2, d.posterior_variance[t.numpy()], rtol=1e-10)


def test_p_sample_oracle_mean_is_posterior_mean():
    d = make_diffusion(steps=100, var_type=gd.ModelVarType.FIXED_SMALL)
    x0, noise = rand_images(), th.randn(3, 2, 8, 8, dtype=th.float64)
    t = th.tensor([0, 30, 99])
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(oracle_model(x0, steps=100), xt, t)
    th.testing.assert_close(out["mean"], d.q_posterior_mean_variance(x0, xt, t)[0])
    th.testing.assert_close(out["variance"][1], th.full_like(xt[1], d.posterior_variance[30]))
    # no noise is added at t = 0
    s = d.p_sample(oracle_model(x0, steps=100), xt, t, noise=th.full_like(xt, 100.0))
    th.testing.assert_close(s["sample"][0], out["mean"][0])


def smooth_eps_model(x, t, **kwargs):
    """Deterministic smooth eps-model: small linear map (channel mix + spatial shift), t-dependent."""
    scale = 0.05 + 0.05 * t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000
    return scale * (x + 0.5 * x.flip(1) + 0.3 * th.roll(x, 1, dims=-1))


def test_ddim_inversion_then_sampling_returns_input():
    x0 = rand_images(seed=3)
    errors = {}
    for respacing in ("ddim50", ""):
        d = make_diffusion(respacing=respacing)
        latent = d.ddim_reverse_sample_loop(smooth_eps_model, x0, clip_denoised=False)
        assert (latent - x0).abs().mean() > 0.3  # really moved to the noisy end
        back = d.ddim_sample_loop(smooth_eps_model, x0.shape, noise=latent, clip_denoised=False)
        errors[d.num_timesteps] = (back - x0).abs().max().item()
    # DDIM inversion is exact up to eps(x_t) ~ eps(x_{t+1}): the error shrinks with the step size
    assert errors[1000] < 1e-2 and errors[1000] < errors[50] / 10
    # partial encoding (to level 299) decodes from t_start = 299
    latent = d.ddim_reverse_sample_loop(smooth_eps_model, x0, num_steps=300, clip_denoised=False)
    back = d.ddim_sample_loop(smooth_eps_model, x0.shape, noise=latent, t_start=299, clip_denoised=False)
    assert (back - x0).abs().max().item() < 5e-3


def test_ddim_encoding_noise_level_correct_vs_legacy():
    """Oracle model: the correct encoding stays on q_sample(x0, t, noise); upstream's off-by-one does not."""
    d = make_diffusion()
    abar = d.alphas_cumprod
    x0, noise = rand_images(), th.randn(3, 2, 8, 8, dtype=th.float64)
    steps = 30
    correct = list(d.ddim_encode_latents(oracle_model(x0), x0, steps, noise=noise))
    legacy = list(d.ddim_encode_latents(oracle_model(x0), x0, steps, noise=noise, legacy_ddim_inversion=True))
    assert len(correct) == len(legacy) == steps
    for t in range(steps):
        th.testing.assert_close(correct[t], d.q_sample(x0, t, noise))
    th.testing.assert_close(legacy[0], correct[0])
    # legacy: the first step applies the t=1 model to the level-0 latent, giving a fixed eps_hat;
    # latent labelled t >= 1 sits at level t+1 with noise eps_hat (~0.675 * noise)
    eps_hat = (legacy[0] - math.sqrt(abar[1]) * x0) / math.sqrt(1 - abar[1])
    for t in range(1, steps):
        th.testing.assert_close(legacy[t], math.sqrt(abar[t + 1]) * x0 + math.sqrt(1 - abar[t + 1]) * eps_hat)
    noise_part = (legacy[-1] - math.sqrt(abar[steps]) * x0) / math.sqrt(1 - abar[steps])
    ratio = (noise_part * noise).sum() / (noise * noise).sum()
    assert ratio.item() == pytest.approx(math.sqrt(1 - abar[0]) / math.sqrt(1 - abar[1]), abs=1e-3)
    assert ratio.item() == pytest.approx(0.675, abs=0.01)
    assert (legacy[10] - correct[10]).abs().max() > 0.02


def test_ddim_encoding_deterministic_start():
    d = make_diffusion(respacing="ddim50")
    x0 = rand_images()
    lat = list(d.ddim_encode_latents(smooth_eps_model, x0, 3, clip_denoised=False))
    eps0 = smooth_eps_model(x0, th.zeros(3, dtype=th.long))  # model sees original t = 0
    th.testing.assert_close(lat[0], d.q_sample(x0, 0, eps0))
    eps1 = smooth_eps_model(lat[0], th.zeros(3, dtype=th.long))
    th.testing.assert_close(lat[1], d.ddim_reverse_step_from_eps(lat[0], 0, eps1))
    # same inputs -> same latents (no hidden randomness)
    lat2 = list(d.ddim_encode_latents(smooth_eps_model, x0, 3, clip_denoised=False))
    assert all(th.equal(a, b) for a, b in zip(lat, lat2))


def test_bad_inputs_raise_clear_errors():
    d = make_diffusion(steps=100)
    x = th.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(lambda x, t, **k: th.zeros(2, 3, 4, 4), x, 1)
    with pytest.raises(ValueError, match="t_start"):
        d.ddim_sample_loop(lambda x, t, **k: x, x.shape, t_start=100)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x, 1, th.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="num_steps"):
        list(d.ddim_encode_latents(lambda x, t, **k: x, x, 101))


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")
def test_cuda_guided_sampling_and_losses():
    dev = th.device("cuda")
    d = make_diffusion(respacing="ddim10", learn_sigma=True)
    model = RecordingCondModel(learn_sigma=True)
    y = th.tensor([0, 1], device=dev)
    x = d.ddim_sample_loop(model, (2, 1, 4, 4), model_kwargs={"y": y}, guidance_w=2.0, device=dev)
    assert x.device.type == "cuda" and th.isfinite(x).all()
    assert all(c["null"].device.type == "cuda" and c["t"].device.type == "cuda" for c in model.calls)
    t, w = create_named_schedule_sampler("uniform", d).sample(2, dev)
    losses = d.training_losses(model, x, t, model_kwargs={"y": y, "clf_free": True})
    assert losses["loss"].device.type == "cuda" and th.isfinite(losses["loss"]).all()
    lat = list(d.ddim_encode_latents(model, x.clamp(-1, 1), 3, model_kwargs={"y": y, "clf_free": True}))
    assert lat[-1].device.type == "cuda"
