"""Metrics against hand-computed values (Dice, IoU, AUPRC, precision/recall, accuracy, NaN-free setups)."""

import json
import math

import numpy as np
import pytest

from guided_diffusion import metrics


def _mask(h, w, coords):
    m = np.zeros((1, 1, h, w), bool)
    for r, c in coords:
        m[0, 0, r, c] = True
    return m


def test_dice_iou_hand_computed():
    # pred 4 px, gt 6 px, overlap 2: Dice = 2*2/(4+6) = 0.4, IoU = 2/8 = 0.25
    pred = _mask(4, 4, [(0, 0), (0, 1), (0, 2), (0, 3)])
    gt = _mask(4, 4, [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)])
    d, i = metrics.dice_iou_per_slice(pred, gt)
    assert d[0] == pytest.approx(0.4, abs=1e-6)
    assert i[0] == pytest.approx(0.25, abs=1e-6)


def test_dice_iou_empty_slices_score_one_and_fp_scores_zero():
    empty = np.zeros((2, 1, 3, 3), bool)
    d, i = metrics.dice_iou_per_slice(empty, empty)
    np.testing.assert_allclose(d, 1.0)
    np.testing.assert_allclose(i, 1.0)
    fp = empty.copy()
    fp[0, 0, 1, 1] = True
    d, i = metrics.dice_iou_per_slice(fp, empty)
    assert d[0] < 1e-5 and i[0] < 1e-5 and d[1] == pytest.approx(1.0)


def test_dice_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice_iou_per_slice(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)))


def test_auprc_hand_computed():
    # ranking: 0.9(+) 0.8(-) 0.3(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3) = 0.8333
    ap = metrics.auprc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    assert ap == pytest.approx(5 / 6)
    assert metrics.auprc([0.1, 0.2], [0, 0]) is None
    assert metrics.auprc([0.1, 0.2], [1, 1]) == 1.0
    # NaN scores do not crash and rank lowest
    assert metrics.auprc([np.nan, 0.5], [0, 1]) == pytest.approx(1.0)
    assert metrics.auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)


