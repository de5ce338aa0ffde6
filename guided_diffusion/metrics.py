"""Evaluation metrics for anomaly segmentation (Dice, IoU, AUPRC, classification accuracy).

Definitions follow upstream ``scripts/evaluate.py`` with its bugs fixed:

* Dice and IoU are computed per slice with a 1e-6 smoothing term and then averaged over slices, so a healthy
  slice with an empty prediction scores 1 and any false-positive component on it scores about 0.
* AUPRC is the average precision (sklearn's ``average_precision_score``: sum over distinct score thresholds of
  recall increase x precision) of the pixels of a group of slices, restricted to the foreground (mean over all
  input channels > -0.95), scored by the anomaly map. By default the group is the whole test set (exact, in two
  streaming passes, memory proportional to the positive pixels), so the value does not depend on the batch size
  or the number of processes; ``auprc_pooling="batch"`` gives upstream's per-batch values.
* Pixel precision = TP / (TP + FP) and recall = TP / (TP + FN) (upstream had them swapped), by default pooled
  over all pixels of the setup's slices (the foreground restriction is AUPRC's/AUROC's only); 0 where undefined.
  ``pr_pooling="upstream"`` gives upstream's per-batch ratios averaged as its running metrics are.
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
from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

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


class RankCounter:
    """Exact average precision and ROC AUC of pooled pixel scores, fed in two streaming passes.

    Pass 1: ``add_positives(scores)`` for the positive pixels of every batch; ``freeze()``. Pass 2: ``add(scores,
    labels)`` for every batch (all its pixels). Memory is one entry per distinct positive score: each pixel of
    pass 2 only needs to know how many positive scores lie at or below it. Equals sklearn's
    ``average_precision_score`` / ``roc_auc_score`` on the concatenated pixels (ties grouped the same way).
    Non-finite scores rank lowest.
    """

    def __init__(self) -> None:
        self._positives: list = []
        self.thresholds: Optional[np.ndarray] = None

    @staticmethod
    def _clean(scores) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64).ravel()
        return np.where(np.isfinite(s), s, -np.inf)

    def add_positives(self, scores) -> None:
        if self.thresholds is not None:
            raise RuntimeError("add_positives after freeze()")
        self._positives.append(self._clean(scores))

    def freeze(self) -> None:
        pos = np.concatenate(self._positives) if self._positives else np.zeros(0)
        self.thresholds, self.pos_count = np.unique(pos, return_counts=True)  # ascending distinct positive scores
        self._positives = []
        j = self.thresholds.size
        self._all_by_rank = np.zeros(j + 1, np.int64)  # pixels by the number of thresholds <= their score
        self._neg_by_rank = np.zeros(j + 1, np.int64)
        self._neg_ties = np.zeros(j, np.int64)  # negatives exactly at threshold j

    def add(self, scores, labels) -> None:
        if self.thresholds is None:
            raise RuntimeError("call freeze() before add()")
        s = self._clean(scores)
        lab = _as_bool(labels).ravel()
        if lab.shape != s.shape:
            raise ValueError(f"{s.shape[0]} scores but {lab.shape[0]} labels")
        j = self.thresholds.size
        rank = np.searchsorted(self.thresholds, s, side="right")
        self._all_by_rank += np.bincount(rank, minlength=j + 1)
        neg_rank = rank[~lab]
        self._neg_by_rank += np.bincount(neg_rank, minlength=j + 1)
        if j:
            at = neg_rank - 1  # the highest threshold <= the score, if any
            tie = (at >= 0) & (self.thresholds[np.maximum(at, 0)] == s[~lab])
            self._neg_ties += np.bincount(at[tie], minlength=j)

    def average_precision(self) -> Optional[float]:
        """sum_j (positives at t_j / P) * precision(score >= t_j); None without positives."""
        n_pos = int(self.pos_count.sum())
        if n_pos == 0:
            return None
        at_or_above = np.cumsum(self._all_by_rank[::-1])[::-1][1:]  # pixels with score >= threshold j
        tp_at_or_above = np.cumsum(self.pos_count[::-1])[::-1]
        return float(np.sum(self.pos_count / n_pos * tp_at_or_above / at_or_above))

    def roc_auc(self) -> Optional[float]:
        """P(positive > negative) + P(tie) / 2; None unless both classes are present."""
        n_pos = int(self.pos_count.sum())
        n_neg = int(self._neg_by_rank.sum())
        if n_pos == 0 or n_neg == 0:
            return None
        below = np.cumsum(self._neg_by_rank)[:-1]  # negatives with score < threshold j (fewer than j+1 at or below)
        return float(np.sum(self.pos_count * (below + 0.5 * self._neg_ties)) / (n_pos * n_neg))


def _ranked(scores, labels) -> RankCounter:
    labels = _as_bool(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    counter = RankCounter()
    counter.add_positives(scores[labels])
    counter.freeze()
    counter.add(scores, labels)
    return counter


def auprc(scores, labels) -> Optional[float]:
    """Average precision (area under the precision-recall curve) of pixel scores; None without positives."""
    return _ranked(scores, labels).average_precision()


def auroc(scores, labels) -> Optional[float]:
    """Area under the ROC curve of pixel scores; None unless both classes are present."""
    return _ranked(scores, labels).roc_auc()


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


AUPRC_POOLINGS = ("global", "batch")
PR_POOLINGS = ("global", "upstream")


def _setup_pixels(b: Mapping[str, np.ndarray]) -> dict:
    """Per setup: (selected slices, their predicted masks) of one result batch."""
    plab = np.asarray(b["pred_label"]).astype(np.int64).ravel()
    lab = np.asarray(b["label"]).astype(np.int64).ravel()
    mask_all = _as_bool(b["pred_mask"])
    return {"mixed": (slice(None), mask_all & (plab == 1)[:, None, None, None]),
            "unhealthy": (lab == 1, mask_all[lab == 1])}


def evaluate_segmentation(
    batches: Iterable[Mapping[str, np.ndarray]],
    auprc_pooling: str = "global",
    with_auroc: bool = True,
    pr_pooling: str = "global",
) -> dict:
    """Metrics of the two setups over a sequence of result batches.

    Each batch maps
      ``label`` int [b] (ground-truth slice label), ``pred_label`` int [b] (predicted slice label),
      ``gt`` bool [b,1,H,W], ``pred_mask`` bool [b,1,H,W] (the mask of every slice, i.e. the unhealthy-setup
      mask; the mixed setup zeroes it for slices predicted healthy), ``anomaly_map`` float [b,1,H,W],
      ``foreground`` bool [b,1,H,W].

    Dice/IoU are means over slices (see ``pr_pooling`` for precision/recall). AUPRC/AUROC with
    ``auprc_pooling="global"`` (default) pool the foreground pixels of all batches, exactly, reading ``batches``
    twice (pass a list or a re-iterable; a one-shot iterator is first materialised); the result depends only on
    the set of slices. ``"batch"`` is upstream's: per batch on its pooled foreground pixels, averaged (mixed: mean
    over batches; unhealthy: weighted by the number of unhealthy slices), skipping batches where it is undefined.

    Pixel precision / recall with ``pr_pooling="global"`` (default): TP / (TP + FP) and TP / (TP + FN) of the pixel
    counts summed over all batches. ``"upstream"``: the same ratios per batch (0 where a batch has no predicted
    pixel, resp. no lesion pixel), then averaged like upstream's running metrics: mixed, the plain mean over
    batches; unhealthy, weighted by each batch's number of unhealthy slices (None without any).
    """
    if auprc_pooling not in AUPRC_POOLINGS:
        raise ValueError(f"auprc_pooling must be one of {AUPRC_POOLINGS}, got {auprc_pooling!r}")
    if pr_pooling not in PR_POOLINGS:
        raise ValueError(f"pr_pooling must be one of {PR_POOLINGS}, got {pr_pooling!r}")
    if auprc_pooling == "global" and iter(batches) is batches:
        batches = list(batches)
    setups = ("mixed", "unhealthy")
    dice = {k: [] for k in setups}
    iou = {k: [] for k in setups}
    pixel_counts = {k: np.zeros(3, np.int64) for k in setups}  # tp, fp, fn over all pixels
    batch_pr = {k: {"precision": [], "recall": [], "weight": []} for k in setups}  # pr_pooling="upstream"
    per_batch = {k: {"ap": [], "roc": [], "weight": []} for k in setups}
    counters = {k: RankCounter() for k in setups}
    labels_all, pred_labels_all = [], []
    n_batches = 0
    for b in batches:
        n_batches += 1
        lab = np.asarray(b["label"]).astype(np.int64).ravel()
        gt = _as_bool(b["gt"])
        amap = np.asarray(b["anomaly_map"], dtype=np.float32)
        fg = _as_bool(b["foreground"])
        labels_all.append(lab)
        pred_labels_all.append(np.asarray(b["pred_label"]).astype(np.int64).ravel())
        for setup, (sel, mask) in _setup_pixels(b).items():
            g = gt[sel]
            d, i = dice_iou_per_slice(mask, g)
            dice[setup].append(d)
            iou[setup].append(i)
            pr = precision_recall(mask, g)
            pixel_counts[setup] += (pr["tp"], pr["fp"], pr["fn"])
            weight = 1.0 if setup == "mixed" else float((lab == 1).sum())
            for k, v in (("precision", pr["precision"]), ("recall", pr["recall"]), ("weight", weight)):
                batch_pr[setup][k].append(v)
            scores, truth = amap[sel][fg[sel]], g[fg[sel]]
            if auprc_pooling == "global":
                counters[setup].add_positives(scores[truth])
                continue
            ranked = _ranked(scores, truth)
            per_batch[setup]["ap"].append(ranked.average_precision())
            per_batch[setup]["roc"].append(ranked.roc_auc() if with_auroc else None)
            per_batch[setup]["weight"].append(weight)
    if n_batches == 0:
        raise ValueError("no result batches to evaluate")

    ranking = {}
    if auprc_pooling == "global":  # second pass: every foreground pixel against the positive scores
        for c in counters.values():
            c.freeze()
        for b in batches:
            gt, fg = _as_bool(b["gt"]), _as_bool(b["foreground"])
            amap = np.asarray(b["anomaly_map"], dtype=np.float32)
            for setup, (sel, _) in _setup_pixels(b).items():
                counters[setup].add(amap[sel][fg[sel]], gt[sel][fg[sel]])
        for setup, c in counters.items():
            ranking[setup] = (c.average_precision(), c.roc_auc() if with_auroc else None)
    else:
        for setup, v in per_batch.items():
            ranking[setup] = (_weighted_mean(v["ap"], v["weight"]), _weighted_mean(v["roc"], v["weight"]))

    labels_all = np.concatenate(labels_all)
    pred_labels_all = np.concatenate(pred_labels_all)
    cls = classification_metrics(labels_all, pred_labels_all)
    n_unh = int((labels_all == 1).sum())
    out = {}
    for setup in setups:
        d = np.concatenate(dice[setup])
        i = np.concatenate(iou[setup])
        tp, fp, fn = (int(v) for v in pixel_counts[setup])
        if pr_pooling == "global":
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        else:
            bp = batch_pr[setup]
            precision, recall = (_weighted_mean(bp[k], bp["weight"]) for k in ("precision", "recall"))
        out[setup] = {
            "dice": float(d.mean()) if d.size else None,
            "iou": float(i.mean()) if i.size else None,
            "auprc": ranking[setup][0],
            "precision": precision,
            "recall": recall,
            "n_slices": int(labels_all.size) if setup == "mixed" else n_unh,
        }
        if with_auroc:
            out[setup]["auroc"] = ranking[setup][1]
    if n_unh == 0:
        warnings.warn("no unhealthy slice in the test set: unhealthy-setup metrics are undefined (null)")
    return {
        **out,
        "accuracy": cls["accuracy"],
        "classification": cls,
        "auprc_pooling": auprc_pooling,
        "pr_pooling": pr_pooling,
        "n_batches": n_batches,
    }


# ------------------------------------------------------------------------------------------------------------
# Per-volume metrics (whole-volume segmentation, guided_diffusion/evaluation/volumes/)


# Normalised surface Dice tolerance: one voxel of the BraTS grid (1 mm isotropic), the strictest meaningful one.
NSD_TOLERANCE_MM = 1.0


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: foreground voxels with a face neighbour (6-connectivity in 3-D) in the background; outside
    the array counts as background."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~inner


def _checked_spacing(spacing: Sequence[float], ndim: int) -> tuple:
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim or not all(math.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"spacing must be {ndim} positive voxel sizes (one per axis), got {tuple(spacing)}")
    return out


def surface_distances(pred, gt, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(pred -> gt, gt -> pred)``: for each surface voxel of one mask, the Euclidean distance between its centre
    and the nearest surface-voxel centre of the other, in the units of ``spacing`` (one size per axis). Both masks
    must be non-empty."""
    from scipy import ndimage

    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    spacing = _checked_spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need a non-empty prediction and ground truth")
    # Every surface voxel lies in the bounding box of the union, and outside it all is background: crop, exactly.
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(pred | gt))
    sp, sg = _surface(pred[box]), _surface(gt[box])
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_gt[sp], to_pred[sg]


