"""A microbatched training step equals the full-batch step, and both equal the loss written out here.

t, the importance weights and the noise are made identical by construction: a schedule sampler that hands out a
fixed list of (t, weight) row by row, and a diffusion whose noise is a fixed function of each row. Dropout is off.
"""

import copy

import numpy as np
import torch

from guided_diffusion.diffusion.resample import ScheduleSampler
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from guided_diffusion.training.train_util import TrainLoop

N = 6
T_ROWS = [5, 50, 93, 17, 71, 0]
W_ROWS = [1.0, 0.5, 2.0, 1.5, 0.25, 1.0]  # unequal importance weights, so a per-row mix-up shows


class RowSampler(ScheduleSampler):
    """Hands out T_ROWS / W_ROWS in order, restarting after N rows (one training step)."""

    def __init__(self, num_timesteps):
        self.num_timesteps, self.cursor = num_timesteps, 0

    def weights(self):
        return np.ones(self.num_timesteps)

    def sample(self, batch_size, device):
        rows = [(self.cursor + i) % N for i in range(batch_size)]
        self.cursor = (self.cursor + batch_size) % N
        return (torch.tensor([T_ROWS[r] for r in rows], device=device),
                torch.tensor([W_ROWS[r] for r in rows], dtype=torch.float32, device=device))


def planted_noise(x):
    return 1.5 * torch.sin(13.7 * x + 0.3)  # per row a fixed function of that row's image


class PlantedNoiseDiffusion:
    """The real diffusion, with its training noise replaced by ``planted_noise``."""

    def __init__(self, base):
        self.base, self.num_timesteps = base, base.num_timesteps

    def training_losses(self, model, x_start, t, model_kwargs=None, **_noise_fn):
        return self.base.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=planted_noise(x_start))


def _setup():
    torch.manual_seed(0)
    model = create_model(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                         attention_resolutions="8", in_channels=1, class_cond=True, num_classes=2, dropout=0.0)
    with torch.no_grad():  # make the zero-initialised output layers matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    diffusion = create_gaussian_diffusion(steps=100)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, 1, 16, 16, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    return model, diffusion, x, y


def _reference_grads(model, diffusion, x, y):
    """d/dθ of mean_i w_i · mean_chw (eps_i - eps_θ(sqrt(abar_t) x_i + sqrt(1 - abar_t) eps_i, t_i, y_i))²."""
    model = copy.deepcopy(model).train()
    t = torch.tensor(T_ROWS)
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t][:, None, None, None]
    eps = planted_noise(x)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
    pred = model(x_t, t, y=y, clf_free=True)  # conditional prediction: label dropout off
    loss = (torch.tensor(W_ROWS) * ((eps - pred) ** 2).mean((1, 2, 3))).mean()
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _loop_step(model, diffusion, x, y, microbatch):
    model = copy.deepcopy(model).train()
    loop = TrainLoop(model=model, diffusion=PlantedNoiseDiffusion(diffusion), data=[], batch_size=N, lr=1e-3,
                     microbatch=microbatch, schedule_sampler=RowSampler(diffusion.num_timesteps),
                     threshold=1e-9, progress=False)  # a label is dropped with probability 1e-9 (float32: 2^-24)
    loop.run_step(x, {"y": y})
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    return grads, [p.detach().clone() for p in model.parameters()]


def test_microbatched_step_equals_full_batch_step_and_the_written_out_loss():
    model, diffusion, x, y = _setup()
    ref = _reference_grads(model, diffusion, x, y)
    assert sum(float(g.abs().sum()) for g in ref) > 0
    results = {m: _loop_step(model, diffusion, x, y, m) for m in (-1, 4, 1)}  # 6; 4 + 2 (unequal); 6 x 1
    for m, (grads, _) in results.items():
        assert len(grads) == len(ref)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=lambda s: f"microbatch {m}: {s}")
    before = [p.detach() for p in model.parameters()]
    full_weights = results[-1][1]
    assert any(not torch.equal(a, b) for a, b in zip(full_weights, before))  # the step did move the weights
    # AdamW's first step is lr * g / (|g| + 1e-8): ill-conditioned where |g| ~ 1e-8, so compare the weights where
    # the gradient is clearly larger (the gradient comparison above is the sharp test: Adam's normalisation would
    # even hide a wrong overall scale)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(full_weights) == len(trainable)
    for m in (4, 1):
        for a, b, g in zip(results[m][1], full_weights, ref):
            sure = g.abs() > 1e-5
            torch.testing.assert_close(a[sure], b[sure], rtol=0, atol=1e-7)


def test_microbatch_larger_than_the_batch_is_one_forward():
    model, diffusion, x, y = _setup()
    grads, _ = _loop_step(model, diffusion, x, y, 64)
    for g, r in zip(grads, _reference_grads(model, diffusion, x, y)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
