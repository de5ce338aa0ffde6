"""Training objectives on the shared TrainLoop: the noisy-image classifier (with a stand-in classifier) and the
diffusion objective with simplex noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from guided_diffusion import logger
from guided_diffusion.diffusion import gaussian_diffusion as gd
from guided_diffusion.diffusion.noise import SimplexNoise, simplex_noise_like
from guided_diffusion.training.objectives import ClassifierObjective, DiffusionObjective, StepLosses
from guided_diffusion.training.train_util import TrainLoop, get_rng_state
from test_train import FixedT, assert_identical


class TinyClassifier(nn.Module):
    """A stand-in noisy-image classifier: classifier(x, timesteps) -> logits."""

    def __init__(self, in_channels: int = 2, classes: int = 2, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.time = nn.Embedding(1000, 8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, classes)

    def forward(self, x, timesteps):
        h = F.silu(self.conv(x) + self.time(timesteps.long())[:, :, None, None]).mean(dim=(2, 3))
        return self.head(self.drop(h))


def diffusion(steps: int = 1000) -> gd.GaussianDiffusion:
    return gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("linear", steps),
                                model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)


def labelled_slices(n: int, seed: int = 0):
    """Class 1 slices carry a bright square (a 'lesion'); class 0 are plain noise images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 16, 16, generator=g) * 2 - 1
    y = torch.arange(n) % 2
    x[y == 1, :, 4:12, 4:12] = 1.0
    return x, y


@pytest.fixture
def logdir(tmp_path):
    logger.configure(str(tmp_path / "log"), format_strs=["csv"])
    yield tmp_path / "log"
    logger.reset()


def fixed_batch_ce(model, diff, x, y, t, noise) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(diff.q_sample(x, t, noise), t)
    model.train()
    return F.cross_entropy(logits, y).item()


def test_classifier_objective_is_the_cross_entropy_of_the_noised_input():
    diff, model = diffusion(), TinyClassifier()
    x, y = labelled_slices(4)
    t = torch.tensor([0, 10, 500, 999])
    objective = ClassifierObjective(diff, FixedT(t))
    torch.manual_seed(3)
    out = objective(model, x, {"y": y})
    torch.manual_seed(3)
    noise = torch.randn_like(x)  # q_sample's draw, again
    abar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]).float().reshape(-1, 1, 1, 1)
    logits = model(abar.sqrt() * x + (1 - abar).sqrt() * noise, t)
    expected = -torch.log_softmax(logits, dim=-1)[torch.arange(4), y]
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.metrics["acc"], (logits.argmax(-1) == y).float())
    assert torch.equal(out.t, t)
    clean = ClassifierObjective(diff, noised=False)(model, x, {"y": y})
    torch.testing.assert_close(clean.loss, F.cross_entropy(model(x, torch.zeros(4, dtype=torch.long)), y,
                                                           reduction="none"))
    assert clean.t is None
    with pytest.raises(ValueError, match="label 2 out of range for a classifier with 2 outputs"):
        objective(model, x, {"y": torch.tensor([0, 1, 2, 0])})
    with pytest.raises(ValueError, match="needs slice labels"):
        objective(model, x, {})


def test_classifier_loss_falls_on_a_fixed_batch_and_accuracy_is_logged(logdir):
    torch.manual_seed(0)
    diff, model = diffusion(), TinyClassifier()
    x, y = labelled_slices(8)
    t = torch.tensor([5, 50, 100, 200, 5, 50, 100, 200])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    before = fixed_batch_ce(model, diff, x, y, t, noise)
    val = [(x, torch.zeros(8, 1, 16, 16), y)]  # val loader layout: (x, mask, label)
    loop = TrainLoop(model=model, objective=ClassifierObjective(diff, FixedT(t)), data=[(x, {"y": y})],
                     batch_size=8, lr=1e-2, ema_rate="", total_epochs=40, log_interval=10, save_interval=1000,
                     val_data=val, eval_interval=20, progress=False)
    assert loop.run_loop() == 40
    after = fixed_batch_ce(model, diff, x, y, t, noise)
    assert before > 0.6 and after < 0.5 * before, (before, after)  # ln 2 = 0.69 at chance
    rows = [r.split(",") for r in (logdir / "progress.csv").read_text().splitlines()]
    header, last = rows[0], dict(zip(rows[0], rows[-1]))
    assert {"loss", "acc", "loss_q0", "acc_q0", "grad_norm", "val_loss", "val_acc"} <= set(header)
    assert float(last["acc"]) > 0.9
    # validation at step 40 used the final model on the val batch with t and noise drawn from a generator
    # seeded seed + 17 (rank 0): recompute it by hand
    g = torch.Generator().manual_seed(17)
    t_val = torch.randint(0, 1000, (8,), generator=g)
    x_val = diff.q_sample(x, t_val, torch.randn(x.shape, generator=g))
    model.eval()
    with torch.no_grad():
        logits = model(x_val, t_val)
    assert float(last["val_loss"]) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert float(last["val_acc"]) == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert not list(logdir.glob("ema_*"))  # no EMA for the classifier (upstream has none)
    assert (logdir / "model000040.pt").exists() and (logdir / "opt000040.pt").exists()


