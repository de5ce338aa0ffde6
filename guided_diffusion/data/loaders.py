"""Datasets and loaders over the preprocessed slice format (``npy_{split}/patient_<P>/slice_<z>.npz``).

Every slice gives ``x`` scaled per slice and per channel to [-1, 1] by min-max, the ground-truth mask
``y > 0.5`` and the slice label (1 if the thresholded mask has any pixel). Train batches are ``(x, {"y": label})``
(or ``(x, {})`` without labels); val/test batches are ``(x, mask, label)``.

Sampling: train uses a ``DistributedSampler`` (also for a single process, so ``set_epoch`` always exists); val/test
use one seeded order of the whole split that ranks share out without replacement, so every slice is seen exactly once
across ranks (upstream drew a fresh random permutation per batch, which repeats slices).

Faults: a truncated or corrupt slice file, or one holding NaN/inf, is a ``DataError`` naming it (``read_slice``), when
it is met; with ``image_size`` / ``in_channels`` the slices are checked against the model at start (the first slice of
every patient, by its header) and each slice when it is loaded, so data of another size or channel count is an error
naming both.
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from guided_diffusion.errors import DataError

MODALITIES = ("flair", "t1", "t1ce", "t2")  # channel order of BraTS data preprocessed with --mod all
FLAIR, T1, T1CE, T2 = range(4)
SPLITS = ("train", "val", "test")
SUMMARY_FILE = "preprocess_summary.json"  # what preprocessing made of each split (written by data/preprocess.py)
_SLICE_RE = re.compile(r"^slice_(\d+)\.npz$")


def modality_index(name: str, mod: str = "all") -> int:
    """Channel index of modality `name` in data preprocessed with `--mod mod` (single-modality data has channel 0)."""
    key = name.strip().lower()
    if key not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
    if mod == "all":
        return MODALITIES.index(key)
    if key != mod:
        raise ValueError(f"modality {name!r} is not in data preprocessed with --mod {mod}")
    return 0


def normalise_slice(x: np.ndarray) -> torch.Tensor:
    """[C, H, W] -> float32 per-channel min-max to [-1, 1] (upstream: (x - min) / (max - min + 1e-5) * 2 - 1)."""
    t = torch.from_numpy(np.asarray(x)).float()
    flat = t.reshape(t.shape[0], -1)
    lo = flat.min(1).values[:, None, None]
    hi = flat.max(1).values[:, None, None]
    return (t - lo) / (hi - lo + 1e-5) * 2 - 1


def slice_paths(patient_dir: Path) -> List[Path]:
    """The patient's slice files sorted by z (other files are ignored)."""
    found = []
    for p in patient_dir.iterdir():
        m = _SLICE_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _redo(path: Path) -> str:
    return (f"Preprocess that subject again: delete {Path(path).parent} and rerun scripts/preprocess.py with the same "
            "flags (finished subjects are kept)")


def read_slice(path: Path, keys: Sequence[str] = ("x", "y")) -> Dict[str, np.ndarray]:
    """The arrays ``keys`` of one slice file; a ``DataError`` naming the file if it is truncated, corrupt or lacks one."""
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(f"slice file {path} has no {'/'.join(missing)} array (it holds {data.files}); "
                                f"{_redo(path)}")
            arrays = {k: data[k] for k in keys}
    except DataError:
        raise
    except Exception as exc:  # BadZipFile, EOFError, zlib.error, ValueError (pickled or garbage), OSError
        raise DataError(f"cannot read slice file {path}: it is truncated or corrupt ({type(exc).__name__}: {exc}). "
                        f"{_redo(path)}") from None
    for k, a in arrays.items():  # NaN/inf would turn every metric, loss and map of its batch into NaN in silence
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"slice file {path} holds {int((~np.isfinite(a)).sum())} non-finite value(s) (NaN/inf) in "
                            f"{k}: the scan it was cut from has NaN/inf voxels; fix or replace that scan. {_redo(path)}")
    return arrays


