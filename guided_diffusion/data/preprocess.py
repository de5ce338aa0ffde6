"""Raw NIfTI volumes (BraTS 2021, ATLAS v2.0) -> the upstream AnoFPDM on-disk slice format.

Output (kept identical to upstream so existing preprocessed data keeps working)::

    <root>/data_splits/{train,val,test}/scans.csv          subject names, '\\n'-joined
    <root>/npy_{train,val,test}/patient_<P>/slice_<z>.npz  x: float64 [1,C,S,S], y: float32 [1,1,S,S]

with ``<root>`` = ``<source.parent>/preprocessed_data_{mod}_{first}{last}_{image_size}`` unless ``output`` is given.
Per subject, as upstream: load with nibabel, stack channels [flair, t1, t1ce, t2] (or the one chosen), optionally
drop the first/last slices, binarise the label at 0.5, divide each channel by the 99th percentile of its voxels > 0
(no clipping), keep the contiguous z range whose channel-mean slice sum exceeds 0.5, and bilinearly resize every
kept slice (image and binary mask, so the saved mask is soft) to ``image_size``.

Beyond upstream, before all that every scan is brought into one canonical orientation (``orientation``, recorded in
``preprocess_settings.json``; see ``geometry.py``): slices are always cut along the inferior-superior axis. The default
is the orientation each data set's standard release is stored in (BraTS LPS, ATLAS RAS), so standard data give the
same slices as upstream; ``orientation="stored"`` is upstream's slicing of the array as stored. What was done to each
subject (stored shape, voxel size and axis codes, the transform, the resize) is in ``preprocess_summary.json``.

Beyond upstream: stray entries and broken subjects are reported (naming the subject and file) and skipped without
losing the others; each subject is written to a hidden temp folder and renamed into place (``fileio.atomic_dir``:
a killed run leaves no half-written subject, and its leftovers are removed at the next start); finished subjects
are skipped on a rerun; a full disk stops the run naming the subject; subjects run in parallel worker processes.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import traceback
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion import fileio, logger, runtime
from guided_diffusion.data.loaders import MODALITIES, SPLITS, SUMMARY_FILE, read_slice, read_slice_shape
from guided_diffusion.data import geometry as geo
from guided_diffusion.errors import SettingsMismatchError, UserError

SPLIT_SEED = 10
SPLIT_FRACTIONS = (0.75, 0.05)  # train, val; test gets the rest
DATASETS = ("brats", "atlas")
SETTINGS_FILE = "preprocess_settings.json"  # what determined the output (checked on every rerun into it)
SPLIT_RECORD = "split.json"  # in data_splits/: the subjects the split was made from (absent: an older split)
FORMAT_VERSION = 1  # of the slice files; bump when what they hold changes


class SubjectError(Exception):
    """A problem with one subject's input; the message names the subject and the file."""


@dataclass
class Subject:
    name: str
    images: Dict[str, Path]  # modality -> volume file
    mask: Optional[Path]
    problem: Optional[str] = None  # set at discovery when the subject cannot be processed


@dataclass
class SubjectResult:
    name: str
    split: str
    status: str  # "done", "skipped" (already there) or "failed"
    healthy: int = 0
    unhealthy: int = 0
    message: str = ""
    slice_range: Tuple[int, int] = (0, 0)
    geometry: Optional[dict] = None  # geo.Geometry.record() of the subject's scan
    warnings: Tuple[str, ...] = ()  # reported by the main process (e.g. modalities not co-registered)


def default_output_dir(source: str | os.PathLike, mod: str, first: int, last: int, image_size: int) -> Path:
    """Upstream's location: beside the source folder."""
    return Path(source).absolute().parent / f"preprocessed_data_{mod}_{first}{last}_{image_size}"


def _warn(msg: str, sink: Optional[List[str]] = None) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)
    if sink is not None:
        sink.append(msg)


# ----------------------------------------------------------------------------------------------------------------
# Discovering subjects


def _nifti(path_gz: Path) -> Path:
    """The .nii.gz path, or the plain .nii next to it if only that exists."""
    if not path_gz.exists():
        plain = path_gz.with_name(path_gz.name[: -len(".gz")])
        if plain.exists():
            return plain
    return path_gz


def _listing(source: Path, warnings: List[str], warn_files: bool = True) -> List[Path]:
    dirs = []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            dirs.append(entry)
        elif warn_files:
            _warn(f"ignoring stray file {entry} in {source} (expected one folder per subject)", warnings)
    return dirs


def _brats_subject(d: Path, mods: Sequence[str]) -> Subject:
    """BraTS 2021: ``<P>/<P>_{flair,t1,t1ce,t2,seg}.nii.gz``."""
    images = {m: _nifti(d / f"{d.name}_{m}.nii.gz") for m in mods}
    return Subject(d.name, images, _nifti(d / f"{d.name}_seg.nii.gz"))


def _brats_subjects(source: Path, mods: Sequence[str], warnings: List[str]) -> List[Subject]:
    return [_brats_subject(d, mods) for d in _listing(source, warnings)]


def _atlas_flat_subject(d: Path) -> Subject:
    """ATLAS as upstream flattened it: ``<P>/<P>_T1w.nii.gz``, ``<P>/<P>_mask.nii.gz``."""
    return Subject(d.name, {"t1": _nifti(d / f"{d.name}_T1w.nii.gz")}, _nifti(d / f"{d.name}_mask.nii.gz"))