def surface_metrics(pred, gt, spacing: Sequence[float], nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict:
    """HD95 and normalised surface Dice of two binary masks on a grid of voxel size ``spacing`` (mm per axis).

    With ``d(a, B)`` the distance from surface voxel ``a`` to the nearest surface voxel of ``B`` (``surface_distances``;
    voxel centres, face-connected surface):

    * ``hd95_mm`` = max(P95{d(p, G) : p in dP}, P95{d(g, P) : g in dG}), P95 numpy's linearly interpolated 95th
      percentile (the robust Hausdorff distance of the BraTS evaluation and of MONAI's
      ``compute_hausdorff_distance(percentile=95)``; the BraTS code weights surface elements by their area).
    * ``nsd`` = (#{p in dP : d(p, G) <= tol} + #{g in dG : d(g, P) <= tol}) / (|dP| + |dG|), tol =
      ``nsd_tolerance_mm`` (MONAI ``compute_surface_dice``, Nikolov et al. 2021).

    Empty masks: both empty gives ``hd95_mm`` 0 and ``nsd`` 1 (perfect agreement, as the BraTS evaluation scores
    it and as Dice's smoothing does); exactly one empty gives ``hd95_mm`` None (no surface to measure to; left out
    of ``mean_sd``, whose ``n`` then says how many volumes had one; the BraTS evaluation substitutes 374 mm, the
    diagonal of its 240x240x155 grid) and ``nsd`` 0 (no surface voxel within tolerance).
    """
    if not nsd_tolerance_mm >= 0:
        raise ValueError(f"the NSD tolerance must be >= 0 mm, got {nsd_tolerance_mm}")
    pred, gt = _as_bool(pred), _as_bool(gt)
    _checked_spacing(spacing, pred.ndim)
    if not pred.any() and not gt.any():
        return {"hd95_mm": 0.0, "nsd": 1.0}
    if not pred.any() or not gt.any():
        return {"hd95_mm": None, "nsd": 0.0}
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    hd95 = max(float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95)))
    nsd = (int((d_pg <= nsd_tolerance_mm).sum()) + int((d_gp <= nsd_tolerance_mm).sum())) / (d_pg.size + d_gp.size)
    return {"hd95_mm": hd95, "nsd": float(nsd)}


