"""Training loop, dist_util, logger and train.py flags on CPU with tiny models (seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from guided_diffusion import dist_util, fileio, logger
from guided_diffusion.diffusion.resample import ScheduleSampler
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.training.objectives import StepLosses, TrainingObjective
from guided_diffusion.training.train_util import TrainLoop, get_rng_state, iterate_from, parse_ema_rates, parse_resume_step

REPO = Path(__file__).resolve().parents[2]
from guided_diffusion.commands import train as train_script  # noqa: E402
from two_processes import free_port, gloo_group

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8",
            channel_mult="1,1,1,2", in_channels=4, num_classes=2)


def tiny_model(unet_ver: str = "v2", seed: int = 0, class_cond: bool = True, **overrides):
    flags = model_and_diffusion_defaults()
    flags.update(TINY, unet_ver=unet_ver, use_hae=unet_ver != "v2", class_cond=class_cond, **overrides)
    torch.manual_seed(seed)
    return create_model_and_diffusion(**flags)


def collate(rows):
    x, y = zip(*rows)
    return torch.stack(x), {"y": torch.stack(y)}


def tiny_loader(n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, 4, 32, 32, generator=g) * 2 - 1
    y = torch.arange(n) % 2
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler, collate_fn=collate, drop_last=True), sampler


class FixedT(ScheduleSampler):
    """Always the same timesteps, so the loss on a fixed batch is comparable across steps."""

    def __init__(self, t):
        self.t = torch.as_tensor(t)

    def weights(self):
        return np.ones(1000)

    def sample(self, batch_size, device):
        return self.t[:batch_size].to(device), torch.ones(batch_size, device=device)


@pytest.fixture
def logdir(tmp_path):
    logger.configure(str(tmp_path / "log"), format_strs=["log", "csv"])
    yield tmp_path / "log"
    logger.reset()


def fixed_batch_loss(model, diffusion, x, y, t, noise) -> float:
    model.eval()
    with torch.no_grad():
        eps = model(diffusion.q_sample(x, t, noise), t, y=y, clf_free=True)
    model.train()
    return torch.mean((eps - noise) ** 2).item()


@pytest.mark.parametrize("unet_ver", ["v2", "hae_v2_conservative"])
def test_few_steps_lower_the_loss_on_a_fixed_batch(logdir, unet_ver):
    model, diffusion = tiny_model(unet_ver)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 4, 32, 32, generator=g) * 2 - 1
    y = torch.tensor([0, 1])
    t = torch.tensor([500, 800])
    noise = torch.randn(x.shape, generator=g)
    before = fixed_batch_loss(model, diffusion, x, y, t, noise)
    loop = TrainLoop(model=model, diffusion=diffusion, data=[(x, {"y": y})], batch_size=2, lr=3e-3,
                     threshold=0.1, total_epochs=3, log_interval=3, save_interval=1000,
                     schedule_sampler=FixedT(t), progress=False)
    assert loop.run_loop() == 3
    after = fixed_batch_loss(model, diffusion, x, y, t, noise)
    assert after < 0.8 * before, (before, after)
    rows = (logdir / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"step", "samples", "loss", "mse", "grad_norm", "param_norm"} <= set(header)
    assert rows[-1].split(",")[header.index("samples")] == "6"
    assert (logdir / "model000003.pt").exists() and (logdir / "ema_0.9999_000003.pt").exists()  # final save


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in [k] + _flatten(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten(v)]
    return [obj]


def assert_identical(a, b, what):
    fa, fb = _flatten(a), _flatten(b)
    assert len(fa) == len(fb), what
    for u, v in zip(fa, fb):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v), what
        else:
            assert u == v, what


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    def run(folder, max_steps, resume=""):
        logger.configure(str(folder), format_strs=["csv"])
        model, diffusion = tiny_model("v2", dropout=0.1)  # dropout and label drops make the RNG matter
        loader, sampler = tiny_loader(6, 2)  # 3 batches per epoch, shuffled per epoch
        loop = TrainLoop(model=model, diffusion=diffusion, data=loader, data_sampler=sampler, batch_size=2,
                         lr=1e-3, ema_rate="0.9,0.99", threshold=0.5, total_epochs=10, max_steps=max_steps,
                         save_interval=1, log_interval=100, resume_checkpoint=resume, seed=5, progress=False)
        loop.run_loop()
        return loop, get_rng_state(torch.device("cpu")), torch.randn(3)

    full, full_rng, full_next = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, resumed_rng, resumed_next = run(tmp_path / "b", 2, resume=str(tmp_path / "b" / "model000001.pt"))
    logger.reset()
    # step 2 must use the second batch of the epoch's shuffled order (a restarted epoch would reuse the first)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (full.step, full.epoch, full.batch_in_epoch) == (2, 0, 2)
    a, b = full.state_dicts(), resumed.state_dicts()
    assert set(a) == {"model", "opt", "ema_0.9", "ema_0.99"}
    for key in a:
        assert_identical(a[key], b[key], key)
    assert_identical(full_rng, resumed_rng, "rng")
    assert torch.equal(full_next, resumed_next)
    state = torch.load(tmp_path / "b" / "state000001.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["world_size"]) == (1, 0, 1, 1)
    # the files on disk are plain state_dicts that load strictly into a fresh model
    model, _ = tiny_model("v2", dropout=0.1)
    model.load_state_dict(torch.load(tmp_path / "b" / "ema_0.99_000002.pt", weights_only=True))
    assert not [f for f in os.listdir(tmp_path / "b") if fileio.is_temp_name(f)]  # no partial file left


def test_compiled_training_steps_equal_eager_ones(logdir, monkeypatch):
    """TrainLoop(compile=True) runs the step through torch.compile: the same weights after two steps (dropout and
    label drops included). The eager backend keeps the test fast: dynamo traces the step as for inductor."""
    real_compile = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or real_compile(module, backend="eager"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 4, 32, 32, generator=g) * 2 - 1, torch.tensor([0, 1])
    states = []
    for compile in (False, True):
        model, diffusion = tiny_model("hae_v2_conservative", dropout=0.1)
        loop = TrainLoop(model=model, diffusion=diffusion, data=[(x, {"y": y})], batch_size=2, lr=1e-3,
                         threshold=0.5, total_epochs=2, save_interval=1000, seed=3, progress=False, compile=compile)
        torch._dynamo.reset()
        assert loop.run_loop() == 2
        states.append(loop.state_dicts()["model"])
    torch._dynamo.reset()
    assert compiled == [model]
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_iterate_from_skips_batches_without_changing_the_order():
    loader, sampler = tiny_loader(10, 2)
    sampler.set_epoch(3)
    full = [b[1]["y"].tolist() + [b[0][0, 0, 0, 0].item()] for b in loader]
    sampler.set_epoch(3)
    tail = [b[1]["y"].tolist() + [b[0][0, 0, 0, 0].item()] for b in iterate_from(loader, 3)]
    assert tail == full[3:] and len(full) == 5
    assert [b for b in iterate_from([1, 2, 3], 2)] == [3]


def test_non_finite_loss_stops_with_a_clear_message(logdir):
    model, diffusion = tiny_model("v2")
    x = torch.full((2, 4, 32, 32), float("nan"))
    loop = TrainLoop(model=model, diffusion=diffusion, data=[(x, {"y": torch.tensor([0, 1])})], batch_size=2,
                     lr=1e-3, threshold=0.1, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 1"):
        loop.run_loop()


def test_preview_grids_and_microbatches(logdir):
    model, diffusion = tiny_model("v2")
    x = torch.rand(4, 4, 32, 32) * 2 - 1
    loop = TrainLoop(model=model, diffusion=diffusion, data=[(x, {"y": torch.tensor([0, 1, 0, 1])})],
                     batch_size=4, microbatch=3, lr=1e-3, threshold=0.1, total_epochs=1, save_interval=1,
                     w=[0.0, 2.0], sample_shape=(2, 4, 32, 32), preview_steps=3, progress=False)
    loop.run_loop()
    from PIL import Image

    names = sorted(os.listdir(logdir / "images"))
    assert names == ["000001_0.0.png", "000001_2.0.png", "real_data_train.png"]
    img = Image.open(logdir / "images" / "000001_2.0.png")
    assert img.size == (4 * 34 + 2, 2 * 34 + 2)  # one row per sample, one tile per modality


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_with_gradient_clipping(logdir, precision):
    model, diffusion = tiny_model("v2")
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    loop = TrainLoop(model=model, diffusion=diffusion, data=[(x, {"y": torch.tensor([0, 1])})], batch_size=2,
                     lr=1e-3, threshold=0.1, precision=precision, grad_clip=0.05, log_interval=1,
                     save_interval=100, progress=False)
    assert loop.run_loop() == 1
    params = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    # the gradients left from the step were clipped to the global norm 0.05 (logged grad_norm is before clipping)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    assert clipped <= 0.05 * 1.001
    header, row = (logdir / "progress.csv").read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(",")))
    assert float(values["grad_norm"]) > 0.05
    assert ("lg_loss_scale" in values) == (precision == "fp16")


class _RecordingObjective(TrainingObjective):
    """Squared error of a linear model; records the parameters each step starts from."""

    def __init__(self):
        self.seen = []

    def __call__(self, model, x, cond):
        self.seen.append([p.detach().double().clone() for p in model.parameters()])
        return StepLosses(loss=((model(x) - cond["target"]) ** 2).mean(1), metrics={})


def test_ema_after_several_steps_at_two_rates_equals_the_average_written_out(logdir):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g), {"target": torch.randn(4, 2, generator=g)}) for _ in range(5)]
    objective = _RecordingObjective()
    loop = TrainLoop(model=model, objective=objective, data=data, batch_size=4, lr=0.05, ema_rate="0.5,0.9",
                     total_epochs=1, log_interval=100, save_interval=100, progress=False)
    assert loop.run_loop() == 5
    params = objective.seen[1:] + [[p.detach().double() for p in model.parameters()]]  # after steps 1..5
    for k, rate in enumerate((0.5, 0.9)):
        ema = objective.seen[0]  # the initial weights
        for p in params:  # ema_k = rate * ema_{k-1} + (1 - rate) * param_k
            ema = [rate * e + (1 - rate) * q for e, q in zip(ema, p)]
        saved = torch.load(logdir / f"ema_{rate}_000005.pt", weights_only=True)
        for name, e, got in zip(("weight", "bias"), ema, loop.ema_params[k]):
            torch.testing.assert_close(got.double(), e, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(saved[name].double(), e, rtol=1e-6, atol=1e-7)
    # the steps moved the weights well beyond the tolerance, and the two rates lag behind them differently
    final = params[-1][0]
    assert (final - objective.seen[0][0]).abs().max() > 0.1
    assert (loop.ema_params[0][0].double() - loop.ema_params[1][0].double()).abs().max() > 0.05


def test_ema_rates_and_checkpoint_names():
    assert parse_ema_rates("0.999,0.9999") == [0.999, 0.9999]
    assert parse_resume_step("/x/model012345.pt") == 12345
    with pytest.raises(ValueError, match="ema_rate"):
        parse_ema_rates("0.9,fast")
    with pytest.raises(ValueError, match="model005000.pt"):
        parse_resume_step("/x/ema_0.9999_005000.pt")


# -- train.py flags ------------------------------------------------------------------------------

def cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        train_script.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--unet_ver", "v3"], "--unet_ver: invalid choice: 'v3' (choose from 'v2', 'hae', 'hae_lite', "
                               "'hae_v2', 'hae_v2_conservative', 'v1')"),
        (["--data_dir", ""], "--data_dir is required"),
        (["--data_dir", "/nonexistent/data"], "--data_dir /nonexistent/data does not exist"),
        (["--w", "1", "two"], "argument --w: invalid value 'two'"),
        (["--threshold", "-1"], "needs 0 < threshold <= 1"),
        (["--sample_shape", "12", "3", "32", "32"], "must match the model's 4 channels and 32 px"),
        (["--precision", "fp8"], "--precision: invalid choice: 'fp8' (choose from 'fp32', 'bf16', 'fp16')"),
        (["--ema_rate", "1.5"], "--ema_rate values must lie in [0, 1)"),
        (["--noise_type", "perlin"], "--noise_type: invalid choice: 'perlin' (choose from 'gaussian', 'simplex')"),
    ],
)
def test_bad_flags_give_clear_errors(capsys, tmp_path, extra, message):
    argv = ["--data_dir", str(tmp_path), "--in_channels", "4", "--image_size", "32"] + extra
    assert message in cli_error(capsys, argv)


def test_flag_parsing_and_normalisation(tmp_path):
    settings, _ = train_script.parse(["--data_dir", str(tmp_path), "--w", "1", "1.8,2", "3", "--use_fp16", "True",
                                      "--in_channels", "4", "--image_size", "128", "--batch_size", "28"], world=2)
    assert settings.training.w == [1.0, 1.8, 2.0, 3.0]
    assert settings.loop.precision == "fp16" and settings.model.use_fp16 is False
    assert settings.sample_shape == [12, 4, 128, 128]
    assert settings.model.class_cond is True and settings.label_drop == 0.1
    with pytest.raises(ValueError, match="--batch_size 28 .* multiple of the number of processes \\(3\\)"):
        train_script.parse(["--data_dir", str(tmp_path), "--batch_size", "28", "--in_channels", "4",
                            "--image_size", "128"], world=3)


# -- two processes, gloo ---------------------------------------------------------------------------

def _two_process_worker(rank: int, port: int, folder: str) -> None:
    with gloo_group(rank, port, folder):
        result = {}
        for name, class_cond in (("cond", True), ("uncond", False)):
            model, diffusion = tiny_model("v2", seed=rank, class_cond=class_cond)  # different inits: DDP syncs
            loader, sampler = tiny_loader(8, 2, rank=rank, world=2)
            if not class_cond:
                loader = [(x, {}) for x, _ in loader]
            loop = TrainLoop(model=model, diffusion=diffusion, data=loader, data_sampler=sampler, batch_size=4,
                             lr=1e-3, threshold=0.1, max_steps=2, total_epochs=5, save_interval=2,
                             log_interval=1, progress=False)
            loop.run_loop()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            ema = torch.cat([e.flatten() for e in loop.ema_params[0]])
            gathered = dist_util.gather_objects((flat, ema, get_rng_state(dist_util.dev())["torch"]))
            if rank == 0:
                result[name] = {
                    "same_weights": all(torch.equal(g[0], gathered[0][0]) for g in gathered),
                    "same_ema": all(torch.equal(g[1], gathered[0][1]) for g in gathered),
                    "different_rng": not torch.equal(gathered[0][2], gathered[1][2]),
                    "find_unused": loop.ddp_model.find_unused_parameters,
                    "steps": loop.step,
                }
        if rank == 0:
            with open(os.path.join(folder, "result.json"), "w") as f:
                json.dump(result, f)


def test_two_gloo_processes_train_and_hold_identical_weights(tmp_path):
    mp.spawn(_two_process_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    for name in ("cond", "uncond"):
        assert result[name]["same_weights"] and result[name]["same_ema"], name
        assert result[name]["different_rng"], name  # ranks draw their own noise / t / label drops
        assert result[name]["steps"] == 2
    assert result["cond"]["find_unused"] is False
    assert result["uncond"]["find_unused"] is True  # the class-conditioning attention inputs get no gradient
    written = sorted(os.listdir(tmp_path / "log"))
    assert "model000002.pt" in written and not [f for f in written if "rank" in f]
    rows = (tmp_path / "log" / "progress.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,grad_norm,loss") and len(rows) == 5  # header + 2 steps × 2 models


def test_mpi_launch_without_mpi4py_is_a_clear_error(monkeypatch):
    pytest.importorskip("torch.distributed")
    try:
        import mpi4py  # noqa: F401
        pytest.skip("mpi4py is installed: the MPI path would really start")
    except ImportError:
        pass
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MPI launcher .* mpi4py is not installed"):
        dist_util.setup_dist()


# -- dist_util / logger without a process group ----------------------------------------------------

def test_single_process_dist_util_and_logger(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist_util.setup_dist()
    assert (dist_util.get_rank(), dist_util.get_world_size(), dist_util.is_main_process()) == (0, 1, True)
    assert dist_util.gather_objects({"a": 1}) == [{"a": 1}]
    assert dist_util.dev().type == ("cuda" if torch.cuda.is_available() else "cpu")
    dist_util.barrier()
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    logger.configure(format_strs=["log", "csv"])
    logger.logkv("step", 1)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    logger.dumpkvs()
    logger.logkv("step", 2)
    logger.logkv("extra", 0.5)
    logger.dumpkvs()
    logger.log("hello")
    logger.reset()
    csv = (tmp_path / "run" / "progress.csv").read_text().splitlines()
    assert csv == ["loss,step,extra", "1.5,1,", ",2,0.5"]
    assert "hello" in (tmp_path / "run" / "log.txt").read_text()


# -- end to end: train.py and the config scripts on a tiny on-disk data set -------------------------

def write_npz_dataset(root: Path, patients: int = 2, slices: int = 3, size: int = 32, channels: int = 4) -> Path:
    """The upstream preprocessed format: npy_train/patient_<P>/slice_<z>.npz with x [1,C,H,W], y [1,1,H,W]."""
    rng = np.random.default_rng(0)
    for p in range(patients):
        folder = root / "npy_train" / f"patient_{p:03d}"
        folder.mkdir(parents=True)
        for z in range(slices):
            x = rng.random((1, channels, size, size))
            y = np.zeros((1, 1, size, size), dtype=np.float32)
            if z % 2:
                y[..., 10:16, 10:16] = 1.0
            np.savez(folder / f"slice_{z}.npz", x=x, y=y)
    return root


TINY_FLAGS = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions",
              "16,8", "--channel_mult", "1,1,1,2", "--dropout", "0", "--num_workers", "0", "--preview_steps", "1",
              "--log_interval", "1", "--save_interval", "2", "--sample_shape", "2", "4", "32", "32"]


def test_train_script_end_to_end_with_auto_resume(tmp_path, monkeypatch):
    data = write_npz_dataset(tmp_path / "data")
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--data_dir", str(data), "--unet_ver", "v2", "--in_channels", "4", "--batch_size", "2",
            "--use_checkpoint", "True", "--threshold", "0.1", "--w", "1,2", *TINY_FLAGS]
    try:
        assert train_script.main(argv + ["--max_steps", "2"]) == 2
        assert train_script.main(argv + ["--max_steps", "3", "--resume_checkpoint", "auto"]) == 3
    finally:
        logger.reset()
    run = tmp_path / "run"
    for step in ("000002", "000003"):
        for prefix in ("model", "ema_0.9999_", "opt", "state"):
            assert (run / f"{prefix}{step}.pt").exists(), f"{prefix}{step}.pt"
    state = torch.load(run / "state000003.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 3)  # 6 slices = 3 batches: epoch 0 is used up
    assert sorted(os.listdir(run / "images")) == ["000002_1.0.png", "000002_2.0.png", "000003_1.0.png",
                                                  "000003_2.0.png", "real_brats_train.png"]
    log = (run / "log.txt").read_text()
    assert "resuming from" in log and "model000002.pt" in log and "M parameters" in log
    rows = (run / "progress.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 steps, appended across the two runs


def test_config_script_runs_on_cpu_with_torchrun_on_its_port(tmp_path):
    """The hae_v2_conservative config (upstream's alias script) on 2 CPU processes: torchrun, gloo, MASTER_PORT."""
    data = write_npz_dataset(tmp_path / "data")
    port = str(free_port())
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CPU_PROCS="2", DATA_DIR=str(data), MASTER_PORT=port,
               OPENAI_LOGDIR=str(tmp_path / "run"), BATCH_PER_GPU="1", PYTHON=sys.executable,
               OPENAI_LOG_FORMAT="log,csv", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        ["bash", str(REPO / "config" / "run_train_brats_clf_free_guided_hae_v2_conservative.sh"), *TINY_FLAGS,
         "--max_steps", "1", "--save_interval", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running on the CPU with 2 process" in proc.stderr
    assert f"--master-port {port}" in proc.stderr
    assert "-m guided_diffusion train --preset brats-anofpdm-hae_v2_conservative" in proc.stderr
    assert (tmp_path / "run" / "model000001.pt").exists()
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["command"] == "train" and settings["preset"] == "brats-anofpdm-hae_v2_conservative"
    s = settings["settings"]
    assert (s["model"]["unet_ver"], s["model"]["use_hae"], s["loop"]["batch_size"]) == ("hae_v2_conservative", True, 2)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"process group gloo at localhost:{port}" in log and "2 process(es)" in log
    assert not [f for f in os.listdir(tmp_path / "run") if "rank" in f]  # only rank 0 writes


@pytest.mark.parametrize("config", sorted((REPO / "config").glob("run_train_*.sh")), ids=lambda p: p.name)
def test_config_scripts_are_valid_bash(config):
    assert subprocess.run(["bash", "-n", str(config)]).returncode == 0
    text = config.read_text()
    assert "_launch.sh" in text and "MASTER_PORT" in text and "PRESET=" in text


# --- gaps found by mutation testing (bench/mutation.py --module train_util) ---


@pytest.mark.parametrize("step, anneal, expected", [(0, 10, 1e-3), (4, 10, 6e-4), (10, 10, 0.0), (12, 10, 0.0),
                                                    (4, 0, 1e-3)])
def test_learning_rate_anneals_linearly_to_zero(step, anneal, expected):
    from types import SimpleNamespace

    loop = SimpleNamespace(lr=1e-3, lr_anneal_steps=anneal, step=step)  # upstream: lr * (1 - step / anneal)
    assert TrainLoop._current_lr(loop) == pytest.approx(expected, abs=1e-12)


def test_preview_grid_maps_minus_one_to_one_onto_grey_levels(tmp_path):
    from PIL import Image

    from guided_diffusion.training.train_util import save_image_grid

    single = torch.tensor([[[[-1.0, 0.0], [1.0, 2.0]]], [[[0.5, -3.0], [0.0, 1.0]]]])  # [2, 1, 2, 2]
    save_image_grid(single, str(tmp_path / "a.png"))
    a = np.asarray(Image.open(tmp_path / "a.png"))
    assert a.shape == (2 + 2 + 2, 2 * (2 + 2) + 2)  # one row of two tiles, 2-px padding around each
    np.testing.assert_array_equal(a[2:4, 2:4], [[0, 128], [255, 255]])  # (v + 1) / 2 * 255, clamped to [-1, 1]
    np.testing.assert_array_equal(a[2:4, 6:8], [[191, 0], [128, 255]])
    assert a[:2].max() == 0 and a[:, 4:6].max() == 0
    save_image_grid(torch.zeros(2, 3, 2, 2), str(tmp_path / "b.png"))  # several channels: a row per image
    assert np.asarray(Image.open(tmp_path / "b.png")).shape == (2 * (2 + 2) + 2, 3 * (2 + 2) + 2)