def read_slice_shape(path: Path) -> Tuple[int, ...]:
    """(channels, height, width) of a slice file's ``x`` [1, C, H, W], from its header alone (nothing decompressed
    beyond it); a ``DataError`` naming the file when that cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read_header(f)[0]
    except Exception as exc:
        raise DataError(f"cannot read slice file {path}: it is truncated or corrupt ({type(exc).__name__}: {exc}). "
                        f"{_redo(path)}") from None
    if len(shape) != 4 or shape[0] != 1:
        raise DataError(f"slice file {path} holds x of shape {tuple(shape)}, not [1, channels, height, width]; "
                        f"{_redo(path)}")
    return tuple(int(n) for n in shape[1:])


def data_shape(data_dir: str, splits: Sequence[str] = SPLITS) -> Tuple[int, int]:
    """(channels, image size) of a preprocessed folder's slices: the first slice of the first of ``splits`` that has
    one; a ``DataError`` naming the folder when none has."""
    for split in splits:
        for patient in sorted(Path(data_dir, f"npy_{split}").glob("patient_*")):
            files = slice_paths(patient)
            if files:
                channels, height, _ = read_slice_shape(files[0])
                return channels, height
    raise DataError(f"{data_dir} holds no slices (npy_{{{','.join(splits)}}}/patient_*/slice_*.npz): preprocess "
                    "data into it first (the preprocess command)")


def slice_label(path: Path) -> int:
    return int((read_slice(path, ("y",))["y"] > 0.5).any())


def _shape_mismatch(shape: Tuple[int, ...], image_size: Optional[int], in_channels: Optional[int]) -> bool:
    return ((in_channels is not None and shape[0] != in_channels)
            or (image_size is not None and tuple(shape[1:]) != (image_size, image_size)))


class BrainDataset(Dataset):
    """Slices of one split.

    mixed=True: every slice of every patient (or of the first `num_mix` patients after the seeded shuffle).
    mixed=False (controlled): the first `n_unhealthy_patients` patients keep all their slices, the next
    `n_healthy_patients` (-1: all the rest) keep only slices with an empty mask. `n_unhealthy_patients=0` is
    healthy-only training. The patient shuffle uses `patient_seed` (upstream always used 0).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        n_unhealthy_patients: int = -1,
        n_healthy_patients: int = -1,
        mixed: bool = False,
        ret_lab: bool = True,
        num_mix: Optional[int] = None,
        patient_seed: int = 0,
        image_size: Optional[int] = None,
        in_channels: Optional[int] = None,
        flags_source: str = "the flags",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.ret_lab = split, ret_lab
        root = self.root = Path(data_dir) / f"npy_{split}"
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found: is --data_dir a preprocessed folder (with npy_{split}/)?")
        patients = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("patient_"))
        random.Random(patient_seed).shuffle(patients)
        self.patients = patients

        if mixed:
            n = len(patients) if num_mix is None or num_mix < 0 else min(num_mix, len(patients))
            chosen = [(p, False) for p in patients[:n]]
        else:
            if n_unhealthy_patients < 0 and n_healthy_patients < 0:
                raise ValueError("mixed=False needs n_unhealthy_patients and/or n_healthy_patients >= 0 "
                                 "(n_unhealthy_patients=0 gives healthy slices only; use mixed=True for all slices)")
            n_unh = len(patients) if n_unhealthy_patients < 0 else min(n_unhealthy_patients, len(patients))
            rest = len(patients) - n_unh
            n_h = rest if n_healthy_patients < 0 else min(n_healthy_patients, rest)
            chosen = [(p, False) for p in patients[:n_unh]] + [(p, True) for p in patients[n_unh:n_unh + n_h]]

        self.items: List[Path] = []
        self.labels: List[Optional[int]] = []  # known only where it was needed to filter
        for patient, healthy_only in chosen:
            for path in slice_paths(patient):
                if healthy_only:
                    if slice_label(path):
                        continue
                    self.labels.append(0)
                else:
                    self.labels.append(None)
                self.items.append(path)
        if not self.items:
            raise ValueError(f"no slices selected from {root} (mixed={mixed}, n_unhealthy_patients="
                             f"{n_unhealthy_patients}, n_healthy_patients={n_healthy_patients})"
                             + ("; the validation split holds no subject: a small data set gets none from "
                                "upstream's 5 %, so preprocess it into a new --output with --min_val_lesion_subjects "
                                "1, which puts a subject with a lesion into validation"
                                if split == "val" and not patients else ""))
        self.image_size, self.in_channels, self.flags_source = image_size, in_channels, flags_source
        if image_size is not None or in_channels is not None:
            firsts = {}
            for path in self.items:
                firsts.setdefault(path.parent, path)
            for path in firsts.values():
                self._check_shape(read_slice_shape(path), path)

    def _check_shape(self, shape: Tuple[int, ...], path: Path) -> None:
        if _shape_mismatch(shape, self.image_size, self.in_channels):
            model = " ".join(f"--{k} {v}" for k, v in (("in_channels", self.in_channels),
                                                      ("image_size", self.image_size)) if v is not None)
            raise DataError(
                f"the data does not fit the model: slice file {path} holds {shape[0]} channel(s) at {shape[1]}x"
                f"{shape[2]} px, but the model ({self.flags_source}) takes {model}. Use the data the model is for, "
                f"or build the model for this data (--in_channels {shape[0]} --image_size {shape[1]}), or preprocess "
                f"again with the model's --image_size / --mod")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        path = self.items[idx]
        data = read_slice(path)
        if data["x"].ndim != 4 or data["y"].ndim != 4 or data["x"].shape[2:] != data["y"].shape[2:]:
            raise DataError(f"slice file {path} holds x {data['x'].shape} and y {data['y'].shape}, not [1, C, H, W] "
                            f"and [1, 1, H, W]; {_redo(path)}")
        x, y = data["x"][0], data["y"][0]
        self._check_shape(x.shape, path)
        gt = torch.from_numpy(y > 0.5).float()  # [1, H, W]
        return normalise_slice(x), gt, int(gt.any())

    def __getitem__(self, idx: int):
        x, gt, lab = self.load(idx)
        if self.split == "train":
            return (x, {"y": lab}) if self.ret_lab else (x, {})
        return x, gt, lab

    def all_labels(self) -> List[int]:
        """Slice labels of the whole dataset (reads only the masks of slices not already known)."""
        for i, lab in enumerate(self.labels):
            if lab is None:
                self.labels[i] = slice_label(self.items[i])
        return list(self.labels)


