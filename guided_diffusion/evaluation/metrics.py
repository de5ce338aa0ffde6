"""Evaluation metrics for anomaly segmentation (Dice, IoU, AUPRC, classification accuracy).

Definitions follow upstream ``scripts/evaluate.py`` with its bugs fixed:

* Dice and IoU are computed per slice with a 1e-6 smoothing term and then averaged over slices, so a healthy
  slice with an empty prediction scores 1 and any false-positive component on it scores about 0.
* AUPRC is sklearn's ``average_precision_score`` on the pixels of a group of slices, restricted to the
  foreground (mean over all input channels > -0.95), scored by the anomaly map.
* Precision = TP / (TP + FP) and recall = TP / (TP + FN) (upstream had them swapped).
* A group without any positive pixel (or without any unhealthy slice) has no AUPRC; it is left out of the
  average instead of turning the result into NaN. A metric that is undefined over the whole test set is
  reported as ``None`` (JSON ``null``), never NaN.

Two setups are reported, as in the paper:

* ``mixed``: every test slice; a slice classified healthy gets an empty mask.
* ``unhealthy``: only the slices whose ground-truth label is 1, each with its mask regardless of the
  classification.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

SMOOTH = 1e-6
FOREGROUND_THRESHOLD = -0.95


def _as_bool(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(bool) if a.dtype != bool else a


def dice_iou_per_slice(pred, gt, smooth: float = SMOOTH) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and IoU of binary masks ``[N, ...]`` (all non-batch axes are pooled)."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    n = pred.shape[0]
    p = pred.reshape(n, int(np.prod(pred.shape[1:])))
    g = gt.reshape(n, int(np.prod(gt.shape[1:])))
    inter = np.logical_and(p, g).sum(1).astype(np.float64)
    p_sum = p.sum(1).astype(np.float64)
    g_sum = g.sum(1).astype(np.float64)
    union = np.logical_or(p, g).sum(1).astype(np.float64)
    dice = (2 * inter + smooth) / (p_sum + g_sum + smooth)
    iou = (inter + smooth) / (union + smooth)
    return dice, iou


def foreground_mask(x, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Brain foreground ``[N, 1, H, W]`` of inputs ``[N, C, H, W]`` in [-1, 1]: mean over channels > threshold."""
    x = np.asarray(x, dtype=np.float32)
    return x.mean(axis=1, keepdims=True) > threshold