class RecordingObjective(ClassifierObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def __call__(self, model, x, cond):
        self.seen.append(x[:, 0, 0, 0].round().long().tolist())
        return super().__call__(model, x, cond)


def id_loader(n: int, batch: int, seed: int = 0):
    x, y = labelled_slices(n)
    x[:, 0, 0, 0] = torch.arange(n).float()  # each slice carries its id
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                        collate_fn=lambda rows: (torch.stack([r[0] for r in rows]), {"y": torch.stack([r[1] for r in rows])}))
    return loader, sampler


def test_classifier_data_order_advances_every_step_and_epoch(logdir):
    loader, sampler = id_loader(12, 3)
    objective = RecordingObjective(diffusion())
    loop = TrainLoop(model=TinyClassifier(), objective=objective, data=loader, data_sampler=sampler, batch_size=3,
                     lr=1e-3, ema_rate="", total_epochs=3, save_interval=1000, progress=False)
    assert loop.run_loop() == 12
    batches = objective.seen
    assert all(a != b for a, b in zip(batches, batches[1:]))  # upstream: the same first batch every step
    epochs = [sum(batches[i: i + 4], []) for i in range(0, 12, 4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))  # every slice exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch


def test_classifier_training_resumes_exactly(tmp_path):
    def run(folder, max_steps, resume=""):
        logger.configure(str(folder), format_strs=["csv"])
        torch.manual_seed(0)
        model = TinyClassifier(dropout=0.3)  # dropout and the noise make the RNG streams matter
        loader, sampler = id_loader(6, 2)
        loop = TrainLoop(model=model, objective=ClassifierObjective(diffusion()), data=loader, data_sampler=sampler,
                         batch_size=2, lr=1e-3, ema_rate="", total_epochs=10, max_steps=max_steps, save_interval=2,
                         resume_checkpoint=resume, seed=4, progress=False)
        loop.run_loop()
        return loop, get_rng_state(torch.device("cpu")), torch.randn(3)

    full, full_rng, full_next = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2)
    resumed, resumed_rng, resumed_next = run(tmp_path / "b", 5, resume=str(tmp_path / "b" / "model000002.pt"))
    logger.reset()
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (full.step, full.epoch, full.batch_in_epoch) == (5, 1, 2)
    a, b = full.state_dicts(), resumed.state_dicts()
    assert set(a) == {"model", "opt"}
    for key in a:
        assert_identical(a[key], b[key], key)
    assert_identical(full_rng, resumed_rng, "rng")
    assert torch.equal(full_next, resumed_next)


