"""``anofpdm quickstart``: the whole pipeline at a small size, from an empty folder to Dice / IoU / AUPRC.

1. synthetic BraTS-like subjects (or --raw_dir, a folder in the BraTS 2021 layout), 2. preprocessing to 32-px
slices, 3. a small hae_v2_conservative model trained classifier-free, 4. AnoFPDM: validation picks the thresholds,
then the test slices are segmented (on the CPU shared by one-thread processes, --eval_procs), 5. the report.
Settings: the ``quickstart`` preset (``anofpdm presets quickstart``); the flags below override it. Everything goes
under --output; rerun the same command after an interruption and every stage continues where it stopped.

    anofpdm quickstart --output runs/quickstart
    bash config/run_quickstart.sh                  # the same, installing the project first when needed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from guided_diffusion import fileio
from guided_diffusion.commands import common
from guided_diffusion.errors import UserError, entry_point
from guided_diffusion.flags import add_options, build, option, output_folder

SETUPS = ("mixed", "unhealthy")
# What the defaults reach on data they were not tuned on (bench/quickstart_eval.py; bench/results/): printed under
# every run's own figures so that one run is read against the spread of several.
REFERENCE = ("unhealthy Dice 64.1 ± 7.7 % (5 runs: default 53.5, small 58.8, faint 66.2 and 71.1, multi 70.7; "
             "51-208 unhealthy slices each; bench/results/quickstart_2026-12-06.md)")
DATA_DONE = ".quickstart_data_ready"  # written into the data folder once preprocessing succeeded


@dataclass(frozen=True)
class QuickstartSettings:
    """The quickstart's own flags; the model's and AnoFPDM's come from the ``quickstart`` preset."""

    raw_dir: str = option("", "your own raw data in the BraTS 2021 layout (<P>/<P>_{flair,t1,t1ce,t2,seg}.nii.gz); "
                          "default: synthetic subjects in <output>/raw")
    subjects: int = option(24, "synthetic subjects")
    healthy_fraction: float = option(0.25, "share of synthetic subjects without a tumour")
    synth_preset: str = option("default", "synthetic lesions: default, small, faint, multi, small_faint")
    synth_shape: List[int] = option([240, 240, 155], "synthetic volume size (BraTS's; smaller only for tests)")
    seed: int = option(0, "seed of the data, the training and the evaluation")
    val_lesion_subjects: int = option(1, "validation gets at least this many subjects with a lesion (AnoFPDM's M_max "
                                      "needs one)")
    image_size: int = option(32, "slices are resized to image_size² (paper: 128)")
    workers: int = option(0, "processes for the data stages (0: the CPU cores)")
    eval_procs: int = option(0, "one-thread processes sharing AnoFPDM's slices on the CPU (0: the cores; a GPU: one)")
    stop_after: str = option("", "stop after a stage: data (the comparison's data stage), train", choices=("", "data",
                                                                                                      "train"))
    train_steps: Optional[int] = option(None, "training steps (default: the preset's max_steps)")
    num_channels: Optional[int] = option(None, "the UNet's base channels (default: the preset's 32)")
    channel_mult: Optional[str] = option(None, "channel multipliers (default: the preset's 1,2,2)")
    attention_resolutions: Optional[str] = option(None, "attention at these feature-map sizes (default: 8)")
    batch_size: Optional[int] = option(None, "training batch (default: 16)")
    lr: Optional[float] = option(None, "learning rate (default: 3e-4)")
    ema_rate: Optional[str] = option(None, "EMA rate (default: the preset's 0.995)")
    w: Optional[float] = option(None, "AnoFPDM's guidance weight (default: 2)")
    timestep_respacing: Optional[str] = option(None, "AnoFPDM's step grid (default: ddim100)")
    forward_steps: Optional[int] = option(None, "AnoFPDM's forward steps (default: 30)")
    modality: Optional[List[int]] = option(None, "channels of the anomaly map (default: 0 3, FLAIR and T2)")
    eval_batch: Optional[int] = option(None, "evaluation batch (default: 32)")
    median_kernel: Optional[int] = option(None, "median window (default: 3)")
    quantile_a: Optional[float] = option(None, "mask quantile a (default: 0.93)")
    quantile_b: Optional[float] = option(None, "mask quantile b (default: 0.99)")
    num_batches_val: Optional[int] = option(None, "validation batches (default: -1, the whole split)")
    num_batches: Optional[int] = option(None, "test batches (default: -1, the whole split)")
    num_panels: Optional[int] = option(None, "slices in panels.png (default: 8)")