def _bids_subject(d: Path, warnings: List[str], require_mask: bool = True) -> Subject:
    """One ``sub-*`` folder of the official ATLAS BIDS tree (``ses-*/anat/*_T1w.nii.gz`` + ``*_mask.nii.gz``)."""
    t1s = sorted(p for p in d.rglob("*_T1w.nii*") if p.name.endswith((".nii", ".nii.gz")))
    masks = sorted(p for p in d.rglob("*_mask.nii*") if p.name.endswith((".nii", ".nii.gz")))
    problem = None
    if not t1s:
        problem = f"subject {d.name}: no *_T1w.nii.gz file under {d}"
    elif not masks and require_mask:
        problem = f"subject {d.name}: no lesion *_mask.nii.gz file under {d}"
    elif len(t1s) > 1:
        _warn(f"subject {d.name}: {len(t1s)} T1w files, using {t1s[0]}", warnings)
    return Subject(d.name, {"t1": t1s[0] if t1s else d / f"{d.name}_T1w.nii.gz"}, masks[0] if masks else None,
                   problem)


def _atlas_subjects(source: Path, warnings: List[str], require_mask: bool = True) -> List[Subject]:
    top = _listing(source, [], warn_files=False)
    flattened = [d for d in top if _nifti(d / f"{d.name}_T1w.nii.gz").exists()]
    if flattened:  # upstream's layout: <P>/<P>_T1w.nii.gz, <P>/<P>_mask.nii.gz
        _listing(source, warnings)  # now warn about stray files
        return [_atlas_flat_subject(d) for d in top]
    # Official BIDS release: [Training/][R0xx/]sub-*/ses-*/anat/*_T1w.nii.gz + *_label-L_desc-T1lesion_mask.nii.gz
    sub_dirs: List[Path] = []
    for root, dirs, _files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(root).name.startswith("sub-"):
            sub_dirs.append(Path(root))
            dirs[:] = []  # don't descend into sessions looking for more subjects
        elif len(Path(root).relative_to(source).parts) >= 3:
            dirs[:] = []
    subjects: Dict[str, Subject] = {}
    for d in sorted(sub_dirs, key=lambda p: p.name):
        subject = _bids_subject(d, warnings, require_mask)
        if d.name in subjects:
            _warn(f"duplicate subject {d.name} at {d}; keeping {subjects[d.name].images['t1'].parent}", warnings)
            continue
        subjects[d.name] = subject
    return list(subjects.values())


def subject_from_folder(folder: str | os.PathLike, name: str, mod: str, warnings: Optional[List[str]] = None,
                        require_mask: bool = True) -> Subject:
    """The subject of one folder in the layout of dataset `name` (a BraTS subject folder, an ATLAS ``<P>/`` folder
    or a BIDS ``sub-*`` folder), as ``discover_subjects`` would list it."""
    warnings = [] if warnings is None else warnings
    d = Path(folder)
    if not d.is_dir():
        raise NotADirectoryError(f"subject folder {d} is not a folder")
    if name == "brats":
        return _brats_subject(d, MODALITIES if mod == "all" else (mod,))
    if name == "atlas":
        if _nifti(d / f"{d.name}_T1w.nii.gz").exists():
            return _atlas_flat_subject(d)
        return _bids_subject(d, warnings, require_mask)
    raise ValueError(f"--name must be one of {DATASETS}, got {name!r}")


def discover_subjects(source: str | os.PathLike, name: str, mod: str,
                      warnings: Optional[List[str]] = None, require_mask: bool = True) -> List[Subject]:
    """Subjects under `source` (sorted by name) for dataset `name` and modality choice `mod`.

    ``require_mask=False`` (segmentation of new scans): a BIDS subject without a lesion mask is not a problem.
    """
    warnings = [] if warnings is None else warnings
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--source {source} does not exist")
    if not source.is_dir():
        raise NotADirectoryError(f"--source {source} is not a folder")
    if name == "brats":
        subjects = _brats_subjects(source, MODALITIES if mod == "all" else (mod,), warnings)
    elif name == "atlas":
        subjects = _atlas_subjects(source, warnings, require_mask)
    else:
        raise ValueError(f"--name must be one of {DATASETS}, got {name!r}")
    subjects = [s for s in subjects if _is_subject(s, warnings)]
    if not subjects:
        raise ValueError(f"no subject folders found in --source {source} for --name {name}")
    return sorted(subjects, key=lambda s: s.name)


def _is_subject(subject: Subject, warnings: List[str]) -> bool:
    """A folder is a subject when it holds at least one of the subject's files; others are reported and left out,
    so they take no part in the split (a subject missing some files is one, and fails with a message)."""
    files = [p for p in (*subject.images.values(), subject.mask) if p is not None]
    if any(Path(p).exists() for p in files):
        return True
    folder = Path(files[0]).parent if files else subject.name
    _warn(f"ignoring folder {folder} in --source: it holds none of a subject's files "
          f"({', '.join(Path(p).name for p in files)}), so it is not a subject and takes no part in the split",
          warnings)
    return False


# ----------------------------------------------------------------------------------------------------------------
# Splits