def test_diffusion_objective_with_simplex_noise_trains_on_simplex_targets(logdir):
    diff = diffusion(100)
    seen = {}

    class Eps(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            seen["x_t"], seen["t"] = x.detach().clone(), t.clone()
            return self.scale * x

    x0 = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([30, 90])
    objective = DiffusionObjective(diff, FixedT(t), noise_fn=SimplexNoise(generator=torch.Generator().manual_seed(7)))
    out = objective(Eps(), x0, {})
    noise = simplex_noise_like(x0, t, generator=torch.Generator().manual_seed(7))
    abar = torch.tensor(np.cumprod(1 - np.linspace(1e-3, 0.2, 100))[t.numpy()]).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, (noise ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)  # output 0
    assert isinstance(out, StepLosses) and torch.equal(out.t, t)
    # through the loop: a learnable scale on x_t fits the simplex eps better than 0 (loss falls)
    loop = TrainLoop(model=Eps(), objective=DiffusionObjective(diff, FixedT(t), noise_fn=SimplexNoise()),
                     data=[(x0, {})], batch_size=2, lr=0.05, total_epochs=30, log_interval=30, save_interval=1000,
                     progress=False)
    loop.run_loop()
    rows = [r.split(",") for r in (logdir / "progress.csv").read_text().splitlines()]
    assert float(dict(zip(rows[0], rows[-1]))["loss"]) < 0.9 * (noise ** 2).mean().item()


def test_objective_and_diffusion_together_is_an_error():
    with pytest.raises(ValueError, match="pass diffusion/schedule_sampler/threshold to the objective"):
        TrainLoop(model=TinyClassifier(), diffusion=diffusion(), objective=ClassifierObjective(diffusion()),
                  data=[], batch_size=1, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="needs a diffusion"):
        TrainLoop(model=TinyClassifier(), data=[], batch_size=1, lr=1e-3, progress=False)


def _classifier_ddp_worker(rank: int, port: int, folder: str) -> None:
    import json
    import os

    from guided_diffusion import dist_util
    from guided_diffusion.script_util import classifier_and_diffusion_defaults, create_classifier_and_diffusion

    from two_processes import gloo_group

    with gloo_group(rank, port, folder):
        torch.manual_seed(rank)  # different initial weights: the loop must sync them
        model, diff = create_classifier_and_diffusion(**dict(
            classifier_and_diffusion_defaults(), image_size=32, in_channels=2, classifier_width=32,
            classifier_depth=1, classifier_attention_resolutions="8"))
        x, y = labelled_slices(8)
        dataset = TensorDataset(torch.nn.functional.interpolate(x, size=32), y)
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, drop_last=True,
                            collate_fn=lambda rows: (torch.stack([r[0] for r in rows]),
                                                     {"y": torch.stack([r[1] for r in rows])}))
        val = [(torch.nn.functional.interpolate(x[rank::2], size=32), torch.zeros(4), y[rank::2])]
        loop = TrainLoop(model=model, objective=ClassifierObjective(diff), data=loader, data_sampler=sampler,
                         batch_size=4, lr=1e-3, ema_rate="", max_steps=2, total_epochs=5, save_interval=2,
                         log_interval=1, val_data=val, eval_interval=2, progress=False)
        loop.run_loop()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        val_here = loop.validate()
        gathered = dist_util.gather_objects((flat, val_here, loop.ddp_model.find_unused_parameters))
        if rank == 0:
            with open(os.path.join(folder, "result.json"), "w") as f:
                json.dump({"same_weights": all(torch.equal(g[0], gathered[0][0]) for g in gathered),
                           "val": [g[1] for g in gathered], "find_unused": gathered[0][2]}, f)


def test_classifier_on_two_gloo_processes(tmp_path):
    import json

    import torch.multiprocessing as mp

    from two_processes import free_port

    mp.spawn(_classifier_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["same_weights"]
    assert result["find_unused"] is False  # every classifier parameter gets a gradient
    val0, val1 = result["val"]
    assert val0 == val1 and set(val0) == {"val_loss", "val_acc"}  # averaged over both ranks' shards
    assert (tmp_path / "log" / "model000002.pt").exists()


def test_simplex_diffusion_training_resumes_exactly(tmp_path):
    class TinyEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.drop = nn.Dropout(0.3)

        def forward(self, x, t, **labels):  # labels (y, threshold) ignored
            return self.drop(self.conv(x)) * (1 + t[:, None, None, None].float() / 1000)

    def run(folder, max_steps, resume=""):
        logger.configure(str(folder), format_strs=["csv"])
        torch.manual_seed(0)
        loader, sampler = id_loader(6, 2)
        loop = TrainLoop(model=TinyEps(), objective=DiffusionObjective(diffusion(), noise_fn=SimplexNoise()),
                         data=loader, data_sampler=sampler, batch_size=2, lr=1e-3, ema_rate="0.9", total_epochs=10,
                         max_steps=max_steps, save_interval=2, resume_checkpoint=resume, seed=4, progress=False)
        loop.run_loop()
        return loop, get_rng_state(torch.device("cpu"))

    full, full_rng = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2)
    resumed, resumed_rng = run(tmp_path / "b", 5, resume=str(tmp_path / "b" / "model000002.pt"))
    logger.reset()
    a, b = full.state_dicts(), resumed.state_dicts()
    for key in a:
        assert_identical(a[key], b[key], key)
    assert_identical(full_rng, resumed_rng, "rng")
