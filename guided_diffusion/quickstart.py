"""Helpers of the one-command demo ``config/run_quickstart.sh`` (synthetic data, stage checks, the summary).

    python -m guided_diffusion.quickstart trained --model_dir runs/quickstart/model --step 1500 --ema_rate 0.995
    python -m guided_diffusion.quickstart report --results runs/quickstart/results [--seconds 1234]

``trained`` exits 0 when the final checkpoint set of a training run exists (the shell script then skips training).
``report`` prints the metrics block of a finished translation run and lists the pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from guided_diffusion.errors import UserError, entry_point

SETUPS = ("mixed", "unhealthy")

# What the defaults reach on data they were not tuned on (bench/quickstart_eval.py, the README's "Two commands"):
# printed under every run's own figures so that one run is read against the spread of several.
REFERENCE = ("unhealthy Dice 45.9 ± 11.7 % (4 runs, seed 1: faint 29.3, multi 54.8, small 53.5, default 45.9; "
             "106-213 unhealthy slices each; README)")


def final_checkpoint_exists(model_dir: str, step: int, ema_rate: str) -> bool:
    """True when training wrote complete (readable) step-``step`` model and EMA checkpoints."""
    from guided_diffusion import fileio

    rates = [r for r in str(ema_rate).split(",") if r.strip()]
    paths = fileio.checkpoint_paths(model_dir, step, rates)
    return all(fileio.checkpoint_problem(paths[key]) is None for key in ["model"] + [f"ema_{fileio.format_rate(r)}"
                                                                                      for r in rates])


def _pct(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100.0 * value:6.1f}"


def format_report(metrics: dict, results_dir: str, seconds: Optional[float] = None) -> str:
    """The quickstart's closing block: Dice / IoU / AUPRC per setup, accuracy, settings, where the files are."""
    settings = metrics.get("settings", {})
    lines = [
        "",
        "================ AnoFPDM quickstart: synthetic BraTS test slices ================",
        f"guidance w={settings.get('w')}, forward steps {settings.get('forward_steps')}, "
        f"modalities {settings.get('modality')} (0 = FLAIR, 3 = T2), checkpoint {os.path.basename(str(metrics.get('checkpoint', '?')))}",
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m guided_diffusion.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trained", help="exit 0 if the final checkpoint set exists, 1 otherwise")
    t.add_argument("--model_dir", required=True)
    t.add_argument("--step", type=int, required=True)
    t.add_argument("--ema_rate", default="0.9999")
    r = sub.add_parser("report", help="print the metrics of a finished translation run")
    r.add_argument("--results", required=True, help="the translation's OPENAI_LOGDIR (holds metrics.json)")
    r.add_argument("--seconds", type=float, default=None, help="elapsed time to print")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "trained":
        return 0 if final_checkpoint_exists(args.model_dir, args.step, args.ema_rate) else 1
    path = os.path.join(args.results, "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; run the translation step first") from None
    print(format_report(metrics, args.results, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
