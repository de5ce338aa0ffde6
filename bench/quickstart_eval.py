"""Re-measure the quickstart: run ``config/run_quickstart.sh`` for several synthetic presets and seeds, one table.

    python bench/quickstart_eval.py --out runs/quickstart_eval --presets default small faint multi --seeds 0 1 2
    python bench/quickstart_eval.py --out runs/qe --presets small --seeds 5 -- TRAIN_STEPS=2000 FORWARD_STEPS=40

Every run is a full quickstart (data, preprocessing, training, AnoFPDM on the whole validation and test splits) in
``<out>/<preset>_s<seed>``; runs already finished are reused, so the command resumes. Trailing ``NAME=VALUE``
arguments are passed to every run as environment variables (the quickstart's settings). The table (``<out>/
results.md`` and ``results.csv``) gives, per preset, mean ± sd over the seeds of the unhealthy and mixed Dice,
IoU and AUPRC, the classification accuracy, the number of unhealthy test slices and the wall time per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from guided_diffusion import fileio  # noqa: E402  (atomic writes: an interrupted bench leaves no half table)

METRICS = (("unhealthy", "dice"), ("unhealthy", "iou"), ("unhealthy", "auprc"), ("mixed", "dice"),
           ("mixed", "auprc"), (None, "accuracy"))


def run_one(out: Path, preset: str, seed: int, extra_env: Dict[str, str], log: Path) -> Optional[dict]:
    """One quickstart run (resumable); its metrics.json plus the wall time, or None if it failed."""
    env = dict(os.environ, OUT_DIR=str(out), PRESET=preset, SEED=str(seed), TEST_BATCHES="-1", VAL_BATCHES="-1",
               PYTHON=sys.executable, INSTALL="never", **extra_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    timing = out / "wall_seconds.json"
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.run(["bash", str(REPO / "config" / "run_quickstart.sh")], env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"  {preset} seed {seed}: FAILED (exit {proc.returncode}), see {log}", flush=True)
        return None
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    if not timing.exists():  # the first complete run's time; a resumed run would report only the rest
        fileio.write_json(timing, {"seconds": time.time() - t0})
    metrics["wall_seconds"] = json.loads(timing.read_text())["seconds"]
    return metrics


def _value(m: dict, setup: Optional[str], key: str) -> Optional[float]:
    v = m.get(key) if setup is None else m.get(setup, {}).get(key)
    return None if v is None else float(v)


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"  # one run: no spread to report
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def summarise(results: Dict[str, List[dict]]) -> tuple[str, List[dict]]:
    header = ("| preset | runs | unhealthy Dice % | unhealthy IoU % | unhealthy AUPRC % | mixed Dice % | mixed AUPRC % "
              "| accuracy % | unhealthy test slices | minutes per run |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows = []
    groups = dict(results)
    if len([r for r in results.values() if r]) > 1:  # the headline figure: every run of every preset
        groups["all presets"] = [m for runs in results.values() for m in runs]
    for preset, runs in groups.items():
        if not runs:
            lines.append(f"| {preset} | 0 | (all runs failed) |")
            continue
        cells = [_mean_sd([v for m in runs if (v := _value(m, s, k)) is not None]) for s, k in METRICS]
        n_unh = "/".join(str(n) for n in sorted({int(m["unhealthy"]["n_slices"]) for m in runs}))
        minutes = statistics.fmean(m["wall_seconds"] / 60 for m in runs)
        lines.append(f"| {preset} | {len(runs)} | " + " | ".join(cells) + f" | {n_unh} | {minutes:.1f} |")
        if preset not in results:
            continue  # the pooled row is not a preset of its own in the CSV
        for i, m in enumerate(runs):
            rows.append({"preset": preset, "run": i, **{f"{s or 'cls'}_{k}": _value(m, s, k) for s, k in METRICS},
                         "unhealthy_slices": m["unhealthy"]["n_slices"], "wall_minutes": m["wall_seconds"] / 60})
    return "\n".join(lines), rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart_eval", help="folder for the runs and the table")
    p.add_argument("--presets", nargs="+", default=["default", "small", "faint", "multi"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("settings", nargs="*", help="NAME=VALUE quickstart settings passed to every run")
    args = p.parse_args(argv)
    extra = {}
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            p.error(f"settings must look like NAME=VALUE, got {item!r}")
        extra[name] = value
    root = Path(args.out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    results: Dict[str, List[dict]] = {}
    for preset in args.presets:
        results[preset] = []
        for seed in args.seeds:
            out = root / f"{preset}_s{seed}"
            print(f"{preset} seed {seed} -> {out}", flush=True)
            m = run_one(out, preset, seed, extra, root / f"{preset}_s{seed}.log")
            if m is not None:
                results[preset].append(m)
                print(f"  unhealthy Dice {m['unhealthy']['dice']:.3f} over {m['unhealthy']['n_slices']} slices, "
                      f"{m['wall_seconds'] / 60:.1f} min", flush=True)
    table, rows = summarise(results)
    settings = " ".join(f"{k}={v}" for k, v in extra.items()) or "(quickstart defaults)"
    text = f"Quickstart evaluation, seeds {args.seeds}, settings {settings}\n\n{table}\n"
    fileio.write_text(root / "results.md", text)
    if rows:
        fileio.write_csv(root / "results.csv", list(rows[0]), rows)
    print(text)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
