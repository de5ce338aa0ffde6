"""The comparison table of the paper (Che et al., Table 1) from finished evaluation folders: ``comparison.md``,
``comparison.csv`` and ``comparison.png``.

``anofpdm compare`` (``commands/compare.py``) trains and evaluates every method at a small size and writes these;
``anofpdm compare --from_runs anofpdm=DIR ddib=DIR ...`` tabulates finished runs. The table has the mixed and
unhealthy Dice / IoU / AUPRC per method, mean ± sd over the runs (seeds), with a mark for the methods whose threshold
was tuned with pixel labels (``pixel_labels_used`` of their ``metrics.json``); the picture shows one column per
method for the same test slices.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from guided_diffusion import fileio

SETUPS = ("mixed", "unhealthy")
METRICS = ("dice", "iou", "auprc")
#: the rows of the paper's Table 1, in its order: key -> label
ROWS: Dict[str, str] = {
    "anoddpm_gaussian": "AnoDDPM (G)",
    "anoddpm_simplex": "AnoDDPM (S)",
    "clf_guided": "DDIM clf",
    "ddib": "DDIM clf-free (DDIB)",
    "anofpdm": "AnoFPDM (DDIM)",
}

#: the method (and settings) whose evaluation each row shows: --from_runs refuses another method's folder
ROW_METHODS: Dict[str, Tuple[str, Dict[str, str]]] = {
    "anoddpm_gaussian": ("anoddpm", {"noise_type": "gaussian"}),
    "anoddpm_simplex": ("anoddpm", {"noise_type": "simplex"}),
    "clf_guided": ("clf_guided", {}),
    "ddib": ("ddib", {}),
    "anofpdm": ("anofpdm", {}),
}


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
        """The finished evaluation in ``folder`` as the row ``method``; a ValueError when it cannot be read or is
        another method's evaluation (``ROW_METHODS``)."""
        path = Path(folder) / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ValueError(f"{method}: cannot read {path} ({e}); is the evaluation finished?") from None
        if method in ROW_METHODS:
            want, settings = ROW_METHODS[method]
            ran = metrics.get("method")
            found = {k: (metrics.get("settings") or {}).get(k) for k in settings}
            if ran != want or any(v is not None and v != settings[k] for k, v in found.items()):
                what = " ".join([str(ran)] + [f"--{k} {v}" for k, v in found.items() if v is not None])
                need = " ".join([want] + [f"--{k} {v}" for k, v in settings.items()])
                raise ValueError(f"{method}={folder}: {path} is an evaluation of {what}, not of {ROWS[method]} "
                                 f"({need}); pass the folder of a {need} evaluation for this row")
        return cls(method, Path(folder), metrics)

    def value(self, setup: str, metric: str) -> Optional[float]:
        v = self.metrics.get(setup, {}).get(metric)
        return None if v is None else float(v)

    def per_slice(self) -> List[dict]:
        path = self.folder / "per_slice.csv"
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise ValueError(f"{self.method}: cannot read {path} ({e})") from None
        missing = sorted({"file", "index", "label", "gt_pixels"} - set(rows[0] if rows else {}))
        if missing:
            raise ValueError(f"{self.method}: {path} has no {', '.join(missing)} column(s) (no rows, or not written "
                             f"by an evaluation); rerun the evaluation into {self.folder}")
        return rows

    def batch(self, name: str) -> Dict[str, np.ndarray]:
        """The arrays of one of the run's test batch files (``batches/<name>``)."""
        from guided_diffusion.evaluation.batch_store import BATCH_DIR, load_batch

        path = self.folder / BATCH_DIR / name
        data = load_batch(str(path))
        if data is None:
            raise ValueError(f"{self.method}: cannot read {path} ({'truncated or corrupt' if path.exists() else 'missing'})"
                             f": the table checks the test slices and draws the picture from {self.folder / BATCH_DIR}."
                             f" Rerun the evaluation into {self.folder} (it recomputes missing or damaged batches), "
                             "or pass another folder")
        return data

    def slice_files(self, rows: Sequence[dict]) -> List[str]:
        """The test slices of this run in its order (``patient_<P>/slice_<z>.npz``)."""
        out: List[str] = []
        for name in dict.fromkeys(r["file"] for r in rows):
            out += [str(s) for s in self.batch(name)["slice_file"]]
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
        row = {"method": method, "label": ROWS.get(method, method),
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
        z = runs[method][0].batch(r["file"])
        k = int(r["index"])
        return {"input": z["panel_input"][k, 0].astype(np.float32), "gt": z["gt"][k, 0],
                "map": z["anomaly_map_0"][k, 0], "mask": z["mask_0"][k, 0], "slice": str(z["slice_file"][k])}

    first = [arrays(methods[0], i) for i in picked]
    per_method = {m: [arrays(m, i) for i in picked] for m in methods}
    captions = [[f"Dice {dice_iou_per_slice(a['mask'][None, None], a['gt'][None, None])[0][0]:.2f}" for a in per_method[m]]
                for m in methods]
    notes = [[a["slice"], f"{'unhealthy' if a['gt'].any() else 'healthy'}, lesion {int(a['gt'].sum())} px",
              "above: anomaly maps", "right: predicted masks"] for a in first]
    titles = [ROWS.get(m, m) + (" *" if runs[m][0].metrics.get("pixel_labels_used") else "")
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
    order = [m for m in ROWS if m in runs] + [m for m in runs if m not in ROWS]
    return {m: runs[m] for m in order}
