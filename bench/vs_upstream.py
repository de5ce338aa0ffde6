"""This project against upstream's own code, side by side, on the same checkpoints and slices (issue 20).

    python bench/vs_upstream.py --upstream DIR --upstream_hae DIR2 [--quick] [--json OUT]

``DIR``: a checkout of SoloChe/AnoFPDM (the AnoFPDM translation; measured at 94e838c); ``DIR2``: a checkout of
TanDongTaotao/AnoFPDM (HAE V2 training; measured at 9e9af42). Upstream code is read from there, never copied here.

What is timed (one thread, ``torch.set_num_threads(1)``; the cases interleaved round by round, A B C, C B A, ...,
after one warm-up round that is not counted; process CPU time, with wall time beside it):

* translation, the AnoFPDM forward process over ``--steps`` steps of one batch of ``--batch`` slices with one
  v2 checkpoint (``--image_size`` px, ``--num_channels`` channels, upstream's production flags otherwise:
  attention at 32,16,8, 4 heads, scale-shift norm, 4 input channels, 2 classes), loaded strictly into both:
  - ``upstream``: ``diffusion.calc_pred_xstart_loop`` (per step: one DDIM inversion forward, then the guided
    and the unguided ``ddim_sample``, i.e. 4 forwards of the batch; 3 at the first step);
  - ``default``: this project's ``ForwardProcess.run`` with its defaults (2 predictions per slice and step);
  - ``upstream flags``: the same with ``ugp_mode="upstream"`` and ``legacy_ddim_encoding=True``
    (``--ugp_mode upstream --legacy_ddim_encoding True``: upstream's function; 3 predictions, 2 at the first step).
  Over S steps that is 4S-1, 2S and 3S-1 predictions per slice, so a whole short run understates the ratio of a
  600-step translation a little (S = 3: 11/6 instead of 2 for the default path); hence the steady-state ratios.
  This project's time includes its per-step statistics and the streamed anomaly maps; upstream's loop only
  stacks the predictions (its post-processing is not timed). The warm-up round's outputs are compared: upstream's
  per-step errors and the project's with upstream's flags must agree to float precision (printed).
* training, one optimizer step at the production config (128 px, 128 channels, HAE on, dropout 0.1, label
  dropout 0.1; ``--train_batch`` samples, default 1) with one HAE V2 checkpoint:
  - ``upstream hae_v2``: upstream's ``HAEUNetModelV2`` through upstream's own step (``UniformSampler``,
    ``training_losses``, ``MixedPrecisionTrainer`` without fp16, AdamW, ``update_ema``), as its ``TrainLoop``;
  - ``conservative``: this project's ``hae_v2_conservative`` through ``TrainLoop.run_step`` (the real loop).

The last line is the summary, ratios of upstream's time to this project's (median CPU time):
``translation default N.NN×, upstream flags N.NN×, training conservative/upstream-hae_v2 N.NN×``. The translation
ratios are those of the steps after the first (the steady state: 599 of a 600-step translation's steps; the end of
the first step is noted through upstream's model calls and the project's progress callback); the whole runs'
ratios are printed above it.

CPU shim (the smallest that runs upstream's code on a CPU without editing its files): each checkout's
``guided_diffusion`` package is imported under another name (``upstream_anofpdm``, ``upstream_hae``), so it never
meets this project's package, after two of its modules are put in ``sys.modules`` in its place: ``logger`` (its
real one imports tensorboard; here every function is a no-op) and ``dist_util`` (NCCL and CUDA; here ``dev()`` is
the CPU). Upstream's models are called bare, without the DDP wrapper its scripts add (one process: DDP would only
add work to upstream's side). Upstream's HAE V2 draws its sparse masks on every forward, as it does in training.

``--quick`` (translation: batch 4, 3 steps; training batch 1; 2 counted rounds each) takes about 6 minutes on one
free core and stays under 10 on 2 busy cores. The defaults (batch 16, 4 steps) take about half an hour.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from guided_diffusion import runtime  # noqa: E402
from guided_diffusion.methods.anofpdm import ForwardConfig, ForwardProcess  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

# Upstream's production flags (config/run_translation_brats_fpdm.sh, run_train_brats_clf_free_guided_hae_v2.sh).
PRODUCTION = dict(in_channels=4, num_channels=128, num_res_blocks=2, attention_resolutions="32,16,8", num_heads=4,
                  use_scale_shift_norm=True, class_cond=True, num_classes=2, learn_sigma=False,
                  diffusion_steps=1000, noise_schedule="linear")
GUIDANCE_W = 2.0  # BraTS
MODALITY = [0, 3]  # FLAIR, T2
LABEL_DROPOUT = 0.1


# ------------------------------------------------------------------------------------------------------------------
# The shim


def load_upstream(checkout: Path, alias: str) -> types.ModuleType:
    """Import ``checkout/guided_diffusion`` as the package ``alias``, with a no-op logger and a CPU dist_util."""
    package_dir = Path(checkout) / "guided_diffusion"
    if not (package_dir / "__init__.py").exists():
        raise SystemExit(f"{checkout} is not an upstream checkout (no guided_diffusion/__init__.py)")

    def no_op(*args, **kwargs) -> None:
        return None

    def logger_function(name: str):  # log, logkv, logkv_mean, ...: no-ops
        if name.startswith("__"):
            raise AttributeError(name)
        return no_op

    logger = types.ModuleType(f"{alias}.logger")
    logger.__getattr__ = logger_function
    dist_util = types.ModuleType(f"{alias}.dist_util")
    dist_util.dev = lambda: torch.device("cpu")
    dist_util.setup_dist = lambda: None
    sys.modules[f"{alias}.logger"] = logger
    sys.modules[f"{alias}.dist_util"] = dist_util
    spec = importlib.util.spec_from_file_location(alias, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    package.logger, package.dist_util = logger, dist_util
    return package


def upstream_module(alias: str, name: str) -> types.ModuleType:
    return importlib.import_module(f"{alias}.{name}")


def upstream_model_and_diffusion(alias: str, flags: dict, unet_ver: str):
    script_util = upstream_module(alias, "script_util")
    defaults = script_util.model_and_diffusion_defaults()
    args = {k: v for k, v in {**defaults, **flags, "unet_ver": unet_ver}.items() if k in defaults}
    return script_util.create_model_and_diffusion(**args)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints and data


def random_checkpoint(model: torch.nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """The model's weights plus seeded noise: a trained-looking checkpoint (a fresh model's zero-initialised
    output convolutions would make every prediction 0)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            scale = 0.5 / max(1, tensor[0].numel()) ** 0.5 if tensor.dim() > 1 else 0.02
            tensor = tensor + scale * torch.randn(tensor.shape, generator=generator)
        state[name] = tensor.clone()
    return state


