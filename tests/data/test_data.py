"""Loaders over the preprocessed slice format: values, labels, modes, distributed sampling, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.data.loaders import (
    MODALITIES,
    BrainDataset,
    ShardedOrderSampler,
    get_data_iter,
    modality_index,
    normalise_slice,
)

SIZE = 16
# patient -> slice z -> has lesion
LAYOUT = {
    "train": {f"P{i}": {z: (i % 2 == 0 and 3 <= z <= 5) for z in range(1, 9)} for i in range(6)},
    "val": {f"V{i}": {z: (z in (2, 3) and i != 1) for z in range(2, 9)} for i in range(3)},  # 21 slices
    "test": {f"T{i}": {z: (z == 4) for z in range(0, 5)} for i in range(3)},
}


def _write_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, patients in LAYOUT.items():
        for p, slices in patients.items():
            d = root / f"npy_{split}" / f"patient_{p}"
            d.mkdir(parents=True)
            for z, lesion in slices.items():
                x = rng.uniform(0, 1.3, size=(1, 4, SIZE, SIZE))  # float64, p99-scaled-like
                y = np.zeros((1, 1, SIZE, SIZE), np.float32)
                if lesion:
                    y[..., 4:8, 4:8] = 1.0
                    y[..., 3, 4:8] = 0.4  # soft edge below threshold: not lesion
                else:
                    y[..., 5, 5] = 0.3  # soft value below 0.5 stays healthy
                np.savez_compressed(d / f"slice_{z}", x=x, y=y)
    (root / "npy_train" / "patient_P0" / "notes.txt").write_text("ignored")  # stray file ignored


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre")
    _write_dataset(root)
    return root


def _n_slices(split: str, lesion=None) -> int:
    return sum(1 for s in LAYOUT[split].values() for v in s.values() if lesion is None or v == lesion)


def test_modality_index():
    assert MODALITIES == ("flair", "t1", "t1ce", "t2")
    assert [modality_index(m) for m in MODALITIES] == [0, 1, 2, 3]
    assert modality_index("T2") == 3
    assert modality_index("t1", mod="t1") == 0
    with pytest.raises(ValueError):
        modality_index("pd")
    with pytest.raises(ValueError):
        modality_index("flair", mod="t1")


def test_normalise_slice_matches_upstream_formula():
    x = np.random.default_rng(1).normal(size=(4, 8, 8)) * np.arange(1, 5)[:, None, None]
    out = normalise_slice(x)
    lo = x.reshape(4, -1).min(1)[:, None, None]
    hi = x.reshape(4, -1).max(1)[:, None, None]
    np.testing.assert_allclose(out.numpy(), (x - lo) / (hi - lo + 1e-5) * 2 - 1, rtol=1e-5, atol=1e-6)
    assert out.dtype == torch.float32


def test_train_batches(data_dir):
    loader, sampler = get_data_iter("brats", data_dir, 4, "train", mixed=True, rank=0, world_size=1)
    assert hasattr(sampler, "set_epoch")
    labels = []
    for x, cond in loader:
        assert x.shape == (4, 4, SIZE, SIZE) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert torch.allclose(x.amin(dim=(2, 3)), torch.full((4, 4), -1.0))
        assert cond["y"].dtype == torch.int64
        labels += cond["y"].tolist()
    assert len(labels) == _n_slices("train")  # 48 slices, batch 4: nothing dropped
    assert sum(labels) == _n_slices("train", True)
    loader, _ = get_data_iter("brats", data_dir, 4, "train", ret_lab=False, mixed=True)
    assert next(iter(loader))[1] == {}


def test_eval_batches_and_labels(data_dir):
    loader = get_data_iter("brats", data_dir, 5, "val", mixed=True)
    n = 0
    for x, gt, lab in loader:
        assert x.shape[1:] == (4, SIZE, SIZE) and gt.shape[1:] == (1, SIZE, SIZE)
        assert gt.dtype == torch.float32 and lab.dtype == torch.int64
        assert set(gt.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(lab, (gt.flatten(1).sum(1) > 0).long())
        assert torch.all(gt.flatten(1).sum(1)[lab == 1] == 16)  # the 0.4 edge was thresholded away
        n += len(x)
    assert n == _n_slices("val")


def test_healthy_only_and_controlled_modes(data_dir):
    healthy = BrainDataset(data_dir, "train", n_unhealthy_patients=0)
    assert len(healthy) == _n_slices("train", False)
    assert all(healthy[i][1]["y"] == 0 for i in range(len(healthy)))
    order = [p.name[len("patient_"):] for p in healthy.patients]
    controlled = BrainDataset(data_dir, "train", n_unhealthy_patients=2, n_healthy_patients=1)
    expected = sum(len(LAYOUT["train"][p]) for p in order[:2])
    expected += sum(1 for v in LAYOUT["train"][order[2]].values() if not v)
    assert len(controlled) == expected
    mixed = BrainDataset(data_dir, "train", mixed=True, num_mix=2)
    assert len(mixed) == sum(len(LAYOUT["train"][p]) for p in order[:2])
    with pytest.raises(ValueError, match="n_unhealthy_patients"):
        BrainDataset(data_dir, "train")  # mixed=False needs a count, as upstream
    with pytest.raises(FileNotFoundError, match="npy_train"):
        BrainDataset(data_dir / "nope", "train")


def test_slices_sorted_numerically(data_dir):
    ds = BrainDataset(data_dir, "val", mixed=True)
    zs = [int(p.name[6:-4]) for p in ds.items if p.parent.name == "patient_V0"]
    assert zs == sorted(zs) and zs[0] == 2 and zs[-1] == 8


def _train_items(data_dir, rank, world, seed=0, epoch=0, batch=4):
    loader, sampler = get_data_iter("brats", data_dir, batch, "train", mixed=True, seed=seed,
                                    distributed=True, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    return loader, list(sampler)


def test_distributed_train_sampler(data_dir):
    loader0, idx0 = _train_items(data_dir, 0, 2)
    loader1, idx1 = _train_items(data_dir, 1, 2)
    assert loader0.batch_size == 2  # batch_size // world_size
    assert set(idx0).isdisjoint(idx1) and len(set(idx0) | set(idx1)) == _n_slices("train")
    _, again = _train_items(data_dir, 0, 2)
    _, next_epoch = _train_items(data_dir, 0, 2, epoch=1)
    assert again == idx0 and next_epoch != idx0
    with pytest.raises(ValueError, match="batch_size"):
        get_data_iter("brats", data_dir, 1, "train", mixed=True, rank=0, world_size=2)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("weighted", [False, True])
def test_eval_sharding_covers_each_slice_once(data_dir, split, weighted):
    seen = []
    for rank in range(2):
        loader = get_data_iter("brats", data_dir, 4, split, mixed=True, use_weighted_sampler=weighted,
                               rank=rank, world_size=2)
        ds = loader.dataset
        seen += [str(ds.items[i]) for i in loader.sampler]
        n = sum(len(b[0]) for b in loader)
        assert n == len(loader.sampler)
    assert len(seen) == _n_slices(split) and len(set(seen)) == len(seen)


def test_same_seed_same_batches(data_dir):
    def first_batches(seed, split):
        out = get_data_iter("brats", data_dir, 4, split, mixed=True, seed=seed)
        loader = out[0] if split == "train" else out
        return [b[0] for _, b in zip(range(3), loader)]

    for split in ("train", "test"):
        a, b, c = first_batches(3, split), first_batches(3, split), first_batches(4, split)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_weighted_order_is_class_balanced_first():
    labels = np.array([0] * 90 + [1] * 10)
    weights = (1.0 / np.bincount(labels))[labels]
    firsts = []
    for seed in range(20):
        order = ShardedOrderSampler(100, seed=seed, weights=weights).order()
        assert sorted(order) == list(range(100))
        firsts.append(labels[order[:10]].mean())
    assert 0.3 < np.mean(firsts) < 0.7  # ~half unhealthy early although only 10% overall
