"""``anofpdm compare``: the paper's comparison table (Che et al., Table 1) in one command, at a small size.

On one preprocessed data set (default: the quickstart's synthetic BraTS-like one, made by the quickstart's data
stage when missing) it trains, or reuses, every model the compared methods need, runs every method through the one
evaluation driver on the same test slices (same data, seed and batches), once per seed, and writes comparison.md,
comparison.csv and comparison.png. Each stage is the ``train`` / ``train-classifier`` / ``evaluate`` command over
the method's preset (``brats-anoddpm-simplex``, ...), with the small sizes below appended: at the paper's scale the
presets run as they are. Everything resumes: a model whose final checkpoint exists is reused, and evaluation reuses
every finished batch. Examples:

    anofpdm compare --output runs/comparison
    anofpdm compare --output runs/cmp --seeds 0 1 2 --data_dir data/brats64
    anofpdm compare --output runs/cmp --from_runs anofpdm=logs/a ddib=logs/b      # the table of finished runs

Layout of --output: raw/ and data/ (the quickstart's data stage), seed<s>/models/<model>/, seed<s>/eval/<method>/,
timings.json and the three results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from guided_diffusion import fileio, runtime
from guided_diffusion.commands import common
from guided_diffusion.data.loaders import data_shape
from guided_diffusion.errors import UserError, entry_point
from guided_diffusion.evaluation.comparison import ROWS, Run, parse_from_runs, write_results
from guided_diffusion.evaluation.fingerprint import json_digest
from guided_diffusion.flags import add_options, build, option, output_folder

STAGE_STAMP = ".comparison_stage"  # written into a training folder when its stage finished: the stage's settings key


@dataclass(frozen=True)
class ModelSpec:
    """A model to train: its command and the preset it starts from (``{dataset}`` filled in)."""

    key: str
    command: str
    preset: str


#: the models the rows need, and the rows' models (the first is the one evaluated; clf_guided also its classifier)
MODELS: Dict[str, ModelSpec] = {m.key: m for m in (
    ModelSpec("anofpdm", "train", "{dataset}-anofpdm-{unet_ver}"),  # AnoFPDM's classifier-free model, also DDIB's
    ModelSpec("anoddpm_gaussian", "train", "{dataset}-anoddpm-gaussian"),
    ModelSpec("anoddpm_simplex", "train", "{dataset}-anoddpm-simplex"),
    ModelSpec("clf_guided", "train", "{dataset}-clf_guided"),
    ModelSpec("classifier", "train-classifier", "{dataset}-clf_guided"),
)}
ROW_MODELS = {"anoddpm_gaussian": ("anoddpm_gaussian",), "anoddpm_simplex": ("anoddpm_simplex",),
              "clf_guided": ("clf_guided", "classifier"), "ddib": ("anofpdm",), "anofpdm": ("anofpdm",)}
ROW_PRESETS = {"anoddpm_gaussian": "{dataset}-anoddpm-gaussian", "anoddpm_simplex": "{dataset}-anoddpm-simplex",
               "clf_guided": "{dataset}-clf_guided", "ddib": "{dataset}-ddib", "anofpdm": "{dataset}-anofpdm-{unet_ver}"}


@dataclass(frozen=True)
class CompareSettings:
    """The comparison's flags."""

    data_dir: str = option("", "a preprocessed folder (npy_train/val/test); empty: the quickstart's synthetic data in "
                           "<output>/data, made by its data stage when missing")
    name: str = option("brats", "data set: picks the presets (BraTS or ATLAS)", choices=("brats", "atlas"))
    seeds: List[int] = option([0], "seeds of training and evaluation (one run of each per seed)")
    methods: List[str] = option(list(ROWS), "rows of the table", choices=tuple(ROWS))
    train_steps: int = option(800, "optimizer steps of every model")
    train_batch: int = option(16, "training batch of every model")
    lr: float = option(3e-4, "learning rate of every model")
    ema_rate: str = option("0.995", "EMA of the diffusion models (short runs: 0.9999 would average mostly the "
                           "initial weights)")
    num_channels: int = option(32, "base channels of every UNet")
    num_res_blocks: int = option(1, "residual blocks per resolution")
    channel_mult: str = option("1,2,2", "channel multipliers")
    attention_resolutions: str = option("8", "attention at these feature-map sizes")
    classifier_width: int = option(32, "the classifier's base channels")
    classifier_depth: int = option(1, "the classifier's blocks per resolution")
    preview_steps: int = option(25, "DDIM steps of the preview grids at each of the 4 checkpoints (0: none)")
    fpdm_unet_ver: str = option("v2", "AnoFPDM's (and DDIB's) UNet; v2 as in the paper's Table 1",
                                choices=("v2", "hae_v2", "hae_v2_conservative"))
    respacing: str = option("ddim50", "the step grid every method runs on (paper: the 1000 steps)")
    w: Optional[float] = option(None, "AnoFPDM's guidance weight (default: the preset's, BraTS 2, ATLAS 30)")
    forward_steps: int = option(15, "AnoFPDM's forward steps (paper 600 of 1000)")
    anoddpm_gaussian_steps: int = option(15, "AnoDDPM (G) S (upstream 300 of 1000)")
    anoddpm_simplex_steps: int = option(10, "AnoDDPM (S) S (upstream 200 of 1000)")
    clf_steps: int = option(10, "DDIM clf S (upstream 200 of 1000)")
    classifier_scale: Optional[float] = option(None, "DDIM clf s (default: the preset's, BraTS 1000, ATLAS 500)")
    ddib_steps: int = option(15, "DDIB S (upstream BraTS 450, ATLAS 300 of 1000)")
    ddib_w: Optional[float] = option(None, "DDIB's w (default: the preset's, BraTS 1.1, ATLAS 1.3)")
    modality: Optional[List[int]] = option(None, "channels of the maps, e.g. 0 3 (default: the preset's)")
    eval_batch: int = option(32, "evaluation batch")
    test_batches: int = option(-1, "test batches (-1: the whole test split)")
    val_batches: int = option(-1, "validation batches (-1: the whole validation split)")
    num_slices: int = option(6, "test slices in comparison.png (a third healthy)")
    subjects: int = option(24, "data stage (without --data_dir): the quickstart's synthetic subjects")
    synth_shape: List[int] = option([240, 240, 155], "data stage: the synthetic volume size")
    image_size: int = option(32, "data stage: slices are resized to image_size²")
    workers: int = option(0, "data stage: worker processes (0: the CPU cores)")
    from_runs: Optional[List[str]] = option(None, "no training or evaluation: the table and picture of finished "
                                            "evaluation folders, METHOD=DIR[,DIR...] (one folder per seed)",
                                            metavar="METHOD=DIRS")

    def __post_init__(self) -> None:
        if self.train_steps < 1 or self.train_batch < 1 or self.eval_batch < 1:
            raise ValueError("--train_steps, --train_batch and --eval_batch must be >= 1")
        for flag in ("test_batches", "val_batches"):
            value = getattr(self, flag)
            if value == 0 or value < -1:
                raise ValueError(f"--{flag} must be >= 1 or -1 (the whole split), got {value}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct, got {self.seeds}")
        if self.data_dir and not os.path.isdir(os.path.join(self.data_dir, "npy_test")):
            raise ValueError(f"--data_dir {self.data_dir} has no npy_test/ (expected a folder written by the "
                             "preprocess command)")
        if self.num_slices < 0:
            raise ValueError(f"--num_slices must be >= 0, got {self.num_slices}")