def known_unhealthy_slices(dataset: BrainDataset) -> Optional[int]:
    """How many of the dataset's slices have a lesion, where that is known without reading every mask: every label
    is known (a healthy-only selection), or the preprocessing summary (``preprocess_summary.json``) counts none in the
    split (then no selection of it has one); None otherwise."""
    if all(lab is not None for lab in dataset.labels):
        return int(sum(dataset.labels))
    path = Path(dataset.root).parent / SUMMARY_FILE
    try:
        count = json.loads(path.read_text())["splits"][dataset.split]["unhealthy_slices"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 0 if count == 0 else None


class ShardedOrderSampler(Sampler[int]):
    """One seeded order of all indices, dealt out to ranks without replacement (rank r takes order[r::world]).

    With `weights`, the order is a weighted draw without replacement (e.g. class-balanced first batches).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 weights: Optional[Sequence[float]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.rank, self.world_size, self.seed, self.epoch = n, rank, world_size, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            return torch.randperm(self.n, generator=g).tolist()
        return torch.multinomial(self.weights, self.n, replacement=False, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _dist_info(distributed: Optional[bool], rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and (rank is None or world_size is None):
        rank = torch.distributed.get_rank() if rank is None else rank
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def get_data_iter(
    name: str,
    data_dir: str | Path,
    batch_size: int,
    split: str,
    ret_lab: bool = True,
    n_healthy_patients: int = -1,
    n_unhealthy_patients: int = -1,
    mixed: bool = False,
    num_mix: Optional[int] = None,
    seed: int = 0,
    use_weighted_sampler: bool = False,
    distributed: Optional[bool] = None,
    num_workers: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    image_size: Optional[int] = None,
    in_channels: Optional[int] = None,
    flags_source: str = "the flags",
):
    """Loader for one split of a preprocessed data set (`name` is a label: brats, atlas, ...).

    `image_size` / `in_channels`: the model's; slices of another size or channel count are a ``DataError`` naming the
    file and both (`flags_source` says where the model's values came from, e.g. a config.json).

    train -> (loader, sampler); per-rank batch = batch_size // world_size; call sampler.set_epoch(epoch).
    val/test -> loader of (x, gt_mask, label) over this rank's shard; batch_size per rank.
    `distributed=None` means: use torch.distributed's rank/world size if a process group is initialised;
    explicit `rank`/`world_size` override that (no process group needed).
    """
    rank, world_size = _dist_info(distributed, rank, world_size)
    dataset = BrainDataset(data_dir, split, n_unhealthy_patients=n_unhealthy_patients,
                           n_healthy_patients=n_healthy_patients, mixed=mixed, ret_lab=ret_lab, num_mix=num_mix,
                           image_size=image_size, in_channels=in_channels, flags_source=flags_source)
    common = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=num_workers > 0)
    if split == "train":
        per_rank = batch_size // world_size
        if per_rank < 1:
            raise ValueError(f"batch_size {batch_size} is smaller than world_size {world_size}")
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        # Upstream drops the last partial batch; on a tiny data set that would leave no batch at all.
        drop_last = len(sampler) >= per_rank
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=drop_last, **common)
        return loader, sampler
    weights = None
    if use_weighted_sampler and mixed:  # class-balanced order (upstream: WeightedRandomSampler, no replacement)
        labels = np.asarray(dataset.all_labels())
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        weights = (1.0 / np.maximum(counts, 1))[labels]
    sampler = ShardedOrderSampler(len(dataset), rank, world_size, seed, weights)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **common)