def ours(flags: dict, unet_ver: str):
    return create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags, "unet_ver": unet_ver})


def slices(batch: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """The same [-1, 1] slices for both sides (speed does not depend on their content)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------------------------------------
# Cases


class CallClock:
    """Calls ``model`` and notes the process CPU time at which call ``first_step_calls + 1`` starts: the end of the
    run's first step (the rest of the run is the steady state that a 600-step translation is made of)."""

    def __init__(self, model: Callable, first_step_calls: int):
        self.model, self.first_step_calls, self.calls = model, first_step_calls, 0
        self.first_step_end = None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.first_step_calls + 1:
            self.first_step_end = time.process_time()
        return self.model(*args, **kwargs)


def translation_cases(args, upstream_alias: str) -> Dict[str, Callable[[], tuple]]:
    flags = dict(PRODUCTION, image_size=args.image_size, num_channels=args.num_channels, dropout=0.0)
    model, diffusion = ours(flags, "v2")
    model.load_state_dict(random_checkpoint(model, seed=1))
    model.eval()
    up_model, up_diffusion = upstream_model_and_diffusion(upstream_alias, flags, "v2")
    up_model.load_state_dict(model.state_dict(), strict=True)  # the checkpoint is the contract
    up_model.eval()
    x0 = slices(args.batch, args.image_size, flags["in_channels"], seed=2)
    y0 = torch.zeros(args.batch, dtype=torch.long)  # healthy

    def upstream() -> tuple:
        # upstream's first step makes 3 model calls (guided: null + conditional; unguided): the 4th call starts step 2
        clock = CallClock(up_model, first_step_calls=3)
        torch.manual_seed(0)  # step 0's noise: the same first draw as the project's generator below
        with torch.no_grad():
            out = up_diffusion.calc_pred_xstart_loop(
                clock, x0, GUIDANCE_W, modality=MODALITY, d_reverse=True, sample_steps=args.steps,
                model_kwargs={"y": y0, "threshold": -1, "clf_free": True},
                model_kwargs_reverse={"threshold": -1, "clf_free": True, "null": True},
            )
        return out, clock.first_step_end

    def project(**options) -> Callable[[], tuple]:
        cfg = ForwardConfig(w=GUIDANCE_W, forward_steps=args.steps, modality=MODALITY, **options)
        process = ForwardProcess(model, diffusion, cfg)

        def run() -> tuple:
            ends: List[float] = []
            out = process.run(x0, generator=torch.Generator().manual_seed(0),
                              progress=lambda n: ends.append(time.process_time()))
            return out, ends[0]

        return run

    return {"upstream": upstream, "default": project(),
            "upstream flags": project(ugp_mode="upstream", legacy_ddim_encoding=True)}


def same_function(outputs: Dict[str, object], x0: torch.Tensor) -> float:
    """Largest relative difference between upstream's per-step errors and the project's with upstream's flags
    (the warm-up round's outputs).

    Upstream's function is the project's with ``--ugp_mode upstream --legacy_ddim_encoding True``: the guided and
    unguided predictions' MSE to the input, per step and modality, must agree to float precision.
    """
    xstarts = outputs["upstream"]
    stats = outputs["upstream flags"].stats
    src = x0[:, MODALITY][:, None]
    worst = 0.0
    for key, ours_mse in (("xstart", stats.mse_guided), ("xstart_null", stats.mse_unguided)):
        theirs = ((xstarts[key] - src) ** 2).mean((-2, -1))
        worst = max(worst, ((theirs - ours_mse).abs() / theirs.abs().clamp_min(1e-12)).max().item())
    return worst


def training_cases(args, upstream_alias: str) -> Dict[str, Callable[[], None]]:
    from guided_diffusion.training.train_util import TrainLoop

    flags = dict(PRODUCTION, image_size=128, dropout=0.1, use_hae=True)
    model, diffusion = ours(flags, "hae_v2_conservative")
    model.load_state_dict(random_checkpoint(model, seed=3))
    up_model, up_diffusion = upstream_model_and_diffusion(upstream_alias, dict(flags, use_hae=True), "hae_v2")
    up_model.load_state_dict(model.state_dict(), strict=True)
    up_model.train()
    x = slices(args.train_batch, 128, flags["in_channels"], seed=4)
    y = torch.arange(args.train_batch) % 2

    loop = TrainLoop(model=model, diffusion=diffusion, data=[], batch_size=args.train_batch, lr=1e-4,
                     threshold=LABEL_DROPOUT, progress=False, seed=0)

    # upstream's TrainLoop.run_step / forward_backward without DDP and logging
    fp16_util = upstream_module(upstream_alias, "fp16_util")
    nn_util = upstream_module(upstream_alias, "nn")
    resample = upstream_module(upstream_alias, "resample")
    trainer = fp16_util.MixedPrecisionTrainer(model=up_model, use_fp16=False, fp16_scale_growth=1e-3)
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-4, weight_decay=0.0)
    ema = copy.deepcopy(trainer.master_params)
    sampler = resample.UniformSampler(up_diffusion)

    def upstream() -> tuple:
        trainer.zero_grad()
        t, weights = sampler.sample(x.shape[0], torch.device("cpu"))
        losses = up_diffusion.training_losses(up_model, x, t, model_kwargs={"y": y, "threshold": LABEL_DROPOUT})
        trainer.backward((losses["loss"] * weights).mean())
        if trainer.optimize(opt):
            nn_util.update_ema(ema, trainer.master_params, rate=0.9999)
        return None, None

    def project() -> tuple:
        loop.run_step(x, {"y": y})
        return None, None

    return {"upstream hae_v2": upstream, "conservative": project}