class StageError(UserError):
    """A stage (data, a training, an evaluation) failed; the message names it and how to rerun it."""


@dataclass
class Stage:
    """One training or evaluation: ``anofpdm <command> argv``."""

    name: str
    command: str  # an anofpdm command
    seed: int
    argv: List[str]
    output: str
    done_step: int = 0  # train: the final step whose checkpoints make the stage done
    ema_rate: str = ""

    @property
    def key(self) -> str:
        """Identifies the stage's settings (its timing is kept under this key)."""
        return json_digest([self.command, self.argv])[:12]

    def shell_command(self) -> str:
        return f"anofpdm {self.command} " + " ".join(map(shlex.quote, self.argv))

    def is_done(self) -> bool:
        """A training is done when its final checkpoints exist and were made by this stage's settings (otherwise it
        runs: it resumes, or its config.json check names the flags that changed). An evaluation always runs: the
        driver reuses every finished batch."""
        if self.command == "evaluate":
            return False
        from guided_diffusion.commands.quickstart import final_checkpoint_exists

        stamp = Path(self.output, STAGE_STAMP)
        return (final_checkpoint_exists(self.output, self.done_step, self.ema_rate) and stamp.is_file()
                and stamp.read_text().strip() == self.key)

    def mark_done(self) -> None:
        if self.command != "evaluate":
            fileio.write_text(Path(self.output, STAGE_STAMP), self.key + "\n")


@dataclass
class Plan:
    out: Path
    data_dir: str
    name: str
    seeds: List[int]
    methods: List[str]
    stages: List[Stage] = field(default_factory=list)

    def eval_dir(self, method: str, seed: int) -> Path:
        return self.out / f"seed{seed}" / "eval" / method

    def model_dir(self, model: str, seed: int) -> Path:
        return self.out / f"seed{seed}" / "models" / model


def _args(**values) -> List[str]:
    out: List[str] = []
    for key, value in values.items():
        if value is not None:
            out += [f"--{key}", *([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])]
    return out