def volume_metrics(pred, gt, scores=None, foreground=None, voxel_ml: float = 1.0,
                   spacing: Optional[Sequence[float]] = None, nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict:
    """3-D metrics of one subject: the whole volume is one sample.

    ``pred`` / ``gt`` binary volumes of one shape; ``scores`` the anomaly map (AUPRC, over the ``foreground``
    voxels when given); ``voxel_ml`` the volume of one voxel in millilitres; ``spacing`` the voxel size in mm per
    axis (for the surface metrics). Dice and IoU use the slices' 1e-6 smoothing (a subject without lesion and an
    empty prediction scores 1). Returns ``dice``, ``iou``, ``auprc`` (None without a lesion voxel), voxel
    ``precision``/``recall``, voxel counts, volumes in ml, and ``hd95_mm``, ``nsd`` at ``nsd_tolerance_mm``
    (``surface_metrics``; None without ``spacing``).
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
    surface = (surface_metrics(pred, gt, spacing, nsd_tolerance_mm) if spacing is not None
               else {"hd95_mm": None, "nsd": None})
    return {"dice": float(dice[0]), "iou": float(iou[0]), "auprc": ap, "precision": pr["precision"],
            "recall": pr["recall"], "pred_voxels": n_pred, "gt_voxels": n_gt, "pred_ml": n_pred * voxel_ml,
            "gt_ml": n_gt * voxel_ml, **surface, "nsd_tolerance_mm": nsd_tolerance_mm}


def mean_sd(values: Iterable[Optional[float]]) -> dict:
    """``{"mean", "sd", "n"}`` of the defined values (None/NaN left out); sd is the sample standard deviation
    (n - 1), None for fewer than two values; mean None for none."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size)}


def per_volume_metrics(batches: Iterable[Mapping[str, np.ndarray]], key: str = "volume",
                       volumes: Optional[Iterable[str]] = None) -> dict:
    """3-D metrics per volume from slice results spread over batches, each slice naming its volume in ``b[key]``.

    All slices of a volume together are one sample (as ``volume_metrics``): Dice / IoU (1e-6 smoothing),
    precision / recall from the voxel counts of the mixed-setup mask (slices predicted healthy are empty), and the
    exact AUPRC of the anomaly map over the volume's foreground pixels, in two passes over ``batches`` (memory
    O(lesion pixels) for a list or a re-iterable; a one-shot iterator is first materialised). Batches are
    ``evaluate_segmentation``'s plus ``key``. ``volumes`` restricts the result to those ids. Returns ``{id: {dice,
    iou, auprc, precision, recall, pred_voxels, gt_voxels, n_slices}}``. No surface metrics (HD95, NSD): slices
    come in any order and carry no voxel size (see ``volume_metrics`` for them).
    """
    if iter(batches) is batches:  # a one-shot iterator: the second pass would see nothing
        batches = list(batches)
    wanted = None if volumes is None else set(volumes)
    counts: Dict[str, np.ndarray] = {}  # tp, predicted, true, slices
    counters: Dict[str, RankCounter] = {}

    def groups(b: Mapping[str, np.ndarray]):
        ids = np.asarray(b[key]).astype(str).ravel()
        _, mixed = _setup_pixels(b)["mixed"]
        gt, fg = _as_bool(b["gt"]), _as_bool(b["foreground"])
        amap = np.asarray(b["anomaly_map"], dtype=np.float32)
        for v in np.unique(ids):
            if wanted is None or v in wanted:
                sel = ids == v
                yield v, mixed[sel], gt[sel], fg[sel], amap[sel]

    for b in batches:
        for v, pred, gt, fg, amap in groups(b):
            c = counts.setdefault(v, np.zeros(4, np.int64))
            c += (int((pred & gt).sum()), int(pred.sum()), int(gt.sum()), pred.shape[0])
            counters.setdefault(v, RankCounter()).add_positives(amap[fg & gt])
    for c in counters.values():
        c.freeze()
    for b in batches:
        for v, _pred, gt, fg, amap in groups(b):
            counters[v].add(amap[fg], gt[fg])
    out = {}
    for v in sorted(counts):
        tp, p, g, n = (int(x) for x in counts[v])
        out[v] = {"dice": (2 * tp + SMOOTH) / (p + g + SMOOTH), "iou": (tp + SMOOTH) / (p + g - tp + SMOOTH),
                  "auprc": counters[v].average_precision(), "precision": _ratio(tp, p), "recall": _ratio(tp, g),
                  "pred_voxels": p, "gt_voxels": g, "n_slices": n}
    return out
