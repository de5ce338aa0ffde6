"""The paper's comparison table (Che et al., Table 1) in one command: ``bash config/run_comparison.sh``.

On one preprocessed data set (default: the quickstart's synthetic BraTS-like one, made by the quickstart's own data
stage when missing) it trains, or reuses, every model the compared methods need, at a small size, runs every method
through the one evaluation driver on the same test slices (same data, seed and batches), once per seed, and writes

* ``comparison.md`` and ``comparison.csv``: mixed and unhealthy Dice / IoU / AUPRC per method, mean ± sd over the
  seeds (of training and evaluation), with a mark for the methods whose threshold was tuned with pixel labels
  (``pixel_labels_used`` of their ``metrics.json``);
* ``comparison.png``: one column per method for the same test slices (input, ground truth, each method's anomaly map
  and mask).

Every command is a config's own: training runs ``config/run_train_*.sh`` and evaluation ``config/run_translation_*.sh``
(their command lines, printed with ``DRY_RUN=1``), with small-size flags appended (the last value of a flag wins), in
this process. So at the paper's scale the same configs run without the appended flags. Everything resumes: a model
whose final checkpoint exists is reused (an interrupted training continues from its last checkpoint), and the driver
reuses every finished validation / test batch (keyed by content), so a rerun only does what is missing.

    python scripts/comparison.py --out runs/comparison                 # what config/run_comparison.sh runs
    python scripts/comparison.py --out runs/cmp --from_runs anofpdm=logs/a ddib=logs/b   # table of finished runs

Layout of ``--out``: ``raw/`` and ``data/`` (the quickstart's data stage), ``seed<s>/models/<model>/`` (training
folders), ``seed<s>/eval/<method>/`` (evaluation folders: ``metrics.json``, ``per_slice.csv``, ``batches/``),
``timings.json`` (wall and CPU time of each stage when it was computed) and the three results.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import runpy
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from guided_diffusion import fileio, runtime
from guided_diffusion.evaluation.fingerprint import json_digest

REPO = Path(__file__).resolve().parents[2]
SETUPS = ("mixed", "unhealthy")
METRICS = ("dice", "iou", "auprc")
DATA_DONE = ".comparison_data_ready"  # written into the data folder once the quickstart's data stage succeeded
STAGE_STAMP = ".comparison_stage"  # written into a training folder when its stage finished: the stage's settings key


@dataclass(frozen=True)
class ModelSpec:
    """A model to train: its training config (``run_train_<DATASET>_<config>.sh``) and the variables it needs."""

    key: str
    config: str
    env: Tuple[Tuple[str, str], ...] = ()
    classifier: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: its translation config (``run_translation_<DATASET>_<config>.sh``) and models."""

    key: str
    label: str
    config: str
    models: Tuple[str, ...]


MODELS: Dict[str, ModelSpec] = {m.key: m for m in (
    ModelSpec("anofpdm", "clf_free_guided"),  # AnoFPDM's classifier-free model, also DDIB's
    ModelSpec("anoddpm_gaussian", "anoddpm", (("NOISE_TYPE", "gaussian"),)),
    ModelSpec("anoddpm_simplex", "anoddpm", (("NOISE_TYPE", "simplex"),)),
    ModelSpec("clf_guided", "clf_guided"),
    ModelSpec("classifier", "clf", classifier=True),
)}

METHODS: Dict[str, MethodSpec] = {m.key: m for m in (  # the rows of the paper's Table 1, in its order
    MethodSpec("anoddpm_gaussian", "AnoDDPM (G)", "anoddpm", ("anoddpm_gaussian",)),
    MethodSpec("anoddpm_simplex", "AnoDDPM (S)", "anoddpm", ("anoddpm_simplex",)),
    MethodSpec("clf_guided", "DDIM clf", "clf_guided", ("clf_guided", "classifier")),
    MethodSpec("ddib", "DDIM clf-free (DDIB)", "ddib", ("anofpdm",)),
    MethodSpec("anofpdm", "AnoFPDM (DDIM)", "fpdm", ("anofpdm",)),
)}


class StageError(RuntimeError):
    """A stage (data, a training, an evaluation) failed; the message names it and how to rerun it."""