def auprc(scores, labels) -> Optional[float]:
    """Average precision (area under the precision-recall curve) of pixel scores; None without positives."""
    labels = _as_bool(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    if not labels.any():
        return None
    if labels.all():
        return 1.0
    finite = np.isfinite(scores)
    if not finite.all():  # a NaN map would make sklearn raise; rank such pixels lowest
        scores = np.where(finite, scores, -np.inf)
        scores = np.where(np.isneginf(scores), np.min(scores[finite], initial=0.0) - 1.0, scores)
    return float(average_precision_score(labels, scores))


def auroc(scores, labels) -> Optional[float]:
    """Area under the ROC curve of pixel scores; None unless both classes are present."""
    labels = _as_bool(labels).ravel()
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64).ravel(), nan=-1e30)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def precision_recall(pred, gt) -> dict:
    """Pooled pixel (or slice) precision, recall and F1 of binary predictions; 0 where undefined."""
    pred, gt = _as_bool(pred).ravel(), _as_bool(gt).ravel()
    tp = int(np.logical_and(pred, gt).sum())
    fp = int(np.logical_and(pred, ~gt).sum())
    fn = int(np.logical_and(~pred, gt).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def classification_metrics(labels, pred_labels) -> dict:
    """Slice-level healthy (0) / unhealthy (1) classification: accuracy, precision, recall, specificity, counts."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    pred_labels = np.asarray(pred_labels).astype(np.int64).ravel()
    if labels.shape != pred_labels.shape:
        raise ValueError(f"{labels.shape[0]} labels but {pred_labels.shape[0]} predictions")
    pr = precision_recall(pred_labels == 1, labels == 1)
    tn = int(np.logical_and(pred_labels == 0, labels == 0).sum())
    n = labels.size
    return {
        "accuracy": _ratio(pr["tp"] + tn, n),
        "precision": pr["precision"],
        "recall": pr["recall"],
        "specificity": _ratio(tn, tn + pr["fp"]),
        "f1": pr["f1"],
        "tp": pr["tp"],
        "fp": pr["fp"],
        "tn": tn,
        "fn": pr["fn"],
        "n_slices": int(n),
        "n_unhealthy": int((labels == 1).sum()),
    }


def _weighted_mean(values: Sequence[Optional[float]], weights: Sequence[float]) -> Optional[float]:
    """Mean of the defined values weighted by ``weights``; None when no value with positive weight is defined."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w > 0 and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    if total <= 0:
        return None
    return float(sum(v * w for v, w in pairs) / total)


def evaluate_segmentation(
    batches: Iterable[Mapping[str, np.ndarray]],
    auprc_pooling: str = "batch",
    with_auroc: bool = True,
) -> dict:
    """Metrics of the two setups over a sequence of result batches.

    Each batch maps
      ``label`` int [b] (ground-truth slice label), ``pred_label`` int [b] (predicted slice label),
      ``gt`` bool [b,1,H,W], ``pred_mask`` bool [b,1,H,W] (the mask of every slice, i.e. the unhealthy-setup
      mask; the mixed setup zeroes it for slices predicted healthy), ``anomaly_map`` float [b,1,H,W],
      ``foreground`` bool [b,1,H,W].

    Dice/IoU are means over slices. AUPRC with ``auprc_pooling="batch"`` is computed per batch on the pooled
    foreground pixels and averaged as upstream (mixed: mean over batches; unhealthy: weighted by the
    number of unhealthy slices), skipping batches where it is undefined; ``"global"`` pools the pixels of
    all batches (exact, but holds every foreground pixel in memory).
    """
    if auprc_pooling not in ("batch", "global"):
        raise ValueError(f"auprc_pooling must be 'batch' or 'global', got {auprc_pooling!r}")
    dice_mixed, iou_mixed, dice_unh, iou_unh = [], [], [], []
    labels_all, pred_labels_all = [], []
    ap_mixed, ap_mixed_w, ap_unh, ap_unh_w = [], [], [], []
    roc_mixed, roc_unh = [], []
    pooled = {"mixed": ([], []), "unhealthy": ([], [])}
    pix_mixed, pix_unh = [], []  # pooled pixel predictions and truths for precision/recall
    n_batches = 0
    for b in batches:
        n_batches += 1
        lab = np.asarray(b["label"]).astype(np.int64).ravel()
        plab = np.asarray(b["pred_label"]).astype(np.int64).ravel()
        gt = _as_bool(b["gt"])
        mask_all = _as_bool(b["pred_mask"])
        amap = np.asarray(b["anomaly_map"], dtype=np.float32)
        fg = _as_bool(b["foreground"])
        mask_mixed = mask_all & (plab == 1)[:, None, None, None]
        unh = lab == 1

        d, i = dice_iou_per_slice(mask_mixed, gt)
        dice_mixed.append(d)
        iou_mixed.append(i)
        d, i = dice_iou_per_slice(mask_all[unh], gt[unh])
        dice_unh.append(d)
        iou_unh.append(i)
        labels_all.append(lab)
        pred_labels_all.append(plab)
        pix_mixed.append((mask_mixed[fg], gt[fg]))
        pix_unh.append((mask_all[unh][fg[unh]], gt[unh][fg[unh]]))

        for setup, sel in (("mixed", slice(None)), ("unhealthy", unh)):
            scores, truth = amap[sel][fg[sel]], gt[sel][fg[sel]]
            if auprc_pooling == "global":
                pooled[setup][0].append(scores)
                pooled[setup][1].append(truth)
                continue
            ap = auprc(scores, truth) if truth.size else None
            roc = auroc(scores, truth) if (with_auroc and truth.size) else None
            if setup == "mixed":
                ap_mixed.append(ap)
                ap_mixed_w.append(1.0)
                roc_mixed.append(roc)
            else:
                ap_unh.append(ap)
                ap_unh_w.append(float(unh.sum()))
                roc_unh.append((roc, float(unh.sum())))
    if n_batches == 0:
        raise ValueError("no result batches to evaluate")

    def mean_or_none(chunks: list) -> Optional[float]:
        v = np.concatenate(chunks) if chunks else np.zeros(0)
        return float(v.mean()) if v.size else None

    def pixel_pr(pairs: list) -> dict:
        pred = np.concatenate([p for p, _ in pairs]) if pairs else np.zeros(0, bool)
        truth = np.concatenate([t for _, t in pairs]) if pairs else np.zeros(0, bool)
        pr = precision_recall(pred, truth)
        return {"precision": pr["precision"], "recall": pr["recall"]}

    if auprc_pooling == "global":
        res = {}
        for setup in ("mixed", "unhealthy"):
            s, t = pooled[setup]
            s = np.concatenate(s) if s else np.zeros(0)
            t = np.concatenate(t) if t else np.zeros(0, bool)
            res[setup] = (auprc(s, t) if t.size else None, auroc(s, t) if (with_auroc and t.size) else None)
        auprc_mixed, auroc_mixed = res["mixed"]
        auprc_unh, auroc_unh = res["unhealthy"]
    else:
        auprc_mixed = _weighted_mean(ap_mixed, ap_mixed_w)
        auprc_unh = _weighted_mean(ap_unh, ap_unh_w)
        auroc_mixed = _weighted_mean(roc_mixed, [1.0] * len(roc_mixed))
        auroc_unh = _weighted_mean([r for r, _ in roc_unh], [w for _, w in roc_unh])

    labels_all = np.concatenate(labels_all)
    pred_labels_all = np.concatenate(pred_labels_all)
    cls = classification_metrics(labels_all, pred_labels_all)
    n_unh = int((labels_all == 1).sum())
    mixed = {
        "dice": mean_or_none(dice_mixed),
        "iou": mean_or_none(iou_mixed),
        "auprc": auprc_mixed,
        **pixel_pr(pix_mixed),
        "n_slices": int(labels_all.size),
    }
    unhealthy = {
        "dice": mean_or_none(dice_unh),
        "iou": mean_or_none(iou_unh),
        "auprc": auprc_unh,
        **pixel_pr(pix_unh),
        "n_slices": n_unh,
    }
    if with_auroc:
        mixed["auroc"] = auroc_mixed
        unhealthy["auroc"] = auroc_unh
    if n_unh == 0:
        warnings.warn("no unhealthy slice in the test set: unhealthy-setup metrics are undefined (null)")
    return {
        "mixed": mixed,
        "unhealthy": unhealthy,
        "accuracy": cls["accuracy"],
        "classification": cls,
        "auprc_pooling": auprc_pooling,
        "n_batches": n_batches,
    }


# ------------------------------------------------------------------------------------------------------------
# Per-volume metrics (whole-volume segmentation, guided_diffusion/evaluation/volumes.py)


def volume_metrics(pred, gt, scores=None, foreground=None, voxel_ml: float = 1.0) -> dict:
    """3-D metrics of one subject: the whole volume is one sample.

    ``pred`` / ``gt`` binary volumes of one shape; ``scores`` the anomaly map (AUPRC, over the ``foreground``
    voxels when given); ``voxel_ml`` the volume of one voxel in millilitres. Dice and IoU use the slices' 1e-6
    smoothing (a subject without lesion and an empty prediction scores 1). Returns ``dice``, ``iou``, ``auprc``
    (None without a lesion voxel), voxel ``precision``/``recall``, voxel counts and volumes in ml.
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    dice, iou = dice_iou_per_slice(pred[None], gt[None])
    pr = precision_recall(pred, gt)
    ap = None
    if scores is not None:
        scores = np.asarray(scores)
        if scores.shape != gt.shape:
            raise ValueError(f"anomaly map shape {scores.shape} differs from ground-truth shape {gt.shape}")
        fg = np.ones(gt.shape, bool) if foreground is None else _as_bool(foreground)
        ap = auprc(scores[fg], gt[fg]) if gt[fg].any() else None
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    return {"dice": float(dice[0]), "iou": float(iou[0]), "auprc": ap, "precision": pr["precision"],
            "recall": pr["recall"], "pred_voxels": n_pred, "gt_voxels": n_gt, "pred_ml": n_pred * voxel_ml,
            "gt_ml": n_gt * voxel_ml}


def mean_sd(values: Iterable[Optional[float]]) -> dict:
    """``{"mean", "sd", "n"}`` of the defined values (None/NaN left out); sd is the sample standard deviation
    (n - 1), None for fewer than two values; mean None for none."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size)}
