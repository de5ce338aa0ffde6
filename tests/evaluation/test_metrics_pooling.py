"""Pooled AUPRC/AUROC (exact, streamed), the foreground restriction, pixel precision/recall over all pixels, and
metrics that do not depend on how the test slices were batched."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from guided_diffusion import metrics


def _slices(labels, pred_labels, gts, preds, maps, fgs=None, size=2):
    n = len(labels)
    shape = (n, 1, size, size)
    return {
        "label": np.array(labels),
        "pred_label": np.array(pred_labels),
        "gt": np.array(gts, bool).reshape(shape),
        "pred_mask": np.array(preds, bool).reshape(shape),
        "anomaly_map": np.array(maps, np.float32).reshape(shape),
        "foreground": np.ones(shape, bool) if fgs is None else np.array(fgs, bool).reshape(shape),
    }


def _split(batch, sizes):
    out, start = [], 0
    for s in sizes:
        out.append({k: v[start:start + s] for k, v in batch.items()})
        start += s
    assert start == batch["label"].shape[0]
    return out


def test_auprc_is_restricted_to_the_foreground_hand_computed():
    """Foreground pixels ranked 0.9(+) 0.8(-) 0.7(+) 0.1(-): AP = (1 + 2/3) / 2 = 5/6. Two background pixels
    score 0.95 (above everything): counted, they would give (1/3 + 2/5) / 2 = 11/30."""
    b = _slices(
        [1, 1], [1, 1],
        gts=[[1, 0, 0, 0], [1, 0, 0, 0]],
        preds=[[1, 0, 0, 0], [1, 0, 0, 0]],
        maps=[[0.9, 0.8, 0.95, 0.0], [0.7, 0.1, 0.95, 0.0]],
        fgs=[[1, 1, 0, 0], [1, 1, 0, 0]],
    )
    for pooling in metrics.AUPRC_POOLINGS:
        res = metrics.evaluate_segmentation([b], auprc_pooling=pooling)
        assert res["unhealthy"]["auprc"] == pytest.approx(5 / 6, abs=1e-12), pooling
        assert res["mixed"]["auprc"] == pytest.approx(5 / 6, abs=1e-12), pooling
        # AUROC on the foreground: positives 0.9, 0.7 vs negatives 0.8, 0.1: 3 of 4 pairs ordered
        assert res["unhealthy"]["auroc"] == pytest.approx(0.75, abs=1e-12)
    everywhere = dict(b, foreground=np.ones_like(b["foreground"]))
    assert metrics.evaluate_segmentation([everywhere])["unhealthy"]["auprc"] == pytest.approx(11 / 30, abs=1e-12)


def test_foreground_is_the_mean_over_all_channels():
    """-0.95 is the threshold on the channel mean: [-1, -0.85] (mean -0.925) is foreground, [-1, -0.95] (-0.975)
    and [-0.9, -1] (-0.95, not above) are not, although each has a channel above -0.95."""
    x = np.full((1, 2, 1, 4), -1.0, np.float32)
    x[0, :, 0, 0] = [-1.0, -0.85]
    x[0, :, 0, 1] = [-1.0, -0.95]
    x[0, :, 0, 2] = [-0.9, -1.0]
    x[0, :, 0, 3] = [0.0, 0.0]
    assert metrics.foreground_mask(x)[0, 0, 0].tolist() == [True, False, False, True]


def test_pixel_precision_recall_over_all_pixels_hand_computed():
    """Slice 0: gt 2 px, predicted 3 px of which 2 are right and one is a background pixel; slice 1 (unhealthy,
    predicted healthy) has 1 gt pixel. Over all pixels: mixed precision 2/3, recall 2/3; unhealthy (every
    slice's mask) precision (2+1)/(3+1) = 3/4, recall 3/3."""
    b = _slices(
        [1, 1], [1, 0],
        gts=[[1, 1, 0, 0], [0, 0, 1, 0]],
        preds=[[1, 1, 0, 1], [0, 0, 1, 0]],
        maps=[[0.9, 0.8, 0.1, 0.7], [0.1, 0.1, 0.9, 0.0]],
        fgs=[[1, 1, 1, 0], [1, 1, 1, 1]],  # the false positive lies outside the brain
    )
    res = metrics.evaluate_segmentation([b])
    assert (res["mixed"]["precision"], res["mixed"]["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (res["unhealthy"]["precision"], res["unhealthy"]["recall"]) == (pytest.approx(3 / 4), pytest.approx(1.0))


def test_global_pooling_is_the_default_and_independent_of_the_batching():
    rng = np.random.RandomState(0)
    n, size = 13, 6
    gt = np.zeros((n, 1, size, size), bool)
    for i in range(0, n, 2):  # every other slice unhealthy, with a blob
        r, c = rng.randint(0, 3, 2)
        gt[i, 0, r:r + 3, c:c + 3] = True
    labels = gt.reshape(n, -1).any(1).astype(np.int64)
    amap = (rng.rand(n, 1, size, size) + 0.8 * gt).astype(np.float32)
    amap[3, 0, :2] = 0.5  # ties across slices
    amap[4, 0, :2] = 0.5
    batch = {
        "label": labels,
        "pred_label": (rng.rand(n) < 0.7).astype(np.int64),
        "gt": gt,
        "pred_mask": amap > 1.0,
        "anomaly_map": amap,
        "foreground": rng.rand(n, 1, size, size) < 0.8,
    }
    whole = metrics.evaluate_segmentation([batch])
    assert whole["auprc_pooling"] == "global"
    for sizes in ([n], [1] * n, [4, 4, 4, 1], [6, 7], [2, 11]):
        parts = _split(batch, sizes)
        res = metrics.evaluate_segmentation(parts)
        for setup in ("mixed", "unhealthy"):
            for key in ("dice", "iou", "auprc", "auroc", "precision", "recall", "n_slices"):
                assert res[setup][key] == pytest.approx(whole[setup][key], rel=1e-12, abs=1e-15), (sizes, setup, key)
        assert res["accuracy"] == whole["accuracy"]
        # a one-shot generator is accepted too (global pooling reads the batches twice)
        gen = metrics.evaluate_segmentation(iter(parts))
        assert gen["unhealthy"]["auprc"] == pytest.approx(whole["unhealthy"]["auprc"], rel=1e-12)
    # the independent reference: sklearn on the pooled foreground pixels
    fg = batch["foreground"]
    unh = labels == 1
    assert whole["mixed"]["auprc"] == pytest.approx(average_precision_score(gt[fg], amap[fg]), rel=1e-12)
    assert whole["mixed"]["auroc"] == pytest.approx(roc_auc_score(gt[fg], amap[fg]), rel=1e-12)
    assert whole["unhealthy"]["auprc"] == pytest.approx(
        average_precision_score(gt[unh][fg[unh]], amap[unh][fg[unh]]), rel=1e-12)
    # upstream's per-batch pooling does depend on the batching
    per_batch = [metrics.evaluate_segmentation(_split(batch, s), auprc_pooling="batch")["mixed"]["auprc"]
                 for s in ([n], [4, 4, 4, 1])]
    assert per_batch[0] == pytest.approx(whole["mixed"]["auprc"], rel=1e-12)
    assert abs(per_batch[1] - per_batch[0]) > 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_rank_counter_equals_sklearn_with_ties(seed):
    rng = np.random.RandomState(seed)
    n = 500
    scores = np.round(rng.rand(n) * (3 + 20 * seed)) / 7  # few distinct values: many ties
    labels = rng.rand(n) < 0.1 + 0.1 * seed
    counter = metrics.RankCounter()
    for chunk in np.array_split(np.arange(n), 5):
        counter.add_positives(scores[chunk][labels[chunk]])
    counter.freeze()
    for chunk in np.array_split(rng.permutation(n), 3):
        counter.add(scores[chunk], labels[chunk])
    assert counter.average_precision() == pytest.approx(average_precision_score(labels, scores), rel=1e-12)
    assert counter.roc_auc() == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert metrics.auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), rel=1e-12)


def test_rank_counter_edge_cases():
    assert metrics.auprc([0.3, 0.3, 0.3], [1, 0, 0]) == pytest.approx(1 / 3)  # one tie group: precision 1/3
    assert metrics.auroc([0.3, 0.3, 0.3], [1, 0, 0]) == pytest.approx(0.5)
    assert metrics.auprc([0.1, 0.2], [1, 1]) == 1.0 and metrics.auroc([0.1, 0.2], [1, 1]) is None
    assert metrics.auprc([np.inf, 0.5, np.nan], [0, 1, 0]) == pytest.approx(1.0)  # non-finite ranks lowest
    counter = metrics.RankCounter()
    with pytest.raises(RuntimeError, match="freeze"):
        counter.add([0.1], [True])


def _pr_batches():
    """Four batches of 2x2 slices (label, predicted label, gt, mask per slice), per-setup pixel counts:
    1: unhealthy slice tp 1 fp 1 fn 1, healthy slice empty   mixed P 1/2 R 1/2   unhealthy (1 slice) P 1/2 R 1/2
    2: two healthy slices, one with 3 false positives        mixed P 0, R 0 (no lesion pixel)   unhealthy: none
    3: two unhealthy, the second predicted healthy (1 of 2)  mixed tp 4 fn 2: P 1 R 2/3   unhealthy tp 5 fn 1: P 1 R 5/6
    4: one unhealthy slice, nothing predicted                mixed P 0 (no prediction), R 0   unhealthy P 0 R 0"""
    zeros = [[0] * 4] * 2
    return [
        _slices([1, 0], [1, 0], gts=[[1, 1, 0, 0], [0, 0, 0, 0]], preds=[[1, 0, 1, 0], [0, 0, 0, 0]], maps=zeros),
        _slices([0, 0], [1, 0], gts=[[0, 0, 0, 0], [0, 0, 0, 0]], preds=[[1, 1, 1, 0], [0, 0, 0, 0]], maps=zeros),
        _slices([1, 1], [1, 0], gts=[[1, 1, 1, 1], [1, 1, 0, 0]], preds=[[1, 1, 1, 1], [1, 0, 0, 0]], maps=zeros),
        _slices([1], [0], gts=[[0, 0, 1, 1]], preds=[[0, 0, 0, 0]], maps=[[0] * 4]),
    ]


def test_precision_recall_pooling_global_and_upstream_hand_computed():
    batches = _pr_batches()
    glob = metrics.evaluate_segmentation(batches)  # the default: pixel counts summed over every batch
    assert glob["pr_pooling"] == "global"
    # mixed: tp 1+0+4+0 = 5, fp 1+3 = 4, fn 1+2+2 = 5; unhealthy: tp 1+5 = 6, fp 1, fn 1+1+2 = 4
    assert (glob["mixed"]["precision"], glob["mixed"]["recall"]) == (pytest.approx(5 / 9), pytest.approx(5 / 10))
    assert glob["unhealthy"]["precision"] == pytest.approx(6 / 7)
    assert glob["unhealthy"]["recall"] == pytest.approx(6 / 10)
    up = metrics.evaluate_segmentation(batches, pr_pooling="upstream")
    assert up["pr_pooling"] == "upstream"
    # mixed: plain mean of the per-batch ratios, a batch where one is undefined counting 0
    assert up["mixed"]["precision"] == pytest.approx((1 / 2 + 0 + 1 + 0) / 4)
    assert up["mixed"]["recall"] == pytest.approx((1 / 2 + 0 + 2 / 3 + 0) / 4)
    # unhealthy: weighted by the batches' unhealthy slices (1, 0, 2, 1)
    assert up["unhealthy"]["precision"] == pytest.approx((1 / 2 * 1 + 1 * 2 + 0 * 1) / 4)
    assert up["unhealthy"]["recall"] == pytest.approx((1 / 2 * 1 + 5 / 6 * 2 + 0 * 1) / 4)
    # everything else is the same under both
    for setup in ("mixed", "unhealthy"):
        for k in ("dice", "iou", "auprc", "n_slices"):
            assert up[setup][k] == glob[setup][k]
    # no unhealthy slice at all: upstream's weighted mean is undefined (null), never NaN
    with pytest.warns(UserWarning, match="no unhealthy slice"):
        none = metrics.evaluate_segmentation(batches[1:2], pr_pooling="upstream")
    assert none["unhealthy"]["precision"] is None and none["unhealthy"]["recall"] is None
    with pytest.raises(ValueError, match="pr_pooling"):
        metrics.evaluate_segmentation(batches, pr_pooling="batch")