# ------------------------------------------------------------------------------------------------------------------
# Timing


def interleaved(cases: Dict[str, Callable[[], tuple]], rounds: int, log) -> tuple:
    """One warm-up round, then ``rounds`` rounds; the order alternates (A B C, C B A, ...) against drift.

    A case returns (output, CPU time at the end of its first step or None). Returns the times of the counted rounds
    (``cpu``, ``wall``, and ``steady``: CPU time after the first step) and each case's warm-up output."""
    names = list(cases)
    times = {name: {"cpu": [], "wall": [], "steady": []} for name in names}
    first = {}
    for r in range(rounds + 1):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            out, first_step_end = cases[name]()
            c1, w1 = time.process_time(), time.perf_counter()
            if r:
                times[name]["cpu"].append(c1 - c0)
                times[name]["wall"].append(w1 - w0)
                if first_step_end is not None:
                    times[name]["steady"].append(c1 - first_step_end)
            else:
                first[name] = out
            del out
            log(f"  {'round ' + str(r) if r else 'warm-up'}: {name} {c1 - c0:.2f} s CPU, {w1 - w0:.2f} s wall")
    return times, first


def summary_rows(times: Dict[str, Dict[str, List[float]]], per: float, unit: str, steady_per: float = 0) -> List[str]:
    rows = []
    for name, t in times.items():
        cpu, wall = [v / per for v in t["cpu"]], [v / per for v in t["wall"]]
        row = f"| {name} | {min(cpu):.3f} | {statistics.median(cpu):.3f} | {statistics.median(wall):.3f} |"
        if steady_per:
            row += f" {statistics.median(t['steady']) / steady_per:.3f} |" if t["steady"] else " – |"
        rows.append(row + f" {unit} |")
    return rows


