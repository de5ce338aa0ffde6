"""What an evaluation run writes from its test batches besides metrics.json: ``metrics.csv``, ``per_slice.csv``,
``panels.png`` and, on request, ``per_slice_arrays.npz``."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import numpy as np

from guided_diffusion import fileio
from guided_diffusion.evaluation.batch_store import ARRAY, columns, load_batch, prefixed
from guided_diffusion.metrics import dice_iou_per_slice

SETUPS = ("mixed", "unhealthy")


def write_metrics_csv(path: str, results: List[dict], method: Any) -> None:
    """One row per setup (and per variant of the method, e.g. AnoFPDM's --t_e_ratio values)."""
    lead = [method.variant_key] if method.variant_key else []
    cols = lead + ["setup", "dice", "iou", "auprc", "auroc", "precision", "recall", "n_slices", "accuracy",
                   "method", "pixel_labels_used"]
    rows = []
    for r in results:
        for setup in SETUPS:
            row = {"setup": setup, "accuracy": r["accuracy"], "method": method.name,
                   "pixel_labels_used": method.uses_pixel_labels,
                   **{c: r[setup].get(c) for c in ("dice", "iou", "auprc", "auroc", "precision", "recall",
                                                   "n_slices")}}
            row.update({k: r[k] for k in lead})
            rows.append(row)
    fileio.write_csv(path, cols, rows)


def flat_columns(cols: Dict[str, np.ndarray], n: int) -> Dict[str, Any]:
    """Row ``n`` of the per-slice columns; ``[B, k]`` columns become ``name_m0 .. name_m{k-1}``."""
    row: Dict[str, Any] = {}
    for name, v in cols.items():
        v = np.asarray(v)
        if v.ndim == 1:
            row[name] = v[n].item()
        else:
            row.update({f"{name}_m{j}": x.item() for j, x in enumerate(v[n].reshape(-1))})
    return row


def write_per_slice(path: str, paths: Sequence[str]) -> None:
    """One row per test slice: label, prediction, Dice, IoU, pixel counts and the method's columns."""
    cols = ["file", "index", "label", "pred_label", "dice", "iou", "gt_pixels", "pred_pixels"]
    rows = []
    for p in paths:
        d = load_batch(p)
        dice, iou = dice_iou_per_slice(d["mask_0"], d["gt"])
        extra = columns(d)
        for n in range(d["label"].shape[0]):
            row = {"file": os.path.basename(p), "index": n, "label": int(d["label"][n]),
                   "pred_label": int(d["pred_label_0"][n]), "dice": float(dice[n]), "iou": float(iou[n]),
                   "gt_pixels": int(d["gt"][n].sum()), "pred_pixels": int(d["mask_0"][n].sum())}
            row.update(flat_columns(extra, n))
            cols.extend(c for c in row if c not in cols)
            rows.append(row)
    fileio.write_csv(path, cols, rows)


def short(v: Any) -> str:
    v = np.asarray(v)
    if v.ndim:
        return str([short(x) for x in v.tolist()]).replace("'", "")
    return f"{v.item():.4g}" if np.issubdtype(v.dtype, np.floating) else str(v.item())


def write_panels(path: str, paths: Sequence[str], want: int, method: Any) -> bool:
    """``want`` test slices (unhealthy first, then healthy, in file order): input, ground truth, map, mask."""
    from guided_diffusion.evaluation.visualize import save_panels

    picked: List[tuple] = []
    for wanted_label in (1, 0):
        for p in paths:
            if len(picked) >= want:
                break
            d = load_batch(p)
            for n in np.flatnonzero(d["label"] == wanted_label):
                if len(picked) >= want:
                    break
                picked.append((d, int(n)))
    if not picked:
        return False
    images, gts, maps, masks, captions = [], [], [], [], []
    tag = f"{method.name}{' (pixel labels used)' if method.uses_pixel_labels else ''}"
    for d, n in picked:
        dice, _ = dice_iou_per_slice(d["mask_0"][n:n + 1], d["gt"][n:n + 1])
        images.append(d["panel_input"][n, 0].astype(np.float32))
        gts.append(d["gt"][n, 0])
        maps.append(d["anomaly_map_0"][n, 0])
        masks.append(d["mask_0"][n, 0])
        cols = columns(d)
        shown = "  ".join(f"{c} {short(np.asarray(cols[c])[n])}" for c in method.caption_columns if c in cols)
        captions.append(f"{tag}: label {int(d['label'][n])}  predicted {int(d['pred_label_0'][n])}  "
                        f"dice {dice[0]:.3f}  {shown}".rstrip())
    save_panels(path, images, gts, maps, masks, captions)
    return True


def write_arrays(path: str, paths: Sequence[str]) -> None:
    """Every test slice's input, ground truth, map, masks, labels, columns and the method's arrays."""
    parts: Dict[str, List[np.ndarray]] = {}
    for p in paths:
        d = load_batch(p)
        picked = {"source": d["source"], "gt": d["gt"], "anomaly_map": d["anomaly_map_0"],
                  "pred_mask_all": d["mask_0"], "label": d["label"], "pred_label": d["pred_label_0"],
                  **columns(d), **prefixed(d, ARRAY)}
        for k, v in picked.items():
            parts.setdefault(k, []).append(v)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["pred_mask"] = arrays["pred_mask_all"] & (arrays["pred_label"] == 1)[:, None, None, None]
    fileio.save_npz(path, arrays)
