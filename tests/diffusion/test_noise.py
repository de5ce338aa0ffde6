"""Simplex noise (AnoDDPM): upstream's field, statistics, determinism, devices, and its use by the diffusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import reference_path, requires_cuda
from guided_diffusion.diffusion import gaussian_diffusion as gd
from guided_diffusion.diffusion.noise import (
    SimplexNoise,
    fractal_simplex,
    gaussian_noise,
    make_noise_fn,
    opensimplex3,
    simplex_noise_like,
)


@pytest.fixture(scope="module")
def reference():
    return torch.load(reference_path("simplex.pt"), weights_only=True)


def test_opensimplex_reproduces_upstream_at_scattered_points(reference):
    points = reference["points"]
    xyz = points["xyz"]  # float64 [3000, 3] in [-12, 12]^3: every region and axis order of the lattice cells
    value = opensimplex3(xyz[:, 0][None], xyz[:, 1][None], xyz[:, 2][None], points["perm"][None])[0]
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, points["noise3"], rtol=0, atol=1e-12)


def test_fractal_field_reproduces_upstream_rand_3d_fixed_T_octaves(reference):
    for case in reference["fields"]:  # 128x128 (t=417), 40x56 (t=0), 33x17 (t=999); 6 octaves, 0.8, 64
        h, w = case["shape"]
        z = torch.tensor([float(case["t"])], dtype=torch.float64)
        field = fractal_simplex(h, w, case["perm"][None], z, octaves=case["octaves"],
                                persistence=case["persistence"], frequency=case["frequency"], dtype=torch.float64)
        torch.testing.assert_close(field[0], case["noise"], rtol=0, atol=1e-11)
        field32 = fractal_simplex(h, w, case["perm"][None], z.float())
        assert field32.dtype == torch.float32
        # float32 rounding can flip the original's (discontinuous) choice of extra lattice points near a few
        # cell boundaries: a tiny difference
        assert (field32[0].double() - case["noise"]).abs().max() < 5e-4


def test_octaves_are_the_weighted_sum_of_single_frequency_fields():
    perm = torch.stack([torch.randperm(256, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    z = torch.tensor([3.0, 10.0], dtype=torch.float64)
    total = fractal_simplex(16, 12, perm, z, dtype=torch.float64)
    expected = sum(0.8 ** k * fractal_simplex(16, 12, perm, z, octaves=1, frequency=64 / 2 ** k, dtype=torch.float64)
                   for k in range(6))
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-12)
    cols, rows = torch.meshgrid(torch.arange(12.0, dtype=torch.float64), torch.arange(16.0, dtype=torch.float64),
                                indexing="xy")
    one = opensimplex3((cols / 8)[None], (rows / 8)[None], torch.tensor(10.0 / 8, dtype=torch.float64), perm[1:])
    torch.testing.assert_close(fractal_simplex(16, 12, perm[1:], z[1:], octaves=1, frequency=8,
                                               dtype=torch.float64), one, rtol=0, atol=0)


@pytest.fixture(scope="module")
def fields():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 4, 128, 128)
    return simplex_noise_like(x, torch.randint(0, 1000, (16,), generator=g), generator=g)


def test_shape_mean_and_upstream_scale(fields):
    assert fields.shape == (16, 4, 128, 128) and fields.dtype == torch.float32
    per_field = fields.flatten(2)
    # 64 fields: the per-field mean has sd ~0.15, so the grand mean has a standard error ~0.02
    assert abs(fields.mean().item()) < 0.07
    std = per_field.std(-1)
    # upstream's unnormalised sum: std ~0.47 per 128^2 field (0.43-0.53 measured upstream), range ~ +-2
    assert 0.42 < std.mean().item() < 0.54
    assert std.min().item() > 0.3 and std.max().item() < 0.7
    assert 1.4 < fields.abs().max().item() < 2.6


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_spatial_correlation_is_strong_nearby_and_vanishes_far_away(fields):
    near = _corr(fields[..., :-1], fields[..., 1:])
    near_rows = _corr(fields[..., :-1, :], fields[..., 1:, :])
    far = _corr(fields[..., :-64], fields[..., 64:])
    gaussian = torch.randn(16, 4, 128, 128, generator=torch.Generator().manual_seed(1))
    assert near > 0.9 and near_rows > 0.9, (near, near_rows)
    assert abs(far) < 0.15, far
    assert abs(_corr(gaussian[..., :-1], gaussian[..., 1:])) < 0.01  # white noise: no correlation at all


def test_every_slice_and_channel_gets_its_own_field(fields):
    flat = fields.flatten(0, 1).flatten(1).double()
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    corr = flat @ flat.T / flat.shape[1]
    off_diagonal = corr[~torch.eye(corr.shape[0], dtype=torch.bool)]
    # independent fields of ~(128 / 32)^2 effective cells: |corr| well below 1 (identical fields give 1)
    assert off_diagonal.abs().max() < 0.8
    assert off_diagonal.abs().mean() < 0.2


def test_determinism_from_the_generator_and_the_global_rng():
    x = torch.zeros(2, 3, 24, 20)
    a = simplex_noise_like(x, generator=torch.Generator().manual_seed(5))
    b = simplex_noise_like(x, generator=torch.Generator().manual_seed(5))
    c = simplex_noise_like(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(9)
    d = SimplexNoise()(x, torch.tensor([1, 2]))
    torch.manual_seed(9)
    e = SimplexNoise()(x, torch.tensor([1, 2]))
    assert torch.equal(d, e)
    assert not torch.equal(SimplexNoise()(x), d)  # the global stream moved on: a fresh draw


def test_chunking_does_not_change_the_field():
    x = torch.zeros(3, 2, 16, 16)
    a = simplex_noise_like(x, generator=torch.Generator().manual_seed(2))
    b = simplex_noise_like(x, generator=torch.Generator().manual_seed(2), max_elements=300)  # one field a chunk
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_follows_the_input(dtype):
    x = torch.zeros(1, 2, 16, 16, dtype=dtype)
    out = simplex_noise_like(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.shape == x.shape
    ref = simplex_noise_like(x.float(), generator=torch.Generator().manual_seed(0))
    assert (out.double() - ref.double()).abs().max() < (1e-3 if dtype == torch.float64 else 2e-2)


@requires_cuda
@pytest.mark.cuda
def test_device_follows_the_input_on_cuda():
    x = torch.zeros(2, 4, 64, 64, device="cuda")
    out = simplex_noise_like(x, torch.tensor([3, 700], device="cuda"),
                             generator=torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda"
    perm = torch.stack([torch.randperm(256) for _ in range(2)])
    z = torch.tensor([3.0, 700.0])
    cpu = fractal_simplex(64, 64, perm, z, dtype=torch.float64)
    gpu = fractal_simplex(64, 64, perm.cuda(), z.cuda(), dtype=torch.float64)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="--noise_type 'foo' is not known; use one of gaussian, simplex"):
        make_noise_fn("foo")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        simplex_noise_like(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="t has 3 entries for a batch of 2"):
        simplex_noise_like(torch.zeros(2, 1, 8, 8), torch.arange(3))
    assert make_noise_fn("gaussian") is gaussian_noise


# -- in the diffusion --------------------------------------------------------------------------------------

def _diffusion(steps: int = 100) -> gd.GaussianDiffusion:
    return gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("linear", steps),
                                model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)


class Recorder(torch.nn.Module):
    """Returns a constant output and remembers its inputs."""

    def __init__(self, value: float = 0.25):
        super().__init__()
        self.value, self.inputs = value, []

    def forward(self, x, t, **kwargs):
        self.inputs.append((x.clone(), t.clone()))
        return torch.full_like(x, self.value)


def test_training_losses_use_one_simplex_draw_for_x_t_and_the_target():
    diffusion, model = _diffusion(100), Recorder(0.25)
    x0 = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0, 40, 99])
    losses = diffusion.training_losses(model, x0, t, noise_fn=SimplexNoise(generator=torch.Generator().manual_seed(3)))
    noise = simplex_noise_like(x0, t, generator=torch.Generator().manual_seed(3))  # the same draw, again
    betas = np.linspace(1e-4 * 10, 0.02 * 10, 100)  # linear schedule for T=100 (scaled by 1000 / T)
    abar = torch.tensor(np.cumprod(1 - betas)[t.numpy()]).float().reshape(-1, 1, 1, 1)
    x_t, t_seen = model.inputs[0]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-6)
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(losses["mse"], ((noise - 0.25) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
    assert 0.1 < noise.std() < 0.8  # it really was simplex noise, not N(0, 1)


def test_sampling_loops_draw_the_start_and_step_noise_from_noise_fn():
    diffusion = _diffusion(50)
    calls = []

    def noise_fn(x, t):
        calls.append(t.clone())
        return torch.full_like(x, 0.5)

    model = Recorder(0.0)
    out = diffusion.p_sample_loop(model, (2, 1, 4, 4), noise_fn=noise_fn, t_start=4)
    assert [c.tolist() for c in calls] == [[4, 4], [4, 4], [3, 3], [2, 2], [1, 1], [0, 0]]  # start, then each step
    first_input = model.inputs[0][0]
    assert torch.equal(first_input, torch.full((2, 1, 4, 4), 0.5))
    # eps = 0: each step is mean(x) + sigma * 0.5, reproduce the chain by hand
    x = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    var = np.append(diffusion.posterior_variance[1], diffusion.betas[1:])
    for t in range(4, -1, -1):
        x0 = (x / np.sqrt(diffusion.alphas_cumprod[t])).clamp(-1, 1)
        mean = diffusion.posterior_mean_coef1[t] * x0 + diffusion.posterior_mean_coef2[t] * x
        x = mean + (np.sqrt(var[t]) * 0.5 if t > 0 else 0.0)
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-6)
    calls.clear()
    diffusion.ddim_sample_loop(model, (2, 1, 4, 4), noise_fn=noise_fn, eta=0.0)
    assert len(calls) == 1 and calls[0].tolist() == [49, 49]  # eta = 0: only the start latent
    calls.clear()
    diffusion.ddim_sample_loop(model, (2, 1, 4, 4), noise_fn=noise_fn, eta=1.0, t_start=2)
    assert len(calls) == 4  # start + one per step