def test_precision_recall_not_swapped():
    # 3 predicted positives, 1 true positive among them, 2 actual positives
    pred = np.array([1, 1, 1, 0, 0], bool)
    gt = np.array([1, 0, 0, 1, 0], bool)
    pr = metrics.precision_recall(pred, gt)
    assert pr["precision"] == pytest.approx(1 / 3)
    assert pr["recall"] == pytest.approx(1 / 2)
    assert pr["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_classification_metrics():
    labels = [1, 1, 0, 0, 0]
    pred = [1, 0, 1, 0, 0]
    c = metrics.classification_metrics(labels, pred)
    assert c["accuracy"] == pytest.approx(3 / 5)
    assert c["precision"] == pytest.approx(1 / 2)
    assert c["recall"] == pytest.approx(1 / 2)
    assert c["specificity"] == pytest.approx(2 / 3)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (1, 1, 2, 1)


def _batch(labels, pred_labels, gts, preds, maps):
    n = len(labels)
    return {
        "label": np.array(labels),
        "pred_label": np.array(pred_labels),
        "gt": np.array(gts, bool).reshape(n, 1, 2, 2),
        "pred_mask": np.array(preds, bool).reshape(n, 1, 2, 2),
        "anomaly_map": np.array(maps, np.float32).reshape(n, 1, 2, 2),
        "foreground": np.ones((n, 1, 2, 2), bool),
    }


def test_evaluate_two_setups_hand_computed():
    # batch 1: slice A unhealthy, predicted unhealthy, perfect mask; slice B healthy, predicted healthy but
    # its (unhealthy-setup) mask has a false positive, which the mixed setup zeroes.
    b1 = _batch(
        [1, 0], [1, 0],
        [[1, 1, 0, 0], [0, 0, 0, 0]],
        [[1, 1, 0, 0], [1, 0, 0, 0]],
        [[0.9, 0.8, 0.1, 0.2], [0.7, 0.0, 0.0, 0.0]],
    )
    # batch 2: only healthy slices (upstream's unhealthy running metrics turned NaN here)
    b2 = _batch([0], [1], [[0, 0, 0, 0]], [[0, 0, 1, 0]], [[0.1, 0.1, 0.5, 0.1]])
    res = metrics.evaluate_segmentation([b1, b2], auprc_pooling="batch")
    # mixed: A dice 1, B empty/empty 1, C predicted unhealthy with 1 FP px -> ~0
    assert res["mixed"]["dice"] == pytest.approx(2 / 3, abs=1e-5)
    assert res["mixed"]["iou"] == pytest.approx(2 / 3, abs=1e-5)
    # unhealthy: only A
    assert res["unhealthy"]["dice"] == pytest.approx(1.0)
    assert res["unhealthy"]["n_slices"] == 1
    assert res["accuracy"] == pytest.approx(2 / 3)
    # batch-1 pooled AUPRC over 8 pixels: scores of positives 0.9, 0.8 are the two highest -> 1.0.
    # batch 2 has no positive pixel and is skipped (not NaN, not 0).
    assert res["mixed"]["auprc"] == pytest.approx(1.0)
    assert res["unhealthy"]["auprc"] == pytest.approx(1.0)
    # pixel precision (mixed): predicted A's 2 px (TP) + C's 1 px (FP) -> 2/3; recall 1
    assert res["mixed"]["precision"] == pytest.approx(2 / 3)
    assert res["mixed"]["recall"] == pytest.approx(1.0)
    json.dumps(res)  # serialisable
    for setup in ("mixed", "unhealthy"):
        for k in ("dice", "iou", "auprc"):
            v = res[setup][k]
            assert v is not None and not math.isnan(v) and 0.0 <= v <= 1.0


def test_evaluate_auprc_batch_weighting_and_global_pooling():
    # batch 1: one unhealthy slice, AP = 1; batch 2: two unhealthy slices whose pooled AP is 5/6
    b1 = _batch([1], [1], [[1, 0, 0, 0]], [[1, 0, 0, 0]], [[0.9, 0.1, 0.1, 0.1]])
    b2 = _batch(
        [1, 1], [1, 1],
        [[1, 0, 0, 0], [1, 0, 0, 0]],
        [[1, 0, 0, 0], [1, 0, 0, 0]],
        [[0.9, 0.8, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]],
    )
    res = metrics.evaluate_segmentation([b1, b2], auprc_pooling="batch")
    ap2 = metrics.auprc([0.9, 0.8, 0, 0, 0.3, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0])
    assert res["unhealthy"]["auprc"] == pytest.approx((1.0 * 1 + ap2 * 2) / 3)
    assert res["mixed"]["auprc"] == pytest.approx((1.0 + ap2) / 2)
    glob = metrics.evaluate_segmentation([b1, b2], auprc_pooling="global")
    ap_all = metrics.auprc(
        np.concatenate([b1["anomaly_map"].ravel(), b2["anomaly_map"].ravel()]),
        np.concatenate([b1["gt"].ravel(), b2["gt"].ravel()]),
    )
    assert glob["unhealthy"]["auprc"] == pytest.approx(ap_all)
    with pytest.raises(ValueError, match="auprc_pooling"):
        metrics.evaluate_segmentation([b1], auprc_pooling="pixel")


def test_evaluate_without_unhealthy_slices_gives_null_not_nan():
    b = _batch([0, 0], [0, 0], [[0] * 4, [0] * 4], [[0] * 4, [0] * 4], [[0.1] * 4, [0.2] * 4])
    with pytest.warns(UserWarning, match="no unhealthy"):
        res = metrics.evaluate_segmentation([b])
    assert res["unhealthy"]["dice"] is None and res["unhealthy"]["auprc"] is None
    assert res["mixed"]["dice"] == pytest.approx(1.0)
    assert res["mixed"]["auprc"] is None
    assert res["accuracy"] == 1.0


def test_foreground_mask():
    x = np.full((1, 4, 2, 2), -1.0, np.float32)
    x[0, 0, 0, 0] = 1.0  # mean over channels -0.5 > -0.95
    x[0, 0, 1, 1] = -0.9  # mean -0.975 -> background
    fg = metrics.foreground_mask(x)
    assert fg.shape == (1, 1, 2, 2)
    assert fg[0, 0, 0, 0] and not fg[0, 0, 1, 1] and fg.sum() == 1


# --- gaps found by mutation testing (bench/mutation.py --module metrics) ---


def test_dice_iou_pools_every_non_batch_axis():
    # masks [N, H, W] (no channel axis) and [N, 2, H, W] (two channels): all non-batch axes pooled
    pred = np.zeros((2, 3, 3), bool)
    gt = np.zeros((2, 3, 3), bool)
    pred[0, 0, :] = True  # 3 px
    gt[0, :, 0] = True  # 3 px, overlap 1: Dice 2/6, IoU 1/5
    pred[1, 2, 2] = gt[1, 2, 2] = True  # identical single pixel: 1, 1
    d, i = metrics.dice_iou_per_slice(pred, gt)
    np.testing.assert_allclose(d, [2 / 6, 1.0], atol=1e-6)
    np.testing.assert_allclose(i, [1 / 5, 1.0], atol=1e-6)
    two = np.zeros((1, 2, 2, 2), bool)
    two_gt = np.zeros((1, 2, 2, 2), bool)
    two[0, 0, 0, 0] = two[0, 1, 0, 0] = True  # one px in each channel
    two_gt[0, 1, 0, 0] = True  # only the second channel's px is true: Dice 2/3, IoU 1/2
    d, i = metrics.dice_iou_per_slice(two, two_gt)
    assert d[0] == pytest.approx(2 / 3, abs=1e-6) and i[0] == pytest.approx(1 / 2, abs=1e-6)


def test_undefined_ratios_are_zero_not_one():
    # no predicted positive: precision 0/0 -> 0 (documented "0 where undefined"), recall 0/2, F1 0
    pr = metrics.precision_recall(np.zeros(4, bool), np.array([1, 1, 0, 0], bool))
    assert (pr["precision"], pr["recall"], pr["f1"]) == (0.0, 0.0, 0.0)
    # no actual positive and no predicted positive: recall 0/0 -> 0
    pr = metrics.precision_recall(np.zeros(3, bool), np.zeros(3, bool))
    assert (pr["precision"], pr["recall"], pr["f1"], pr["tp"], pr["fp"], pr["fn"]) == (0.0, 0.0, 0.0, 0, 0, 0)


def test_classification_metrics_counts_f1_and_sizes():
    # 6 slices, 4 unhealthy; predicted: tp 3, fn 1, fp 1, tn 1
    labels = [1, 1, 1, 1, 0, 0]
    pred = [1, 1, 1, 0, 1, 0]
    c = metrics.classification_metrics(labels, pred)
    precision, recall = 3 / 4, 3 / 4
    assert c["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert (c["n_slices"], c["n_unhealthy"]) == (6, 4)
    assert c["accuracy"] == pytest.approx(4 / 6) and c["specificity"] == pytest.approx(1 / 2)


def test_length_mismatches_are_clear_errors():
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        metrics.auprc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        metrics.classification_metrics([1, 0, 1], [1, 0])
    counter = metrics.RankCounter()
    counter.add_positives([0.5])
    counter.freeze()
    with pytest.raises(ValueError, match="2 scores but 1 labels"):
        counter.add([0.1, 0.2], [1])


def test_rank_counter_without_any_positive_pass():
    # freeze() without add_positives: no thresholds, so no AP / AUROC, and negatives are still counted
    counter = metrics.RankCounter()
    counter.freeze()
    counter.add([0.3, 0.7], [0, 0])
    assert counter.thresholds.size == 0
    assert counter.average_precision() is None and counter.roc_auc() is None


def test_evaluate_reports_sizes_iou_none_and_classification():
    b1 = _batch([1, 0], [1, 1], [[1, 0, 0, 0], [0] * 4], [[1, 0, 0, 0], [0] * 4], [[0.9, 0, 0, 0], [0] * 4])
    b2 = _batch([0], [0], [[0] * 4], [[0] * 4], [[0.1] * 4])
    res = metrics.evaluate_segmentation([b1, b2])
    assert res["n_batches"] == 2
    assert (res["mixed"]["n_slices"], res["unhealthy"]["n_slices"]) == (3, 1)
    assert res["classification"]["n_slices"] == 3 and res["classification"]["fp"] == 1
    assert res["classification"]["accuracy"] == res["accuracy"] == pytest.approx(2 / 3)
    # no unhealthy slice, upstream's per-batch pooling: every per-batch value undefined -> None, IoU None too
    b = _batch([0, 0], [0, 0], [[0] * 4, [0] * 4], [[0] * 4, [0] * 4], [[0.1] * 4, [0.2] * 4])
    with pytest.warns(UserWarning, match="no unhealthy"):
        res = metrics.evaluate_segmentation([b], auprc_pooling="batch")
    assert res["unhealthy"]["iou"] is None and res["unhealthy"]["dice"] is None
    assert res["unhealthy"]["auprc"] is None and res["unhealthy"]["auroc"] is None
    assert res["mixed"]["auprc"] is None
