"""Per-volume reports: the per-volume metrics of an evaluation run's test split (slice space), and the summary of a
whole-volume segmentation run (``subjects.csv``, ``summary.json``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from guided_diffusion import fileio
from guided_diffusion import metrics as M

CSV_FILE = "subjects.csv"
SUMMARY_FILE = "summary.json"

# ------------------------------------------------------------------------------------------------------------
# Per-volume metrics of a translation run's test split (slice space)


def _patient_of(slice_file: str) -> str:
    folder = str(slice_file).split("/")[0]
    return folder[len("patient_"):] if folder.startswith("patient_") else folder


class _ByPatient:
    """Result batches with each slice's patient as ``volume`` (re-iterable, as the batches it wraps)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for b in self.batches:
            yield {**b, "volume": np.array([_patient_of(f) for f in b["slice_file"]])}


VOLUME_CSV_COLUMNS = ["patient", "n_slices", "gt_voxels", "pred_voxels", "dice", "iou", "auprc", "precision", "recall"]


def test_split_volumes(batches, paths: Sequence[str], data_dir: str, csv_path: str) -> Optional[dict]:
    """Per-volume metrics of the test patients whose every slice the translation run evaluated (``--num_batches
    -1``), in slice space: the patient's kept slices at ``image_size``², stacked (``metrics.per_volume_metrics``).

    ``batches``: the run's result batches with ``slice_file`` (``patient_<P>/slice_<z>.npz``); ``paths``: its batch
    files. Writes ``csv_path`` (one row per complete patient) and returns the summary (mean ± sd over patients with a
    lesion and over all), or None when the batch files do not name their slices (written by an older version).
    No surface metrics (HD95, NSD) here: the slices were resized to ``image_size``² and the voxel size of that grid
    is not known in mm; whole-volume segmentation (anofpdm segment) reports them on the scan's own grid.
    """
    from guided_diffusion.data.loaders import slice_paths

    seen: Dict[str, int] = {}
    for p in paths:
        with np.load(p) as z:
            if "slice_file" not in z.files:
                return None
            for f in z["slice_file"]:
                seen[_patient_of(f)] = seen.get(_patient_of(f), 0) + 1
    root = Path(data_dir) / "npy_test"
    complete = sorted(v for v, n in seen.items() if n == len(slice_paths(root / f"patient_{v}")))
    summary: Dict[str, Any] = {"space": "preprocessed slices (kept range, image_size^2)", "n_volumes": len(complete),
                               "n_incomplete": len(seen) - len(complete),
                               "surface_metrics": "none in slice space (voxel size in mm unknown after resizing); "
                                                  "anofpdm segment reports HD95 and NSD in mm"}
    if not complete:
        summary["note"] = "no test patient had every slice evaluated (--num_batches -1 evaluates the whole split)"
        return summary
    per = M.per_volume_metrics(_ByPatient(batches), volumes=complete)
    rows = [{"patient": v, **per[v]} for v in complete]
    fileio.write_csv(csv_path, VOLUME_CSV_COLUMNS, rows)
    lesion = [r for r in rows if r["gt_voxels"] > 0]
    for group, rs in (("with_lesion", lesion), ("all", rows)):
        summary[group] = {k: M.mean_sd(r[k] for r in rs) for k in ("dice", "iou", "auprc")}
    summary["csv"] = os.path.basename(csv_path)
    return summary


# ------------------------------------------------------------------------------------------------------------
# The run


CSV_COLUMNS = ["id", "status", "n_slices", "n_unhealthy_slices", "lesion_ml", "gt_ml", "dice", "iou", "auprc",
               "hd95_mm", "nsd", "slice_dice_mixed", "slice_iou_mixed", "slice_auprc_mixed", "slice_dice_unhealthy",
               "slice_iou_unhealthy", "slice_auprc_unhealthy", "slice_accuracy", "seconds", "message"]