def _give_validation_lesions(parts: Dict[str, List[int]], names: Sequence[str], wanted: int,
                             has_lesion: Callable[[str], bool], warnings: List[str]) -> None:
    """Move lesion subjects from train into val (in place) until val has ``wanted`` of them."""
    have = sum(has_lesion(names[i]) for i in parts["val"])
    donors = [i for i in parts["train"] if has_lesion(names[i])]
    while have < wanted and donors:
        donor = donors.pop(0)
        parts["train"].remove(donor)
        healthy_val = [i for i in parts["val"] if not has_lesion(names[i])]
        if healthy_val:  # swap, so the split sizes stay upstream's
            parts["val"].remove(healthy_val[-1])
            parts["train"].append(healthy_val[-1])
        parts["val"].append(donor)
        have += 1
    if have < wanted:
        _warn(f"only {have} subject(s) with a lesion could be put into validation (wanted {wanted})", warnings)


def seeded_split(names: Sequence[str], min_val_lesion: int = 0, has_lesion: Optional[Callable[[str], bool]] = None,
                 warnings: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """Upstream's split of the sorted ``names``: random.seed(10) shuffle, int(75 %) / int(5 %) / rest (see make_splits)."""
    names = sorted(names)
    indices = list(range(len(names)))
    random.Random(SPLIT_SEED).shuffle(indices)  # same permutation as upstream's random.seed(10); random.shuffle
    n_train = int(len(indices) * SPLIT_FRACTIONS[0])
    n_val = int(len(indices) * SPLIT_FRACTIONS[1])
    parts = {"train": indices[:n_train], "val": indices[n_train:n_train + n_val], "test": indices[n_train + n_val:]}
    if min_val_lesion > 0:
        _give_validation_lesions(parts, names, min_val_lesion, has_lesion, [] if warnings is None else warnings)
    return {split: [names[i] for i in parts[split]] for split in SPLITS}


def make_splits(names: Sequence[str], splits_dir: Path, warnings: Optional[List[str]] = None,
                min_val_lesion: int = 0, has_lesion: Optional[Callable[[str], bool]] = None) -> Dict[str, List[str]]:
    """Per-subject split as upstream (random.seed(10) shuffle of the sorted listing, 75% / 5% / rest).

    ``names`` are the subjects (folders that are not subjects take no part, see ``discover_subjects``). An existing
    ``data_splits`` folder is reused as is, so reruns and added subjects never reshuffle; one made by an older
    version (no ``split.json``) whose seeded split included folders that were not subjects is refused when that
    changed the real subjects' assignment (``_check_older_split``).
    ``min_val_lesion > 0`` (off by default, so upstream's split stays the default) makes sure validation holds at
    least that many subjects with a lesion (``has_lesion(name)``): M_max, one of AnoFPDM's hyper-parameters, can
    only be estimated from unhealthy validation slices, and small data sets often get none. Lesion subjects move
    from train to validation in the shuffled order, replacing validation subjects without a lesion.
    """
    warnings = [] if warnings is None else warnings
    if splits_dir.exists():
        splits = {}
        for split in SPLITS:
            csv = splits_dir / split / "scans.csv"
            if not csv.exists():
                raise FileNotFoundError(f"{csv} is missing; delete {splits_dir} to re-create the splits")
            splits[split] = [line.strip() for line in csv.read_text().splitlines() if line.strip()]
        if not (splits_dir / SPLIT_RECORD).exists():
            splits = _check_older_split(splits, names, splits_dir, min_val_lesion, has_lesion, warnings)
        listed = {n for names_ in splits.values() for n in names_}
        for n in names:
            if n not in listed:
                _warn(f"subject {n} is not in {splits_dir}; ignored (delete data_splits to re-split)", warnings)
        if min_val_lesion > 0 and sum(has_lesion(n) for n in splits["val"]) < min_val_lesion:
            raise ValueError(f"the existing split in {splits_dir} has fewer than {min_val_lesion} validation "
                             f"subject(s) with a lesion; delete {splits_dir} (and the npy_* folders) to re-split")
        return splits
    splits = seeded_split(names, min_val_lesion, has_lesion, warnings)
    record = {"seed": SPLIT_SEED, "fractions": list(SPLIT_FRACTIONS), "min_val_lesion_subjects": min_val_lesion,
              "subjects": sorted(names)}
    with fileio.atomic_dir(splits_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
            (tmp / split / "scans.csv").write_text("\n".join(splits[split]))
        (tmp / SPLIT_RECORD).write_text(json.dumps(record, indent=1))
    return splits


def _check_older_split(splits: Dict[str, List[str]], names: Sequence[str], splits_dir: Path, min_val_lesion: int,
                       has_lesion: Optional[Callable[[str], bool]], warnings: List[str]) -> Dict[str, List[str]]:
    """A split made before non-subject folders were left out may hold such a folder, which shifted the seeded split.

    Names in the split that are neither subjects now nor preprocessed (no ``npy_*/patient_<name>``) are taken for
    such folders. When the split is the seeded split of its own listing and leaving them out assigns the real
    subjects differently, this is an error saying how to re-split or keep it; otherwise they are dropped (warning).
    A hand-made split (not the seeded one of its listing) is kept as it is.
    """
    root = splits_dir.parent
    subjects = set(names)
    listed = [n for split in SPLITS for n in splits[split]]
    strays = sorted(n for n in listed if n not in subjects
                    and not any((root / f"npy_{split}" / f"patient_{n}").is_dir() for split in SPLITS))
    if not strays:
        return splits
    seeded = [seeded_split(listed)] + ([seeded_split(listed, min_val_lesion, has_lesion)] if min_val_lesion > 0 else [])
    if splits not in seeded:
        return splits  # not the seeded split of its listing: made by hand, kept as it is
    kept = {split: [n for n in splits[split] if n not in strays] for split in SPLITS}
    made_with = min_val_lesion if splits == seeded[-1] and splits != seeded[0] else 0
    without = seeded_split([n for n in listed if n not in strays], made_with, has_lesion)
    if without == kept:
        _warn(f"{splits_dir} lists {', '.join(strays)}, which is not a subject in --source (left out; the split of "
              "the subjects is the same without it)", warnings)
        return kept
    where = {n: s for s in SPLITS for n in kept[s]}
    moved = sum(where[n] != s for s in SPLITS for n in without[s])
    raise SettingsMismatchError(
        f"{splits_dir} was made by an older version from a listing that included {', '.join(strays[:5])}: "
        f"{'folders that are' if len(strays) > 1 else 'a folder that is'} not a subject (no subject files, never "
        f"preprocessed). Without {'them' if len(strays) > 1 else 'it'} the seeded split assigns {moved} of the "
        f"{len(where)} subjects differently. To re-split: delete {splits_dir} and {root}/npy_train, npy_val, npy_test "
        f"and rerun (the subjects are preprocessed again). To keep this assignment (e.g. models were trained on it): "
        f"delete {'those names' if len(strays) > 1 else 'that name'} from {splits_dir}/*/scans.csv")


# ----------------------------------------------------------------------------------------------------------------
# One subject


def load_volume(path: Path, subject: str, kind: str) -> np.ndarray:
    """A 3-D float64 volume; raises SubjectError naming the subject and file on any problem."""
    import nibabel as nib

    if path is None or not Path(path).exists():
        raise SubjectError(f"subject {subject}: missing {kind} file {path}")
    try:
        data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))
    except Exception as exc:  # nibabel / gzip / zlib raise many types for corrupt or truncated files
        raise SubjectError(f"subject {subject}: cannot read {kind} file {path} (corrupt or truncated?): "
                           f"{type(exc).__name__}: {exc}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SubjectError(f"subject {subject}: {kind} file {path} is not a 3-D volume (shape {data.shape})")
    if not np.isfinite(data).all():
        raise SubjectError(f"subject {subject}: {kind} file {path} contains NaN or infinite values")
    return data


def normalise_percentile(volume: np.ndarray) -> np.ndarray:
    """Divide each channel of [C, H, W, S] by the 99th percentile of its voxels > 0 (no clipping), in place."""
    for c in range(volume.shape[0]):
        foreground = volume[c][volume[c] > 0]
        volume[c] /= np.quantile(foreground, 0.99)  # linear interpolation, as torch.quantile
    return volume


def brain_slice_range(volume: np.ndarray, threshold: float = 0.5) -> Tuple[int, int]:
    """[start, stop) from the first to the last z whose channel-mean slice sum exceeds `threshold`."""
    per_slice = volume.mean(axis=0).sum(axis=(0, 1))
    keep = np.nonzero(per_slice > threshold)[0]
    if len(keep) == 0:
        return 0, 0
    return int(keep[0]), int(keep[-1]) + 1


def trim_slices(volume: np.ndarray, first: int, last: int) -> np.ndarray:
    """Drop the first `first` and last `last` slices along the last axis (values <= 0 keep everything)."""
    stop = volume.shape[-1] - last if last > 0 else volume.shape[-1]
    return volume[..., max(first, 0):stop]


def subject_has_lesion(subject: Subject) -> bool:
    """Whether the subject's mask/seg volume has any voxel > 0.5 (False when it cannot be read)."""
    try:
        return bool((load_volume(subject.mask, subject.name, "mask/seg") > 0.5).any())
    except SubjectError:
        return False


def _count_existing(patient_dir: Path) -> Tuple[int, int]:

    healthy = unhealthy = 0
    for f in patient_dir.glob("slice_*.npz"):
        try:
            y = read_slice(f, ("y",))["y"]
        except ValueError as exc:  # names the file
            raise SubjectError(f"{exc} (a finished subject: delete {patient_dir} and rerun to preprocess it again)") from None
        if (y > 0.5).any():
            unhealthy += 1
        else:
            healthy += 1
    return healthy, unhealthy


def load_subject(subject: Subject, require_mask: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(volume [C, H, W, S] float64 in the channel order of subject.images, mask [H, W, S] or None)``.

    Raises SubjectError naming the subject and file for a missing, corrupt or all-zero file and for shapes that
    differ between modalities and mask. ``require_mask=False``: a subject without a mask file gives None.
    """
    if subject.problem:
        raise SubjectError(subject.problem)
    channels = [load_volume(p, subject.name, m) for m, p in subject.images.items()]
    has_mask = subject.mask is not None and Path(subject.mask).exists()
    mask = load_volume(subject.mask, subject.name, "mask/seg") if (has_mask or require_mask) else None
    shapes = {str(p): c.shape for p, c in zip(subject.images.values(), channels)}
    if mask is not None:
        shapes[str(subject.mask)] = mask.shape
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{Path(p).name}: {s}" for p, s in shapes.items())
        raise SubjectError(f"subject {subject.name}: modalities and mask differ in shape ({listing})")
    for (m, p), c in zip(subject.images.items(), channels):
        if not (c > 0).any():
            raise SubjectError(f"subject {subject.name}: {m} file {p} is all zero (no voxel > 0)")
    return np.stack(channels), mask


def grid_warnings(subject: Subject) -> List[str]:
    """Modalities or mask on another grid than the first modality (same shape, another affine): they are still read
    voxel by voxel, as upstream did, but were probably not co-registered (headers only are read)."""
    import nibabel as nib

    files = [p for p in (*subject.images.values(), subject.mask) if p is not None and Path(p).exists()]
    notes = []
    try:
        reference = nib.load(str(files[0])).affine if files else None
        for path in files[1:]:
            if not np.allclose(nib.load(str(path)).affine, reference, atol=1e-3):
                notes.append(f"subject {subject.name}: {Path(path).name} has another affine than {Path(files[0]).name} "
                             f"(not co-registered?); it is read voxel by voxel on the grid of {Path(files[0]).name}")
    except Exception:  # an unreadable file fails the subject by name where its data are read
        pass
    return notes


def subject_geometry(subject: Subject, orientation: str) -> geo.Geometry:
    """The geometry of the subject's scan (the header of its first image, which every channel and the mask share
    voxel by voxel, as upstream reads them) for the canonical ``orientation`` (``geometry.resolve_orientation``).

    Raises SubjectError naming the subject and file for a missing or unreadable file or an affine without
    orientation."""
    import nibabel as nib

    if subject.problem:
        raise SubjectError(subject.problem)
    path = next(iter(subject.images.values()))
    if path is None or not Path(path).exists():
        raise SubjectError(f"subject {subject.name}: missing file {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise SubjectError(f"subject {subject.name}: cannot read {path} (corrupt or truncated?): "
                           f"{type(exc).__name__}: {exc}") from None
    try:
        return geo.scan_geometry(img, orientation)
    except ValueError as exc:
        raise SubjectError(f"subject {subject.name}: {path}: {exc}; cannot tell which way the slices run") from None


def resize_slices(slices: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, *size]``: bilinear, half-pixel centres, no antialias (upstream's resize).

    The same call inverts it (segmentation maps back to the scan's grid), so both directions share one geometry.
    """
    return F.interpolate(slices, size=tuple(size), mode="bilinear", align_corners=False)


@dataclass
class PreparedSlices:
    """What preprocessing keeps of one volume: the slices the model sees, and where they came from.

    ``x`` float64 ``[N, C, S, S]`` (per-channel 99th-percentile scaling, then the resize), ``y`` float32
    ``[N, 1, S, S]`` (the binarised mask resized: soft) or None. Slice i is z = ``start + i`` of the volume after
    ``trim_slices`` (the ``slice_<z>.npz`` name), i.e. z = ``first + start + i`` of the whole volume in the frame the
    slices were cut in, whose shape is ``shape`` (H, W, Z): the canonical frame of ``geometry``, or the array as
    given without one.
    """

    x: np.ndarray
    y: Optional[np.ndarray]
    start: int
    stop: int
    first: int
    shape: Tuple[int, int, int]
    geometry: Optional[geo.Geometry] = None

    @property
    def original_z(self) -> range:
        """The kept slices' indices along the last axis of the (canonical) volume."""
        return range(self.first + self.start, self.first + self.stop)

    def to_stored(self, volume: np.ndarray) -> np.ndarray:
        """A volume in the frame the slices were cut in, on the scan's grid as stored (lossless)."""
        return volume if self.geometry is None else self.geometry.to_stored(volume)

    def to_canonical(self, volume: np.ndarray) -> np.ndarray:
        """A volume on the scan's grid as stored, in the frame the slices were cut in (lossless)."""
        return volume if self.geometry is None else self.geometry.to_canonical(volume)


def prepare_slices(volume: np.ndarray, mask: Optional[np.ndarray], image_size: int, first: int = 0, last: int = 0,
                   subject: str = "?", geometry: Optional[geo.Geometry] = None) -> PreparedSlices:
    """Volume ``[C, H, W, Z]`` (+ mask ``[H, W, Z]``) -> the kept, normalised, resized slices (see module docstring).

    This is the one definition of what training data are: preprocessing writes its result, segmentation of new
    scans feeds it to the model. With ``geometry`` (``subject_geometry``) the volume and mask, given as stored, are
    first brought into its canonical orientation (a copy); without, they are sliced as given and ``volume`` is
    modified in place (normalised).
    """
    if geometry is not None:
        volume = geometry.to_canonical(volume)
        mask = None if mask is None else geometry.to_canonical(mask)
    shape = tuple(int(n) for n in volume.shape[1:])
    volume = trim_slices(volume, first, last)  # [C, H, W, S]
    if volume.shape[-1] == 0:
        raise SubjectError(f"subject {subject}: --first {first} and --last {last} drop all {shape[-1]} slices of its "
                           "scan (along the inferior-superior axis): lower them (use the values the training data "
                           "were preprocessed with)")
    labels = None if mask is None else (trim_slices(mask, first, last) > 0.5).astype(np.float32)  # all classes -> 1
    volume = normalise_percentile(volume)
    start, stop = brain_slice_range(volume)
    if stop <= start:
        raise SubjectError(f"subject {subject}: no slice has brain tissue (channel-mean slice sum > 0.5)")

    # Resize all kept slices at once: [S, C, H, W] -> [S, C, size, size]; bilinear, no antialias, as upstream.
    size = (image_size, image_size)
    x = torch.from_numpy(np.ascontiguousarray(volume[..., start:stop].transpose(3, 0, 1, 2)))
    x = resize_slices(x, size).numpy()
    y = None
    if labels is not None:
        y = torch.from_numpy(np.ascontiguousarray(labels[None, ..., start:stop].transpose(3, 0, 1, 2)))
        y = resize_slices(y, size).numpy()
    return PreparedSlices(x, y, start, stop, max(first, 0), shape, geometry)


def process_subject(subject: Subject, split_dir: Path, image_size: int = 128, first: int = 0,
                    last: int = 0, orientation: str = geo.DEFAULT_ORIENTATION["brats"]) -> SubjectResult:
    """Preprocess one subject into ``split_dir/patient_<name>`` atomically; skip it if already there."""
    split = split_dir.name[len("npy_"):]
    final = split_dir / f"patient_{subject.name}"
    if final.is_dir():
        healthy, unhealthy = _count_existing(final)
        try:  # the record of what was done comes from the header alone
            record = subject_geometry(subject, orientation).record(image_size)
        except SubjectError:
            record = None
        return SubjectResult(subject.name, split, "skipped", healthy, unhealthy, geometry=record)
    volume, mask = load_subject(subject)
    geometry = subject_geometry(subject, orientation)
    prepared = prepare_slices(volume, mask, image_size, first, last, subject.name, geometry)
    x, y, start, stop = prepared.x, prepared.y, prepared.start, prepared.stop

    healthy = unhealthy = 0
    with fileio.atomic_dir(final) as tmp:
        for i, z in enumerate(range(start, stop)):
            np.savez_compressed(tmp / f"slice_{z}.npz", x=x[i:i + 1], y=y[i:i + 1])
            if (y[i] > 0.5).any():
                unhealthy += 1
            else:
                healthy += 1
    return SubjectResult(subject.name, split, "done", healthy, unhealthy, slice_range=(start, stop),
                         geometry=geometry.record(image_size), warnings=tuple(grid_warnings(subject)))


def _run_one(subject: Subject, split_dir: Path, image_size: int, first: int, last: int,
             orientation: str) -> SubjectResult:
    """Worker entry: never raises for bad input, so one subject cannot take down the others."""
    try:
        return process_subject(subject, split_dir, image_size, first, last, orientation)
    except SubjectError as exc:
        return SubjectResult(subject.name, split_dir.name[4:], "failed", message=str(exc))
    except fileio.DiskFullError:
        raise  # every other subject would fail the same way: stop the run
    except Exception as exc:  # unexpected: keep the traceback's last line for the report
        tb = traceback.format_exc(limit=-1).strip().splitlines()[-1]
        return SubjectResult(subject.name, split_dir.name[4:], "failed",
                             message=f"subject {subject.name}: unexpected {type(exc).__name__}: {exc} ({tb})")


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; avoid oversubscription


# ----------------------------------------------------------------------------------------------------------------
# Whole data set


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise PermissionError(f"output folder {folder} is not writable: {exc}") from None


def _check_unrecorded_orientation(root: Path, orientation: str, subjects: Sequence[Subject]) -> None:
    """An output made before the orientation was recorded holds slices cut from the arrays as stored: adding subjects
    in the canonical ``orientation`` mixes frames unless its subjects were stored that way already (then both agree,
    as for BraTS in LPS). A SettingsMismatchError names the subjects stored otherwise and what to do."""
    if orientation == geo.STORED:
        return
    by_name = {s.name: s for s in subjects}
    differ = []
    for patient in sorted(root.glob("npy_*/patient_*")):
        subject = by_name.get(patient.name[len("patient_"):])
        if subject is None:
            continue
        try:
            stored = subject_geometry(subject, orientation).axcodes
        except SubjectError:
            continue
        if stored != orientation:
            differ.append(f"{subject.name} ({stored})")
    if differ:
        raise SettingsMismatchError(
            f"{root} was preprocessed before scans were brought into one orientation: its slices were cut from the "
            f"arrays as stored, and {len(differ)} of its subjects are not stored {orientation} (e.g. "
            f"{', '.join(differ[:3])}), so new subjects would be cut in another frame. Pass --orientation "
            f"{geo.STORED} to go on as it was made (and segment with --orientation {geo.STORED}), or preprocess into "
            "another --output")


def check_output_settings(root: Path, settings: Dict[str, object], warnings: List[str],
                          subjects: Sequence[Subject] = ()) -> Dict[str, object]:
    """Refuse to preprocess into ``root`` with other settings than it was made with (``preprocess_settings.json``);
    returns the settings to record (``fileio.write_settings_record``) once the split is checked too.

    An output made before settings were recorded is checked by what its slices show (image size, channels); one made
    before the orientation was recorded, by how its ``subjects`` are stored (``_check_unrecorded_orientation``).
    """
    settings = dict(settings, format_version=FORMAT_VERSION)
    channels = len(MODALITIES) if settings["mod"] == "all" else 1
    remedy = (f"Rerun with the recorded settings, preprocess into another --output (the default folder name carries "
              f"--mod, --first/--last and --image_size), or delete {root} to start over")

    def older_output() -> None:

        existing = next(iter(sorted(root.glob("npy_*/patient_*/slice_*.npz"))), None)
        if existing is None:
            return
        shape = read_slice_shape(existing)
        wanted = (channels, settings["image_size"], settings["image_size"])
        if shape != wanted:
            raise SettingsMismatchError(
                f"{root} holds slices of {shape[0]} channel(s) at {shape[1]}x{shape[2]} px (e.g. {existing}); this "
                f"run makes {channels} channel(s) at {wanted[1]}x{wanted[2]} px (--mod {settings['mod']}, --image_size "
                f"{settings['image_size']}). Adding to it would mix both. {remedy}")
        if "orientation" in settings:
            _check_unrecorded_orientation(root, settings["orientation"], subjects)
        _warn(f"{root} has no {SETTINGS_FILE} (made by an older version): its slices fit --mod {settings['mod']} "
              f"--image_size {settings['image_size']}; the other settings cannot be checked; recording these", warnings)

    compared = settings
    try:
        recorded = json.loads((root / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        recorded = None  # none, or unreadable (check_settings_record says so)
    if isinstance(recorded, dict) and "orientation" not in recorded and "orientation" in settings:
        _check_unrecorded_orientation(root, settings["orientation"], subjects)  # recorded before orientation was
        compared = {k: v for k, v in settings.items() if k != "orientation"}
    fileio.check_settings_record(root / SETTINGS_FILE, compared, what=f"the preprocessed data in {root}",
                                 remedy=remedy, labels={"format_version": "format version"}, on_missing=older_output)
    return settings


def preprocess(
    source: str | os.PathLike,
    name: str = "brats",
    mod: str = "all",
    first: int = 0,
    last: int = 0,
    output: Optional[str | os.PathLike] = None,
    image_size: int = 128,
    workers: int = 1,
    progress: bool = True,
    min_val_lesion: int = 0,
    orientation: str = "",
) -> dict:
    """Preprocess a whole data set; returns (and writes to ``<root>/preprocess_summary.json``) the summary.

    Summary: ``{"output", "orientation", "splits": {split: {patients, skipped, failed, healthy_slices,
    unhealthy_slices}}, "subjects": {name: geometry record}, "errors": [...], "warnings": [...]}``. Bad subjects are
    reported in "errors" and skipped. ``orientation``: the canonical orientation slices are cut in
    (``geometry.resolve_orientation``; empty: the data set's default, BraTS LPS, ATLAS RAS).
    """
    if name not in DATASETS:
        raise ValueError(f"--name must be one of {DATASETS}, got {name!r}")
    orientation = geo.resolve_orientation(orientation, name)
    if mod not in ("all",) + MODALITIES:
        raise ValueError(f"--mod must be one of all, {', '.join(MODALITIES)}; got {mod!r}")
    if name == "atlas":
        if mod == "all":
            mod = "t1"  # ATLAS has T1w only; upstream required --mod t1 (and crashed on all)
            print("ATLAS has only T1w: using --mod t1", flush=True)
        elif mod != "t1":
            raise ValueError(f"ATLAS has only T1w images: --mod must be t1 (or all), got {mod!r}")
    if image_size < 1:
        raise ValueError(f"--image_size must be positive, got {image_size}")
    if first < 0 or last < 0:
        raise ValueError(f"--first/--last must be >= 0, got {first}/{last}")
    if min_val_lesion < 0:
        raise ValueError(f"--min_val_lesion_subjects must be >= 0, got {min_val_lesion}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")

    warnings: List[str] = []
    subjects = discover_subjects(source, name, mod, warnings)
    root = Path(output) if output else default_output_dir(source, mod, first, last, image_size)
    if root.absolute().parent == Path(source).absolute():  # --output inside --source is not a subject
        subjects = [s for s in subjects if s.name != root.name]
    _check_writable(root)
    fileio.sweep_temp_files(root)  # partial files and folders left behind by a killed run
    settings = check_output_settings(root, dict(name=name, mod=mod, first=first, last=last, image_size=image_size,
                                                min_val_lesion_subjects=min_val_lesion, orientation=orientation),
                                     warnings, subjects)
    for split in SPLITS:
        _check_writable(root / f"npy_{split}")
        fileio.sweep_temp_files(root / f"npy_{split}")

    by_name = {s.name: s for s in subjects}
    splits = make_splits([s.name for s in subjects], root / "data_splits", warnings, min_val_lesion,
                         lambda n: subject_has_lesion(by_name[n]) if n in by_name else False)
    fileio.write_settings_record(root / SETTINGS_FILE, settings, {"source": str(Path(source).absolute())})
    tasks = []
    for split in SPLITS:
        for n in splits[split]:
            if n not in by_name:
                _warn(f"subject {n} listed in data_splits/{split}/scans.csv is not in --source {source}", warnings)
                continue
            tasks.append((by_name[n], root / f"npy_{split}"))
    print(f"Preprocessing {len(tasks)} subjects from {source} into {root} "
          f"({name}, mod={mod}, image_size={image_size}, orientation={orientation}, workers={workers})", flush=True)

    results: List[SubjectResult] = []
    bar = logger.progress_bar(len(tasks), "subjects", enabled=progress)
    if workers <= 1:
        for subject, split_dir in tasks:
            results.append(_run_one(subject, split_dir, image_size, first, last, orientation))
            bar.update()
    else:
        with runtime.worker_pool(workers, initializer=_init_worker) as pool:  # workers end with this process
            futures = [pool.submit(_run_one, s, d, image_size, first, last, orientation) for s, d in tasks]
            try:
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            except BrokenProcessPool:
                raise UserError(f"a worker process died (out of memory?); the {len(results)} subjects finished "
                                   f"so far are kept: rerun to resume, with fewer --workers") from None
    bar.close()

    errors = [r.message for r in results if r.status == "failed"]
    for msg in errors:
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
    for r in sorted(results, key=lambda r: r.name):
        for note in r.warnings:
            _warn(note, warnings)
        if r.geometry is not None and r.geometry["stored"]["obliquity_deg"] > geo.OBLIQUE_DEGREES:
            _warn(f"subject {r.name}: the scan's axes are {r.geometry['stored']['obliquity_deg']:.0f} degrees oblique "
                  f"to the world axes; its slices are cut along the closest axes ({r.geometry['stored']['axcodes']} "
                  "stored), not resampled", warnings)
    summary = {"output": str(root), "name": name, "mod": mod, "image_size": image_size, "orientation": orientation,
               "splits": {}, "errors": errors, "warnings": warnings}
    for split in SPLITS:
        rs = [r for r in results if r.split == split]
        ok = [r for r in rs if r.status != "failed"]
        summary["splits"][split] = {
            "patients": len(ok),
            "skipped": sum(r.status == "skipped" for r in rs),
            "failed": len(rs) - len(ok),
            "healthy_slices": sum(r.healthy for r in ok),
            "unhealthy_slices": sum(r.unhealthy for r in ok),
        }
    _check_validation_split(summary["splits"]["val"], min_val_lesion, root, warnings)
    summary["subjects"] = {r.name: {"split": r.split, "geometry": r.geometry}
                           for r in sorted(results, key=lambda r: r.name) if r.status != "failed"}
    fileio.write_text(root / SUMMARY_FILE, json.dumps(summary, indent=1))
    print(format_summary(summary), flush=True)
    return summary


def training_geometry(name: str, data_dir: Optional[str | os.PathLike] = None) -> geo.TrainingGeometry:
    """The training data's voxel size and field of view: the median over the train subjects of a preprocessed folder
    (``data_dir``, its ``preprocess_summary.json``) when it records them, else those of the data set's standard
    release (``geometry.DATASET_GEOMETRY``)."""
    if data_dir:
        path = Path(data_dir) / SUMMARY_FILE
        try:
            subjects = json.loads(path.read_text()).get("subjects") or {}
        except (OSError, ValueError, AttributeError):
            subjects = {}
        records = [s.get("geometry") for s in subjects.values() if isinstance(s, dict) and s.get("split") == "train"]
        found = geo.training_geometry_from_records([r for r in records if r], f"train subjects of {path}")
        if found is not None:
            return found
    return geo.DATASET_GEOMETRY[name]


def _check_validation_split(val: dict, min_val_lesion: int, root: Path, warnings: List[str]) -> None:
    """Say at preprocessing, with the fix, what would otherwise only surface as an error of the validation pass: an
    empty validation split, or one without a slice with a lesion (AnoFPDM fits M_max on those)."""
    if val["patients"] and val["unhealthy_slices"]:
        return
    what = ("is empty (upstream's split gives it 5 % of the subjects rounded down: none for fewer than 20)"
            if not val["patients"] else
            f"has no slice with a lesion ({val['patients']} subject(s), {val['healthy_slices']} healthy slices)")
    if min_val_lesion > 0:
        fix = (f"--min_val_lesion_subjects {min_val_lesion} found no training subject with a lesion to move there; "
               "add subjects with lesions, or pass a translation run's hyperparams.json (--hyperparams_file)")
    else:
        fix = (f"preprocess into a new --output (or delete {root}) with --min_val_lesion_subjects 1, which puts a "
               "subject with a lesion into validation")
    _warn(f"the validation split {what}: AnoFPDM's validation pass needs validation slices with a lesion to fit its "
          f"hyper-parameters (M_max), and will stop without them. To fix it: {fix}", warnings)


def format_summary(summary: dict) -> str:
    lines = [f"{'split':<6} {'patients':>8} {'skipped':>8} {'failed':>7} {'healthy':>9} {'unhealthy':>10}"]
    for split, s in summary["splits"].items():
        lines.append(f"{split:<6} {s['patients']:>8} {s['skipped']:>8} {s['failed']:>7} "
                     f"{s['healthy_slices']:>9} {s['unhealthy_slices']:>10}")
    lines.append(f"output: {summary['output']}")
    if summary["errors"]:
        lines.append(f"{len(summary['errors'])} subject(s) failed; see the ERROR lines above")
    return "\n".join(lines)