def _flags(**values) -> List[str]:
    """``--key value`` for every value that is not None (lists as several values)."""
    out: List[str] = []
    for key, value in values.items():
        if value is None:
            continue
        out.append(f"--{key}")
        out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def say(message: str) -> None:
    print(f"\n=== [quickstart {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def call(command: str, argv: Sequence[str]) -> int:
    """Run ``anofpdm <command>`` in this process; its exit code (a user error is reported and stops the caller)."""
    from guided_diffusion import logger
    from guided_diffusion.commands import run

    try:
        return run(command, argv)
    except SystemExit as e:
        raise UserError(f"the {command} stage failed (exit {e.code}); rerun to continue") from None
    finally:
        logger.reset()


def prepare_data(s: QuickstartSettings, out: str) -> str:
    """Stages 1-2: raw subjects (synthetic unless --raw_dir) and their slices in ``out/data``; returns that folder."""
    workers = s.workers or cores()
    if s.raw_dir:
        raw = os.path.abspath(s.raw_dir)
        if not os.path.isdir(raw):
            raise ValueError(f"--raw_dir {s.raw_dir} is not a folder")
        say(f"raw data: {raw} (BraTS 2021 layout)")
    else:
        raw = os.path.join(out, "raw")
        say(f"synthetic data: {s.subjects} subjects ({s.healthy_fraction} without tumour), preset {s.synth_preset}, "
            f"seed {s.seed}")
        call("synth", ["--output", raw, *_flags(num_subjects=s.subjects, preset=s.synth_preset,
                                                 healthy_fraction=s.healthy_fraction, seed=s.seed, workers=workers,
                                                 shape=s.synth_shape)])
    data = os.path.join(out, "data")
    say(f"preprocessing at {s.image_size}x{s.image_size}")
    if call("preprocess", ["--source", raw, "--name", "brats", "--mod", "all", "--output", data,
                           *_flags(image_size=s.image_size, workers=workers,
                                   min_val_lesion_subjects=s.val_lesion_subjects)]) != 0:
        raise UserError(f"preprocessing of {raw} reported failed subjects (see above); rerun the quickstart to retry")
    fileio.write_text(os.path.join(data, DATA_DONE), "written by the quickstart once preprocessing succeeded\n")
    return data


def train_flags(s: QuickstartSettings, data: str, model_dir: str) -> List[str]:
    size = s.image_size
    return ["--preset", "quickstart", "--data_dir", data, "--output", model_dir,
            *_flags(seed=s.seed, max_steps=s.train_steps, image_size=size, sample_shape=[4, 4, size, size],
                    num_channels=s.num_channels, channel_mult=s.channel_mult,
                    attention_resolutions=s.attention_resolutions, batch_size=s.batch_size, lr=s.lr,
                    ema_rate=s.ema_rate, w=s.w)]


def evaluate_flags(s: QuickstartSettings, data: str, model_dir: str, results: str) -> List[str]:
    return ["--preset", "quickstart", "--data_dir", data, "--model_dir", model_dir, "--output", results,
            *_flags(model_num=s.train_steps, seed=s.seed, w=s.w, timestep_respacing=s.timestep_respacing,
                    forward_steps=s.forward_steps, modality=s.modality, batch_size=s.eval_batch,
                    batch_size_val=s.eval_batch, median_kernel=s.median_kernel, quantile_a=s.quantile_a,
                    quantile_b=s.quantile_b, num_batches_val=s.num_batches_val, num_batches=s.num_batches,
                    num_panels=s.num_panels)]


def final_checkpoint_exists(model_dir: str, step: int, ema_rate: str) -> bool:
    """True when training wrote complete (readable) step-``step`` model and EMA checkpoints."""
    rates = [r for r in str(ema_rate).split(",") if r.strip()]
    paths = fileio.checkpoint_paths(model_dir, step, rates)
    return all(fileio.checkpoint_problem(paths[key]) is None for key in ["model"] + [f"ema_{fileio.format_rate(r)}"
                                                                                      for r in rates])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_evaluation(argv: List[str], procs: int) -> None:
    """AnoFPDM's stage: in this process, or shared by ``procs`` one-thread processes (torchrun on the CPU; the
    results do not depend on the count)."""
    import torch

    if procs <= 1 or torch.cuda.is_available():
        call("evaluate", argv)
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("MASTER_PORT", str(free_port()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
           "--master-addr", "127.0.0.1", "--master-port", env["MASTER_PORT"], "-m", "guided_diffusion", "evaluate",
           *argv]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise UserError("the evaluation stage failed (see above); rerun the quickstart to continue")


def _pct(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100.0 * value:6.1f}"


def format_report(metrics: dict, results_dir: str, seconds: Optional[float] = None) -> str:
    """The quickstart's closing block: Dice / IoU / AUPRC per setup, accuracy, settings, where the files are."""
    settings = metrics.get("settings", {})
    lines = [
        "",
        "================ AnoFPDM quickstart: synthetic BraTS test slices ================",
        f"guidance w={settings.get('w')}, forward steps {settings.get('forward_steps')}, "
        f"modalities {settings.get('modality')} (0 = FLAIR, 3 = T2), checkpoint "
        f"{os.path.basename(str(metrics.get('checkpoint', '?')))}",
        f"{'setup':<10} {'Dice %':>7} {'IoU %':>7} {'AUPRC %':>8}  slices",
    ]
    for setup in SETUPS:
        m = metrics.get(setup, {})
        lines.append(f"{setup:<10} {_pct(m.get('dice')):>7} {_pct(m.get('iou')):>7} {_pct(m.get('auprc')):>8}  "
                     f"{m.get('n_slices', '?')}")
    lines.append(f"healthy/unhealthy classification accuracy {_pct(metrics.get('accuracy')).strip()} %")
    lines.append(f"metrics: {os.path.join(results_dir, 'metrics.json')} (and metrics.csv, per_slice.csv)")
    panels = os.path.join(results_dir, "panels.png")
    if os.path.isfile(panels):
        lines.append(f"pictures: {panels} (input FLAIR | ground truth | anomaly map | predicted mask)")
    if seconds is not None:
        lines.append(f"total time {seconds / 60:.1f} min")
    lines.append(f"for reference, these defaults on data they were not tuned on: {REFERENCE}")
    lines.append("=" * 81)
    return "\n".join(lines)


def read_metrics(results: str) -> dict:
    path = os.path.join(results, "metrics.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; run the evaluation stage first") from None


def create_parser(prog: str = "anofpdm quickstart") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    common.add_output_flag(p, "everything: raw/, data/, model/, results/ (default: runs/quickstart)")
    add_options(p, QuickstartSettings)
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm quickstart") -> int:
    start = time.time()
    args = create_parser(prog).parse_args(argv)
    s = with_preset_training(build(QuickstartSettings, args))
    out = output_folder(args.output, "runs/quickstart", env=None)
    os.makedirs(out, exist_ok=True)
    runtime_note = "a GPU" if _cuda() else f"the CPU ({cores()} core(s))"
    say(f"output folder {out}; running on {runtime_note}")
    data = prepare_data(s, out)
    if s.stop_after == "data":
        say(f"data ready in {data} (--stop_after data)")
        return 0
    model_dir = os.path.join(out, "model")
    if final_checkpoint_exists(model_dir, s.train_steps, s.ema_rate):
        say(f"training: step {s.train_steps} checkpoint found in {model_dir}, skipped")
    else:
        say(f"training hae_v2_conservative for {s.train_steps} steps (checkpoints every 250)")
        call("train", train_flags(s, data, model_dir))
    if s.stop_after == "train":
        return 0
    results = os.path.join(out, "results")
    say("AnoFPDM: validation (thresholds), then the test slices")
    run_evaluation(evaluate_flags(s, data, model_dir, results), s.eval_procs or cores())
    print(format_report(read_metrics(results), results, time.time() - start), flush=True)
    return 0


def with_preset_training(s: QuickstartSettings) -> QuickstartSettings:
    """The training length and EMA rate the run will use: the flags', else the ``quickstart`` preset's (one place)."""
    from guided_diffusion import presets

    train = presets.get("quickstart").for_command("train")
    return dataclasses.replace(s, train_steps=s.train_steps or train["max_steps"],
                               ema_rate=s.ema_rate or train["ema_rate"])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

