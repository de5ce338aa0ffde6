"""Raw subjects: finding them in a data set's layout (BraTS 2021 folders, ATLAS flattened or BIDS), reading their
volumes as preprocessing stacks them, and their geometry."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from guided_diffusion.data import geometry as geo
from guided_diffusion.data.loaders import MODALITIES

DATASETS = ("brats", "atlas")


class SubjectError(Exception):
    """A problem with one subject's input; the message names the subject and the file."""


@dataclass
class Subject:
    name: str
    images: Dict[str, Path]  # modality -> volume file
    mask: Optional[Path]
    problem: Optional[str] = None  # set at discovery when the subject cannot be processed


def _warn(msg: str, sink: Optional[List[str]] = None) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)
    if sink is not None:
        sink.append(msg)


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


def subject_has_lesion(subject: Subject) -> bool:
    """Whether the subject's mask/seg volume has any voxel > 0.5 (False when it cannot be read)."""
    try:
        return bool((load_volume(subject.mask, subject.name, "mask/seg") > 0.5).any())
    except SubjectError:
        return False


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