def _csv_row(record: dict) -> dict:
    row = {"id": record["id"], "status": "done", "n_slices": record["slices"]["n_kept"],
           "n_unhealthy_slices": record["slices"]["n_unhealthy"], "lesion_ml": record["lesion"]["ml"],
           "seconds": record.get("seconds")}
    m = record.get("metrics")
    if m:
        v, s = m["volume"], m["slice"]
        row.update(gt_ml=v["gt_ml"], dice=v["dice"], iou=v["iou"], auprc=v["auprc"], hd95_mm=v.get("hd95_mm"),
                   nsd=v.get("nsd"), slice_accuracy=s["accuracy"])
        for setup in ("mixed", "unhealthy"):
            for k in ("dice", "iou", "auprc"):
                row[f"slice_{k}_{setup}"] = s[setup][k]
    return row


def summarize(records: Sequence[dict], failures: Sequence[dict]) -> dict:
    """Mean ± sd across subjects of the per-volume and per-subject slice-level metrics, and the slice-level Dice /
    IoU over all slices of all subjects (what the translation run would report on them)."""
    with_gt = [r for r in records if r.get("metrics")]
    lesion = [r for r in with_gt if r["metrics"]["volume"]["gt_voxels"] > 0]
    out: Dict[str, Any] = {"subjects": len(records) + len(failures), "done": len(records), "failed": list(failures),
                           "with_ground_truth": len(with_gt), "with_lesion": len(lesion),
                           "lesion_ml": M.mean_sd(r["lesion"]["ml"] for r in records)}
    for group, rs in (("volume_with_lesion", lesion), ("volume_all", with_gt)):
        out[group] = {k: M.mean_sd(r["metrics"]["volume"].get(k) for r in rs)
                      for k in ("dice", "iou", "auprc", "precision", "recall", "pred_ml", "gt_ml", "hd95_mm", "nsd")}
    out["nsd_tolerance_mm"] = next((r["metrics"]["volume"].get("nsd_tolerance_mm") for r in with_gt), None)
    out["slice_per_subject"] = {f"{k}_{setup}": M.mean_sd(r["metrics"]["slice"][setup][k] for r in with_gt)
                                for setup in ("mixed", "unhealthy") for k in ("dice", "iou", "auprc")}
    pooled = {}
    for setup in ("mixed", "unhealthy"):
        n = [r["metrics"]["slice"][setup]["n_slices"] for r in with_gt]
        pooled[setup] = {"n_slices": int(sum(n))}
        for k in ("dice", "iou"):
            vals = [(r["metrics"]["slice"][setup][k], w) for r, w in zip(with_gt, n) if w > 0]
            total = sum(w for _, w in vals)
            pooled[setup][k] = float(sum(v * w for v, w in vals) / total) if total else None
    out["slice_all_slices"] = pooled
    return out


def _fmt_ms(stat: dict, pct: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    scale = 100 if pct else 1
    sd = "" if stat["sd"] is None else f" ± {scale * stat['sd']:.1f}"
    return f"{scale * stat['mean']:.1f}{sd} (n={stat['n']})"


def format_summary(summary: dict) -> str:
    lines = [f"{summary['done']} of {summary['subjects']} subjects segmented, {len(summary['failed'])} failed; "
             f"lesion volume {_fmt_ms(summary['lesion_ml'], pct=False)} ml"]
    if summary["with_ground_truth"]:
        v, s = summary["volume_with_lesion"], summary["slice_per_subject"]
        lines.append(f"per volume (subjects with a lesion), %: Dice {_fmt_ms(v['dice'])}, IoU {_fmt_ms(v['iou'])}, "
                     f"AUPRC {_fmt_ms(v['auprc'])}, NSD at {summary['nsd_tolerance_mm']} mm {_fmt_ms(v['nsd'])}; "
                     f"HD95 {_fmt_ms(v['hd95_mm'], pct=False)} mm")
        lines.append(f"per slice, mean over subjects, %: Dice mixed {_fmt_ms(s['dice_mixed'])}, unhealthy "
                     f"{_fmt_ms(s['dice_unhealthy'])}; AUPRC unhealthy {_fmt_ms(s['auprc_unhealthy'])}")
    for f in summary["failed"]:
        lines.append(f"FAILED {f['id']}: {f['message']}")
    return "\n".join(lines)