# ------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/comparison.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default=str(REPO / "runs" / "comparison"), help="output folder (default runs/comparison)")
    a("--data_dir", default="", help="a preprocessed folder (npy_train/val/test); empty: the quickstart's synthetic "
                                      "data in OUT/data, generated by its data stage when missing")
    a("--name", default="brats", choices=("brats", "atlas"), help="data set: picks the configs (BraTS or ATLAS)")
    a("--seeds", type=int, nargs="+", default=[0], help="seeds of training and evaluation (one run of each per seed)")
    a("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="rows of the table")
    g = p.add_argument_group("models (all at the same small size; the classifier has its own width and depth)")
    g.add_argument("--train_steps", type=int, default=800, help="optimizer steps of every model")
    g.add_argument("--train_batch", type=int, default=16)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--ema_rate", default="0.995", help="EMA of the diffusion models (short runs: 0.9999 would "
                                                       "average mostly the initial weights)")
    g.add_argument("--num_channels", type=int, default=32)
    g.add_argument("--num_res_blocks", type=int, default=1)
    g.add_argument("--channel_mult", default="1,2,2")
    g.add_argument("--attention_resolutions", default="8")
    g.add_argument("--classifier_width", type=int, default=32)
    g.add_argument("--classifier_depth", type=int, default=1)
    g.add_argument("--preview_steps", type=int, default=25, help="DDIM steps of the preview grids at each of the "
                   "4 checkpoints (0: none)")
    g.add_argument("--fpdm_unet_ver", default="v2", choices=("v2", "hae_v2", "hae_v2_conservative"),
                   help="AnoFPDM's (and DDIB's) UNet; v2 as in the paper's Table 1")
    e = p.add_argument_group("methods (steps count on the --respacing grid; empty: the config's default)")
    e.add_argument("--respacing", default="ddim50", help="the grid every method runs on (paper: the 1000 steps)")
    e.add_argument("--w", default="", help="AnoFPDM's guidance weight (config: BraTS 2, ATLAS 30)")
    e.add_argument("--forward_steps", type=int, default=15, help="AnoFPDM (paper 600 of 1000)")
    e.add_argument("--anoddpm_gaussian_steps", type=int, default=15, help="AnoDDPM (G) S (upstream 300 of 1000)")
    e.add_argument("--anoddpm_simplex_steps", type=int, default=10, help="AnoDDPM (S) S (upstream 200 of 1000)")
    e.add_argument("--clf_steps", type=int, default=10, help="DDIM clf S (upstream 200 of 1000)")
    e.add_argument("--classifier_scale", default="", help="DDIM clf s (config: BraTS 1000, ATLAS 500)")
    e.add_argument("--ddib_steps", type=int, default=15, help="DDIB S (upstream BraTS 450, ATLAS 300 of 1000)")
    e.add_argument("--ddib_w", default="", help="DDIB's w (config: BraTS 1.1, ATLAS 1.3)")
    e.add_argument("--modality", default="", help="channels of the maps, e.g. '0 3' (config: BraTS 0 3, ATLAS 0)")
    e.add_argument("--eval_batch", type=int, default=32)
    e.add_argument("--test_batches", type=int, default=-1, help="-1: the whole test split")
    e.add_argument("--val_batches", type=int, default=-1, help="-1: the whole validation split")
    o = p.add_argument_group("outputs")
    o.add_argument("--num_slices", type=int, default=6, help="test slices in comparison.png (a third healthy)")
    o.add_argument("--from_runs", nargs="+", default=None, metavar="METHOD=DIR[,DIR...]",
                   help="no training or evaluation: the table and picture of finished evaluation folders "
                        "(one folder per seed), e.g. anofpdm=logs/fpdm_s0,logs/fpdm_s1")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.train_steps < 1 or args.train_batch < 1 or args.eval_batch < 1:
        raise ValueError("--train_steps, --train_batch and --eval_batch must be >= 1")
    if args.test_batches == 0 or args.test_batches < -1 or args.val_batches == 0 or args.val_batches < -1:
        raise ValueError("--test_batches and --val_batches must be >= 1 or -1 (the whole split)")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    if args.data_dir and not os.path.isdir(os.path.join(args.data_dir, "npy_test")):
        raise ValueError(f"--data_dir {args.data_dir} has no npy_test/ (expected a folder written by "
                         "scripts/preprocess.py)")
    if args.num_slices < 0:
        raise ValueError(f"--num_slices must be >= 0, got {args.num_slices}")


# ------------------------------------------------------------------------------------------------------
# Commands: the configs' own, with small-size flags appended
# ------------------------------------------------------------------------------------------------------


def dataset_tag(name: str) -> str:
    return "ATLAS" if name == "atlas" else "brats"


def config_command(config: str, env: Dict[str, str]) -> Tuple[str, List[str]]:
    """``(script, args)`` of ``config/<config>`` for the variables ``env``: the command it prints with DRY_RUN=1.

    Only ``env`` (plus PATH and HOME) reaches the config, so settings of the calling shell cannot leak in.
    """
    path = REPO / "config" / config
    if not path.is_file():
        raise StageError(f"no config {path}")
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "DRY_RUN": "1", "NUM_GPUS": "1", "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(path)], env=full, capture_output=True, text=True, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or len(lines) != 1:
        raise StageError(f"DRY_RUN=1 bash config/{config} did not print one command (exit {proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    words = shlex.split(lines[0])
    scripts = [i for i, w in enumerate(words) if w.startswith("scripts/") and w.endswith(".py")]
    if not scripts:
        raise StageError(f"config/{config} printed no scripts/*.py command: {lines[0]}")
    return words[scripts[0]], words[scripts[0] + 1:]


def data_shape(data_dir: str) -> Tuple[int, int]:
    """(channels, image size) of the slices of a preprocessed folder."""
    for split in ("train", "test"):
        for patient in sorted(Path(data_dir, f"npy_{split}").glob("patient_*")):
            for f in sorted(patient.glob("slice_*.npz")):
                with np.load(f) as z:
                    x = z["x"]
                return int(x.shape[-3]), int(x.shape[-1])
    raise ValueError(f"{data_dir} holds no slices (npy_train/patient_*/slice_*.npz)")


@dataclass
class Stage:
    """One training or evaluation: the command of ``config/<config>`` for the variables ``env``, then ``extra``, run
    with OPENAI_LOGDIR = ``log_dir``. The command is read when the stage runs: a translation config passes model
    flags only while the model folder has no config.json (before its training)."""

    name: str
    kind: str  # "train" | "evaluate"
    seed: int
    config: str
    env: Dict[str, str]
    extra: List[str]
    log_dir: str
    done_step: int = 0  # train: the final step whose checkpoints make the stage done
    ema_rate: str = ""

    @property
    def key(self) -> str:
        """Identifies the stage's settings (its timing is kept under this key)."""
        return json_digest([self.config, sorted(self.env.items()), self.extra])[:12]

    def command(self) -> Tuple[str, List[str]]:
        script, args = config_command(self.config, self.env)
        return script, args + self.extra

    def shell_command(self) -> str:
        script, args = self.command()
        return f"OPENAI_LOGDIR={shlex.quote(self.log_dir)} python {script} " + " ".join(map(shlex.quote, args))

    def is_done(self) -> bool:
        """A training is done when its final checkpoints exist and were made by this stage's settings (otherwise it
        runs: it resumes, or its config.json check names the flags that changed). An evaluation always runs: the
        driver reuses every finished batch."""
        if self.kind != "train":
            return False
        from guided_diffusion.quickstart import final_checkpoint_exists

        stamp = Path(self.log_dir, STAGE_STAMP)
        return (final_checkpoint_exists(self.log_dir, self.done_step, self.ema_rate) and stamp.is_file()
                and stamp.read_text().strip() == self.key)

    def mark_done(self) -> None:
        if self.kind == "train":
            fileio.write_text(Path(self.log_dir, STAGE_STAMP), self.key + "\n")


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


def _model_env(args: argparse.Namespace, in_channels: int, image_size: int) -> Dict[str, str]:
    return {"IMAGE_SIZE": str(image_size), "IN_CHANNELS": str(in_channels), "NUM_CHANNELS": str(args.num_channels),
            "NUM_RES_BLOCKS": str(args.num_res_blocks), "CHANNEL_MULT": args.channel_mult,
            "ATTENTION_RESOLUTIONS": args.attention_resolutions, "CLASSIFIER_WIDTH": str(args.classifier_width),
            "CLASSIFIER_DEPTH": str(args.classifier_depth),
            "CLASSIFIER_ATTENTION_RESOLUTIONS": args.attention_resolutions}


def train_stage(args: argparse.Namespace, plan: Plan, model: str, seed: int, shape: Tuple[int, int]) -> Stage:
    spec = MODELS[model]
    config = spec.config + (f"_{args.fpdm_unet_ver}" if model == "anofpdm" and args.fpdm_unet_ver != "v2" else "")
    log_dir = str(plan.model_dir(model, seed))
    in_channels, image_size = shape
    env = {**_model_env(args, in_channels, image_size), **dict(spec.env), "DATA_DIR": plan.data_dir,
           "OPENAI_LOGDIR": log_dir, "BATCH_SIZE": str(args.train_batch)}
    if model == "anofpdm":
        env.update(DROPOUT="0", W="30" if plan.name == "atlas" else "2")  # as the quickstart (W: preview grids)
    interval = max(1, args.train_steps // 4)
    common = ["--lr", str(args.lr), "--save_interval", str(interval), "--log_interval", str(max(1, min(50, interval))),
              "--seed", str(seed), "--num_workers", "0", "--resume_checkpoint", "auto"]
    if spec.classifier:
        extra = common + ["--iterations", str(args.train_steps), "--eval_interval", str(interval), "--val_batches", "2"]
        rate = ""
    else:
        extra = common + ["--max_steps", str(args.train_steps), "--total_epochs", "100000", "--ema_rate",
                          args.ema_rate, "--sample_shape", "4", str(in_channels), str(image_size), str(image_size),
                          "--preview_steps", str(args.preview_steps)]
        rate = args.ema_rate
    return Stage(f"train {model}", "train", seed, f"run_train_{dataset_tag(plan.name)}_{config}.sh", env, extra, log_dir,
                 args.train_steps, rate)


def eval_stage(args: argparse.Namespace, plan: Plan, method: str, seed: int, shape: Tuple[int, int]) -> Stage:
    spec = METHODS[method]
    in_channels = shape[0]
    config = spec.config + (f"_{args.fpdm_unet_ver}" if method == "anofpdm" and args.fpdm_unet_ver != "v2" else "")
    log_dir = str(plan.eval_dir(method, seed))
    env = {"DATA_DIR": plan.data_dir, "OUT_DIR": log_dir, "SEED": str(seed), "EMA": "True",
           "MODEL_NUM": str(args.train_steps), "IN_CHANNELS": str(in_channels),
           "BATCH_SIZE": str(args.eval_batch), "BATCH_SIZE_VAL": str(args.eval_batch),
           "NUM_BATCHES": str(args.test_batches), "NUM_BATCHES_VAL": str(args.val_batches),
           "MODEL_DIR": str(plan.model_dir(spec.models[0], seed))}
    if args.modality:
        env["MODALITY"] = args.modality
    elif in_channels == 1:
        env["MODALITY"] = "0"
    if method.startswith("anoddpm"):
        env.update(NOISE_TYPE=method.split("_")[1], USE_DDPM="True",
                   SWEEP=str(getattr(args, f"{method}_steps")))
    elif method == "clf_guided":
        env.update(SAMPLE_STEPS=str(args.clf_steps), CLF_DIR=str(plan.model_dir("classifier", seed)),
                   CLF_NUM=str(args.train_steps))
        if args.classifier_scale:
            env["SWEEP"] = args.classifier_scale
    elif method == "ddib":
        env["SAMPLE_STEPS"] = str(args.ddib_steps)
        if args.ddib_w:
            env["SWEEP"] = args.ddib_w
    else:
        env["FORWARD_STEPS"] = str(args.forward_steps)
        if args.w:
            env["SWEEP"] = args.w
    extra = ["--timestep_respacing", args.respacing, "--num_panels", "4", "--progress", "True"]
    return Stage(f"evaluate {method}", "evaluate", seed, f"run_translation_{dataset_tag(plan.name)}_{config}.sh", env,
                 extra, log_dir)


def make_plan(args: argparse.Namespace, data_dir: str) -> Plan:
    plan = Plan(Path(args.out), os.path.abspath(data_dir), args.name, list(args.seeds),
                [m for m in METHODS if m in args.methods])
    shape = data_shape(plan.data_dir)
    for seed in plan.seeds:
        needed = [m for m in MODELS if any(m in METHODS[k].models for k in plan.methods)]
        plan.stages += [train_stage(args, plan, m, seed, shape) for m in needed]
        plan.stages += [eval_stage(args, plan, k, seed, shape) for k in plan.methods]
    return plan


# ------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"\n=== [comparison {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def ensure_data(out: Path) -> str:
    """The quickstart's synthetic data in ``out/data``, made by its own data stage (``STOP_AFTER=data``) when the
    folder is not complete; the quickstart's variables (SUBJECTS, SYNTH_SHAPE, IMAGE_SIZE, ...) reach it unchanged."""
    data = out / "data"
    if (data / DATA_DONE).is_file() and (data / "npy_test").is_dir():
        say(f"data: {data} (complete, reused)")
        return str(data)
    say(f"data: the quickstart's data stage into {out}")
    env = dict(os.environ, OUT_DIR=str(out), STOP_AFTER="data", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "config" / "run_quickstart.sh")], env=env)
    if proc.returncode != 0:
        raise StageError(f"the quickstart's data stage failed (exit {proc.returncode}); rerun to continue it: "
                         f"OUT_DIR={out} STOP_AFTER=data bash config/run_quickstart.sh")
    fileio.write_text(data / DATA_DONE, "written by guided_diffusion.evaluation.comparison once the data stage "
                                        "succeeded\n")
    return str(data)


def run_script(script: str, args: Sequence[str], log_dir: str) -> None:
    """Run ``scripts/<name>.py args`` in this process as ``python`` would (``__main__``), OPENAI_LOGDIR = ``log_dir``."""
    from guided_diffusion import logger

    saved_argv, saved_dir = sys.argv, os.environ.get("OPENAI_LOGDIR")
    sys.argv = [script, *args]
    os.environ["OPENAI_LOGDIR"] = log_dir
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise StageError(f"exit status {e.code}") from None
    except Exception as e:  # noqa: BLE001  (any error of the script: shown, then named with its stage)
        traceback.print_exc()
        raise StageError(f"{type(e).__name__}: {e}") from None
    finally:
        sys.argv = saved_argv
        if saved_dir is None:
            os.environ.pop("OPENAI_LOGDIR", None)
        else:
            os.environ["OPENAI_LOGDIR"] = saved_dir
        logger.reset()


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


def run_plan(plan: Plan) -> None:
    timings = Timings(plan.out / "timings.json")
    for i, stage in enumerate(plan.stages, 1):
        where = f"{stage.name} (seed {stage.seed}) [{i}/{len(plan.stages)}] -> {stage.log_dir}"
        if stage.is_done():
            say(f"{where}: final checkpoint found, reused")
            continue
        say(where)
        os.makedirs(stage.log_dir, exist_ok=True)
        w0, c0 = time.time(), cpu_seconds()
        try:
            run_script(*stage.command(), stage.log_dir)
        except StageError as e:
            raise StageError(f"{stage.name} (seed {stage.seed}) failed: {e}. Its log: {stage.log_dir}/log.txt. "
                             f"Rerun the comparison to continue, or run the stage alone:\n  {stage.shell_command()}") from None
        timings.record(stage, time.time() - w0, cpu_seconds() - c0)
        stage.mark_done()


# ------------------------------------------------------------------------------------------------------
# Results: the table and the picture
# ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One finished evaluation folder."""

    method: str
    folder: Path
    metrics: dict

    @classmethod
    def read(cls, method: str, folder: Path) -> "Run":
        path = Path(folder) / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{method}: cannot read {path} ({e}); is the evaluation finished?") from None
        return cls(method, Path(folder), metrics)

    def value(self, setup: str, metric: str) -> Optional[float]:
        v = self.metrics.get(setup, {}).get(metric)
        return None if v is None else float(v)

    def per_slice(self) -> List[dict]:
        path = self.folder / "per_slice.csv"
        try:
            with open(path, newline="") as f:
                return list(csv.DictReader(f))
        except OSError as e:
            raise ValueError(f"{self.method}: cannot read {path} ({e})") from None

    def slice_files(self, rows: Sequence[dict]) -> List[str]:
        """The test slices of this run in its order (``patient_<P>/slice_<z>.npz``)."""
        out: List[str] = []
        for name in dict.fromkeys(r["file"] for r in rows):
            with np.load(self.folder / "batches" / name) as z:
                out += [str(s) for s in z["slice_file"]]
        return out


def mean_sd(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, sample sd, n) of the values that are not None; sd None for fewer than two."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _cell(mean: Optional[float], sd: Optional[float]) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def table_rows(runs: Dict[str, List[Run]]) -> List[dict]:
    """One row per method: mean and sd over its runs of each setup's Dice / IoU / AUPRC (fractions), the pixel-label
    mark and the slice counts. Raises ValueError when the runs of a method disagree on the mark."""
    rows = []
    for method, method_runs in runs.items():
        marks = {bool(r.metrics.get("pixel_labels_used")) for r in method_runs}
        if len(marks) != 1:
            raise ValueError(f"{method}: pixel_labels_used differs between its runs ({[str(r.folder) for r in method_runs]})")
        row = {"method": method, "label": METHODS[method].label if method in METHODS else method,
               "pixel_labels_used": marks.pop(), "seeds": len(method_runs),
               "folders": " ".join(str(r.folder) for r in method_runs)}
        for setup in SETUPS:
            for metric in METRICS:
                mean, sd, _ = mean_sd([r.value(setup, metric) for r in method_runs])
                row[f"{setup}_{metric}_mean"], row[f"{setup}_{metric}_sd"] = mean, sd
            row[f"{setup}_slices"] = "/".join(sorted({str(r.metrics.get(setup, {}).get("n_slices")) for r in method_runs}))
        mean, sd, _ = mean_sd([r.metrics.get("accuracy") for r in method_runs])
        row["accuracy_mean"], row["accuracy_sd"] = mean, sd
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = ("| method | tuned with pixel labels | mixed Dice | mixed IoU | mixed AUPRC | unhealthy Dice | unhealthy IoU "
            "| unhealthy AUPRC |")
    lines = [head, "|---|:-:|" + "--:|" * 6]
    for r in rows:
        cells = [_cell(r[f"{s}_{m}_mean"], r[f"{s}_{m}_sd"]) for s in SETUPS for m in METRICS]
        lines.append(f"| {r['label']} | {'✓' if r['pixel_labels_used'] else '✗'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings_line(run: Run) -> str:
    s = run.metrics.get("settings", {})
    keys = ("sample_steps", "noise_type", "use_ddpm", "classifier_scale", "w", "forward_steps", "modality")
    shown = ", ".join(f"{k} {s[k]}" for k in keys if k in s)
    hyper = run.metrics.get("hyperparams", {})
    thr = hyper.get("threshold", hyper.get("thr_01"))
    return shown + (f"; threshold {thr:.3g}" if isinstance(thr, (int, float)) else "")


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    cols = ["method", "label", "pixel_labels_used", "seeds"]
    cols += [f"{s}_{m}_{k}" for s in SETUPS for m in METRICS for k in ("mean", "sd")]
    cols += ["mixed_slices", "unhealthy_slices", "accuracy_mean", "accuracy_sd", "folders"]
    fileio.write_csv(path, cols, rows)


def check_same_slices(runs: Dict[str, List[Run]]) -> Dict[Tuple[str, int], List[dict]]:
    """Every method's i-th run evaluated the same test slices in the same order; returns each run's per-slice rows
    keyed by (method, run index). Raises ValueError naming the runs that differ."""
    rows = {(m, i): r.per_slice() for m, rs in runs.items() for i, r in enumerate(rs)}
    n_runs = {len(rs) for rs in runs.values()}
    for i in range(min(n_runs)):
        ref_method = next(iter(runs))
        ref = runs[ref_method][i].slice_files(rows[(ref_method, i)])
        for m, rs in runs.items():
            mine = rs[i].slice_files(rows[(m, i)])
            if mine != ref:
                raise ValueError(f"{m} ({rs[i].folder}) and {ref_method} ({runs[ref_method][i].folder}) did not evaluate "
                                 f"the same test slices ({len(mine)} and {len(ref)} slices); they need the same data, "
                                 "seed and batches")
    return rows


def pick_slices(rows: Sequence[dict], n: int) -> List[int]:
    """Indices into ``rows`` (per_slice.csv) of ``n`` test slices for the picture: two thirds unhealthy, evenly
    spread over the larger half of the lesion sizes (largest first), then healthy ones, in file order."""
    unhealthy = sorted((i for i, r in enumerate(rows) if r["label"] == "1"), key=lambda i: -int(rows[i]["gt_pixels"]))
    healthy = [i for i, r in enumerate(rows) if r["label"] == "0"]
    k = min(len(unhealthy), n - min(len(healthy), n // 3))
    larger = unhealthy[:max(k, len(unhealthy) // 2)]
    chosen = [larger[j] for j in np.linspace(0, len(larger) - 1, k).round().astype(int)] if k else []
    return chosen + healthy[: n - len(chosen)]


def write_picture(path: Path, runs: Dict[str, List[Run]], rows: Dict[Tuple[str, int], List[dict]], n: int) -> dict:
    """comparison.png: the first run of every method on the same ``n`` test slices (visualize.save_method_columns)."""
    from guided_diffusion.evaluation.visualize import save_method_columns
    from guided_diffusion.metrics import dice_iou_per_slice

    methods = list(runs)
    ref = rows[(methods[0], 0)]
    picked = pick_slices(ref, n)
    if not picked:
        return {}

    def arrays(method: str, i: int) -> dict:
        r = rows[(method, 0)][i]
        with np.load(runs[method][0].folder / "batches" / r["file"]) as z:
            k = int(r["index"])
            return {"input": z["panel_input"][k, 0].astype(np.float32), "gt": z["gt"][k, 0],
                    "map": z["anomaly_map_0"][k, 0], "mask": z["mask_0"][k, 0], "slice": str(z["slice_file"][k])}

    first = [arrays(methods[0], i) for i in picked]
    per_method = {m: [arrays(m, i) for i in picked] for m in methods}
    captions = [[f"Dice {dice_iou_per_slice(a['mask'][None, None], a['gt'][None, None])[0][0]:.2f}" for a in per_method[m]]
                for m in methods]
    notes = [[a["slice"], f"{'unhealthy' if a['gt'].any() else 'healthy'}, lesion {int(a['gt'].sum())} px",
              "above: anomaly maps", "right: predicted masks"] for a in first]
    titles = [METHODS[m].label + (" *" if runs[m][0].metrics.get("pixel_labels_used") else "") if m in METHODS else m
              for m in methods]
    return save_method_columns(str(path), [a["input"] for a in first], [a["gt"] for a in first], titles,
                               [[a["map"] for a in per_method[m]] for m in methods],
                               [[a["mask"] for a in per_method[m]] for m in methods], notes=notes,
                               mask_captions=captions)


def write_results(out: Path, runs: Dict[str, List[Run]], num_slices: int, header: Sequence[str] = (),
                  footer: Sequence[str] = ()) -> Tuple[str, List[dict]]:
    """comparison.md, comparison.csv and comparison.png for ``runs`` (method -> one finished folder per seed)."""
    rows = table_rows(runs)
    per_slice = check_same_slices(runs)
    picture = write_picture(out / "comparison.png", runs, per_slice, num_slices) if num_slices else {}
    table = format_table(rows)
    lines = ["# Comparison of anomaly-segmentation methods (layout of Che et al., Table 1)", "", *header, "", table, "",
             "Values in %: mean ± sd over the seeds (no sd for one seed). Mixed: all test slices (a healthy slice "
             "predicted empty scores 1); unhealthy: the slices with a lesion. ✓: the threshold was tuned on validation "
             "slices with pixel labels (`pixel_labels_used` in metrics.json); ✗: slice labels only.", ""]
    lines += ["| method | settings (first run) | runs |", "|---|---|---|"]
    for r in rows:
        first = runs[r["method"]][0]
        lines.append(f"| {r['label']} | {_settings_line(first)} | {r['folders']} |")
    if picture:
        lines += ["", f"Picture: comparison.png ({picture['columns']} columns: input, ground truth, one per method; "
                      "per slice a row of anomaly maps and a row of masks; * = tuned with pixel labels)."]
    lines += ["", *footer]
    text = "\n".join(lines).rstrip() + "\n"
    fileio.write_text(out / "comparison.md", text)
    write_csv(out / "comparison.csv", rows)
    return table, rows


def parse_from_runs(items: Sequence[str]) -> Dict[str, List[Run]]:
    runs: Dict[str, List[Run]] = {}
    for item in items:
        method, sep, folders = item.partition("=")
        if not sep or not folders:
            raise ValueError(f"--from_runs takes METHOD=DIR[,DIR...], got {item!r}")
        runs[method] = [Run.read(method, Path(d)) for d in folders.split(",") if d]
    order = [m for m in METHODS if m in runs] + [m for m in runs if m not in METHODS]
    return {m: runs[m] for m in order}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = create_argparser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    fileio.sweep_temp_files(str(out))
    start_wall, start_cpu, start_load = time.time(), cpu_seconds(), os.getloadavg()
    try:
        if args.from_runs:
            runs = parse_from_runs(args.from_runs)
            table, _ = write_results(out, runs, args.num_slices, header=[f"Runs: {', '.join(runs)}"])
            print(table)
            return 0
        data_dir = args.data_dir or ensure_data(out)
        plan = make_plan(args, data_dir)
        run_plan(plan)
        runs = {m: [Run.read(m, plan.eval_dir(m, s)) for s in plan.seeds] for m in plan.methods}
        timings = Timings(out / "timings.json")
        computed = [timings.get(s) for s in plan.stages]
        wall, cpu = time.time() - start_wall, cpu_seconds() - start_cpu
        end_load = os.getloadavg()
        stage_lines = ["| stage | seed | wall min | CPU min |", "|---|---|--:|--:|"]
        stage_lines += [f"| {s.name} | {s.seed} | {t['wall_s'] / 60:.1f} | {t['cpu_s'] / 60:.1f} |"
                        for s, t in zip(plan.stages, computed) if t]
        total = [t for t in computed if t]
        channels, size = data_shape(plan.data_dir)
        first = runs[plan.methods[0]][0].metrics
        header = [f"Data: {plan.data_dir} ({args.name}, {channels} channels, {size}×{size} px; test slices: "
                  f"{first['mixed'].get('n_slices')}, {first['unhealthy'].get('n_slices')} with a lesion). Seeds "
                  f"{' '.join(map(str, plan.seeds))} (training and evaluation). Every model: {args.train_steps} steps "
                  f"of batch {args.train_batch}, {args.num_channels} channels; every method on the {args.respacing} "
                  "grid."]
        footer = [f"Machine: {runtime.machine_description(load=False)}.",
                  f"This call: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, load average {start_load[0]:.1f} at the "
                  f"start, {end_load[0]:.1f} at the end. Stages as first computed (timings.json): "
                  f"{sum(t['wall_s'] for t in total) / 60:.1f} min wall, {sum(t['cpu_s'] for t in total) / 60:.1f} min CPU.",
                  "", *stage_lines]
        table, _ = write_results(out, runs, args.num_slices, header=header, footer=footer)
    except (StageError, ValueError, fileio.DiskFullError) as e:
        print(f"comparison: error: {e}", file=sys.stderr, flush=True)
        return 1
    bar = "=" * 100
    print(f"\n{bar}\nComparison on {plan.data_dir} (seeds {' '.join(map(str, plan.seeds))})\n{table}\n"
          f"✓: threshold tuned with pixel labels. Table: {out / 'comparison.md'} (and comparison.csv); picture: "
          f"{out / 'comparison.png'}\ntime {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (load average "
          f"{start_load[0]:.1f} -> {end_load[0]:.1f})\n{bar}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