def ratio(times: Dict[str, Dict[str, List[float]]], upstream: str, project: str, key: str = "cpu") -> float:
    return statistics.median(times[upstream][key]) / statistics.median(times[project][key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=Path, required=True, help="checkout of SoloChe/AnoFPDM (translation)")
    parser.add_argument("--upstream_hae", type=Path, required=True, help="checkout of TanDongTaotao/AnoFPDM (HAE V2)")
    parser.add_argument("--quick", action="store_true", help="small batch, few steps and rounds (< 10 min)")
    parser.add_argument("--image_size", type=int, default=64, help="translation slice size (production: 128)")
    parser.add_argument("--num_channels", type=int, default=128, help="translation model width (production: 128)")
    parser.add_argument("--batch", type=int, default=16, help="translation slices per batch")
    parser.add_argument("--steps", type=int, default=4, help="forward steps per translation run")
    parser.add_argument("--train_batch", type=int, default=1, help="samples per training step")
    parser.add_argument("--rounds", type=int, default=2, help="counted rounds per case (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", choices=["translation", "training"], action="append", default=[])
    parser.add_argument("--json", type=Path, default=None, help="also write the raw times here")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.rounds, args.train_batch = 4, 3, 2, 1
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"# vs upstream on {runtime.machine_description()}; {datetime.date.today().isoformat()}; "
        f"{args.threads} thread(s); {' '.join(sys.argv[1:])}")
    results: dict = {"machine": runtime.machine_description(), "date": datetime.date.today().isoformat(),
                     "args": {k: str(v) for k, v in vars(args).items()}}
    ratios = {}
    if "translation" not in args.skip:
        load_upstream(args.upstream, "upstream_anofpdm")
        log(f"translation: v2 at {args.image_size} px, {args.num_channels} channels, batch {args.batch}, "
            f"{args.steps} steps")
        cases = translation_cases(args, "upstream_anofpdm")
        times, outputs = interleaved(cases, args.rounds, log)
        del cases
        difference = same_function(outputs, slices(args.batch, args.image_size, PRODUCTION["in_channels"], seed=2))
        del outputs
        log(f"same function: upstream's per-step MSEs vs the project's with upstream flags, largest relative "
            f"difference {difference:.1e}")
        results["translation_relative_difference"] = difference
        log(f"model calls per slice over {args.steps} steps: upstream {4 * args.steps - 1}, default "
            f"{2 * args.steps}, upstream flags {3 * args.steps - 1} (the first step has no inversion)")
        results["translation"] = times
        log("\n| translation | min CPU | median CPU | median wall | median CPU, steps 2.. | per |\n"
            "|---|---|---|---|---|---|")
        log("\n".join(summary_rows(times, args.batch * args.steps, "s per slice-step",
                                   steady_per=args.batch * (args.steps - 1))))
        whole = {k: ratio(times, "upstream", case) for k, case in (("default", "default"), ("flags", "upstream flags"))}
        log(f"whole runs (first step included): default {whole['default']:.2f}×, upstream flags {whole['flags']:.2f}×")
        results["whole_run_ratios"] = whole
        # the summary: the steps after the first, i.e. what all but one of a translation's forward steps cost
        key = "steady" if args.steps > 1 else "cpu"
        ratios["default"] = ratio(times, "upstream", "default", key)
        ratios["flags"] = ratio(times, "upstream", "upstream flags", key)
    gc.collect()
    if "training" not in args.skip:
        load_upstream(args.upstream_hae, "upstream_hae")
        log(f"training: production config, batch {args.train_batch}")
        cases = training_cases(args, "upstream_hae")
        times, _ = interleaved(cases, args.rounds, log)
        del cases
        results["training"] = times
        log("\n| training | min CPU | median CPU | median wall | per |\n|---|---|---|---|---|")
        log("\n".join(summary_rows(times, args.train_batch, "s per sample-step")))
        ratios["training"] = ratio(times, "upstream hae_v2", "conservative")
    results["ratios"] = ratios
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))

    def fmt(key: str) -> str:
        return f"{ratios[key]:.2f}×" if key in ratios else "–"

    print(f"translation default {fmt('default')}, upstream flags {fmt('flags')}, "
          f"training conservative/upstream-hae_v2 {fmt('training')}")


if __name__ == "__main__":
    main()