def train_stage(s: CompareSettings, plan: Plan, model: str, seed: int, shape: Tuple[int, int]) -> Stage:
    spec = MODELS[model]
    output = str(plan.model_dir(model, seed))
    channels, size = shape
    interval = max(1, s.train_steps // 4)
    preset = spec.preset.format(dataset=plan.name, unet_ver=s.fpdm_unet_ver)
    argv = ["--preset", preset, "--data_dir", plan.data_dir, "--output", output,
            *_args(image_size=size, in_channels=channels, batch_size=s.train_batch, lr=s.lr, save_interval=interval,
                   log_interval=max(1, min(50, interval)), seed=seed, num_workers=0)]
    if spec.command == "train-classifier":
        argv += _args(classifier_width=s.classifier_width, classifier_depth=s.classifier_depth,
                      classifier_attention_resolutions=s.attention_resolutions, iterations=s.train_steps,
                      eval_interval=interval, val_batches=2)
        rate = ""
    else:
        argv += _args(num_channels=s.num_channels, num_res_blocks=s.num_res_blocks, channel_mult=s.channel_mult,
                      attention_resolutions=s.attention_resolutions, dropout=0.0, max_steps=s.train_steps,
                      total_epochs=100000, ema_rate=s.ema_rate, sample_shape=[4, channels, size, size],
                      preview_steps=s.preview_steps)
        if model == "anofpdm":
            argv += _args(w=30.0 if plan.name == "atlas" else 2.0)  # the preview grids' guidance, as the quickstart
        rate = s.ema_rate
    return Stage(f"train {model}", spec.command, seed, argv, output, s.train_steps, rate)


def eval_stage(s: CompareSettings, plan: Plan, method: str, seed: int, shape: Tuple[int, int]) -> Stage:
    output = str(plan.eval_dir(method, seed))
    models = ROW_MODELS[method]
    preset = ROW_PRESETS[method].format(dataset=plan.name, unet_ver=s.fpdm_unet_ver)
    modality = s.modality if s.modality else ([0] if shape[0] == 1 else None)
    argv = ["--preset", preset, "--data_dir", plan.data_dir, "--model_dir", str(plan.model_dir(models[0], seed)),
            "--output", output,
            *_args(seed=seed, ema=True, model_num=s.train_steps, batch_size=s.eval_batch, batch_size_val=s.eval_batch,
                   num_batches=s.test_batches, num_batches_val=s.val_batches, modality=modality,
                   timestep_respacing=s.respacing, num_panels=4)]
    if method.startswith("anoddpm"):
        argv += _args(sample_steps=getattr(s, f"{method}_steps"))
    elif method == "clf_guided":
        argv += _args(sample_steps=s.clf_steps, clf_dir=str(plan.model_dir("classifier", seed)),
                      clf_num=s.train_steps, classifier_scale=s.classifier_scale)
    elif method == "ddib":
        argv += _args(sample_steps=s.ddib_steps, w=s.ddib_w)
    else:
        argv += _args(forward_steps=s.forward_steps, w=s.w)
    return Stage(f"evaluate {method}", "evaluate", seed, argv, output)


def make_plan(s: CompareSettings, data_dir: str, out: Path) -> Plan:
    plan = Plan(out, os.path.abspath(data_dir), s.name, list(s.seeds), [m for m in ROWS if m in s.methods])
    shape = data_shape(plan.data_dir, ("train", "test"))
    for seed in plan.seeds:
        needed = [m for m in MODELS if any(m in ROW_MODELS[k] for k in plan.methods)]
        plan.stages += [train_stage(s, plan, m, seed, shape) for m in needed]
        plan.stages += [eval_stage(s, plan, k, seed, shape) for k in plan.methods]
    return plan


def say(message: str) -> None:
    print(f"\n=== [comparison {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timings:
    """``timings.json``: wall and CPU seconds of each stage when it was computed, keyed by its command."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def record(self, stage: Stage, wall: float, cpu: float) -> None:
        if stage.key not in self.data:  # the first complete run (a resumed one would count only the rest)
            self.data[stage.key] = {"stage": stage.name, "seed": stage.seed, "wall_s": round(wall, 1),
                                    "cpu_s": round(cpu, 1), "when": f"{datetime.datetime.now():%Y-%m-%d %H:%M}"}
            fileio.write_json(self.path, self.data)

    def get(self, stage: Stage) -> Optional[dict]:
        return self.data.get(stage.key)


def run_stage(stage: Stage) -> None:
    """``anofpdm <command> <argv>`` in this process; a failure is a ``StageError`` naming the stage."""
    from guided_diffusion.commands.quickstart import call

    try:
        call(stage.command, stage.argv)
    except (UserError, ValueError, OSError) as e:
        raise StageError(f"{stage.name} (seed {stage.seed}) failed: {e}. Its log: {stage.output}/log.txt. Rerun the "
                         f"comparison to continue, or run the stage alone:\n  {stage.shell_command()}") from None


def run_plan(plan: Plan) -> None:
    timings = Timings(plan.out / "timings.json")
    for i, stage in enumerate(plan.stages, 1):
        where = f"{stage.name} (seed {stage.seed}) [{i}/{len(plan.stages)}] -> {stage.output}"
        if stage.is_done():
            say(f"{where}: final checkpoint found, reused")
            continue
        say(where)
        w0, c0 = time.time(), cpu_seconds()
        run_stage(stage)
        timings.record(stage, time.time() - w0, cpu_seconds() - c0)
        stage.mark_done()


def ensure_data(s: CompareSettings, out: Path) -> str:
    """The quickstart's synthetic data in ``out/data``, made by its data stage when the folder is not complete."""
    from guided_diffusion.commands.quickstart import DATA_DONE, QuickstartSettings, prepare_data

    data = out / "data"
    if (data / DATA_DONE).is_file() and (data / "npy_test").is_dir():
        say(f"data: {data} (complete, reused)")
        return str(data)
    say(f"data: the quickstart's data stage into {out}")
    return prepare_data(QuickstartSettings(subjects=s.subjects, synth_shape=list(s.synth_shape), image_size=s.image_size,
                                           workers=s.workers, seed=s.seeds[0]), str(out))


def create_parser(prog: str = "anofpdm compare") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    common.add_output_flag(p, "models, evaluations and the table (default: runs/comparison)")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)  # the earlier name
    add_options(p, CompareSettings)
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm compare") -> int:
    args = create_parser(prog).parse_args(argv)
    s = build(CompareSettings, args)
    out = Path(output_folder(args.output, "runs/comparison", env=None))
    out.mkdir(parents=True, exist_ok=True)
    fileio.sweep_temp_files(str(out))
    start_wall, start_cpu, start_load = time.time(), cpu_seconds(), os.getloadavg()
    if s.from_runs:
        runs = parse_from_runs(s.from_runs)
        table, _ = write_results(out, runs, s.num_slices, header=[f"Runs: {', '.join(runs)}"])
        print(table)
        return 0
    data_dir = s.data_dir or ensure_data(s, out)
    plan = make_plan(s, data_dir, out)
    run_plan(plan)
    runs = {m: [Run.read(m, plan.eval_dir(m, seed)) for seed in plan.seeds] for m in plan.methods}
    timings = Timings(out / "timings.json")
    computed = [timings.get(st) for st in plan.stages]
    wall, cpu = time.time() - start_wall, cpu_seconds() - start_cpu
    end_load = os.getloadavg()
    stage_lines = ["| stage | seed | wall min | CPU min |", "|---|---|--:|--:|"]
    stage_lines += [f"| {st.name} | {st.seed} | {t['wall_s'] / 60:.1f} | {t['cpu_s'] / 60:.1f} |"
                    for st, t in zip(plan.stages, computed) if t]
    total = [t for t in computed if t]
    channels, size = data_shape(plan.data_dir, ("train", "test"))
    first = runs[plan.methods[0]][0].metrics
    header = [f"Data: {plan.data_dir} ({s.name}, {channels} channels, {size}×{size} px; test slices: "
              f"{first['mixed'].get('n_slices')}, {first['unhealthy'].get('n_slices')} with a lesion). Seeds "
              f"{' '.join(map(str, plan.seeds))} (training and evaluation). Every model: {s.train_steps} steps of "
              f"batch {s.train_batch}, {s.num_channels} channels; every method on the {s.respacing} grid."]
    footer = [f"Machine: {runtime.machine_description(load=False)}.",
              f"This call: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, load average {start_load[0]:.1f} at the "
              f"start, {end_load[0]:.1f} at the end. Stages as first computed (timings.json): "
              f"{sum(t['wall_s'] for t in total) / 60:.1f} min wall, {sum(t['cpu_s'] for t in total) / 60:.1f} min CPU.",
              "", *stage_lines]
    table, _ = write_results(out, runs, s.num_slices, header=header, footer=footer)
    bar = "=" * 100
    print(f"\n{bar}\nComparison on {plan.data_dir} (seeds {' '.join(map(str, plan.seeds))})\n{table}\n"
          f"✓: threshold tuned with pixel labels. Table: {out / 'comparison.md'} (and comparison.csv); picture: "
          f"{out / 'comparison.png'}\ntime {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (load average "
          f"{start_load[0]:.1f} -> {end_load[0]:.1f})\n{bar}", flush=True)
    return 0
