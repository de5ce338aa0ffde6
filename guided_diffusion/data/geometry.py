"""Scan geometry: one canonical orientation for every scan before slicing, and the way back to the scan's own grid.

Upstream cut slices along the last array axis as stored. A scan stored in another orientation than the training
data (permuted axes: sagittal slices; flipped axes: upside-down slices) then reached the network in a frame it never
saw. Here every scan is brought into one canonical orientation first (``--orientation``, three axis codes in
nibabel's convention, the direction each array axis increases towards, e.g. ``LPS``): a permutation and flips of the
array, found from the affine's closest axes (``nibabel.io_orientation``, as MONAI ``Orientationd``, TorchIO
``ToCanonical`` and nnU-Net do), so it is lossless and its inverse puts results back on the scan's grid exactly.
Slices are then cut along the canonical frame's last axis, which is always the inferior-superior one.

The default orientation of a data set is the one its standard release is stored in, so standard data are not
changed: BraTS 2021 is stored LPS (the first axis runs towards the patient's left, the second towards posterior),
ATLAS v2.0 on the MNI152NLin2009aSym grid RAS. ``stored`` keeps upstream's behaviour (no reorientation).

An oblique scan (axes rotated against the world axes) is reoriented to its closest axes only, not resampled: its
brain stays rotated by that angle relative to the training data. Spacing and field of view are not resampled either:
every slice is resized to the model's square size as the training data were (``preprocess.resize_slices``).
Both are recorded, and a scan far from the training data gets a warning (``Geometry.warnings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

STORED = "stored"  # no reorientation: slices along the last array axis as stored (upstream)
DEFAULT_ORIENTATION = {"brats": "LPS", "atlas": "RAS"}  # how each data set's standard release is stored
_PAIRS = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "IS", "I": "IS"}
AXIS_NAMES = {"LR": "left-right", "AP": "anterior-posterior", "IS": "inferior-superior"}

# A scan is "far from the training data" (a warning) beyond these limits.
OBLIQUE_DEGREES = 10.0  # rotation of an array axis against its closest world axis
SPACING_FACTOR = 2.0  # voxel size along any axis, either way
FOV_FACTOR = 1.25  # in-plane field of view along either axis, either way


def resolve_orientation(orientation: str, name: str = "brats") -> str:
    """The canonical orientation of a run: ``orientation`` checked, or the data set's default when it is empty.

    Valid: ``stored``, or three axis codes, one of L/R, A/P and S/I each, the last S or I (slices are cut along the
    last axis, which must be the inferior-superior one). A ValueError names ``--orientation``.
    """
    value = (orientation or "").strip()
    if not value:
        if name not in DEFAULT_ORIENTATION:
            raise ValueError(f"no default orientation for data set {name!r}; pass --orientation")
        return DEFAULT_ORIENTATION[name]
    if value.lower() == STORED:
        return STORED
    codes = value.upper()
    if len(codes) != 3 or set(codes) - set(_PAIRS) or len({_PAIRS[c] for c in codes}) != 3:
        raise ValueError(f"--orientation {orientation!r}: expected three axis codes, one of L/R, A/P and S/I each "
                         f"(e.g. LPS as BraTS is stored, RAS), or {STORED!r} (no reorientation)")
    if _PAIRS[codes[2]] != "IS":
        raise ValueError(f"--orientation {orientation!r}: the last axis must be S or I (slices are cut along it, and "
                         "they must be axial)")
    return codes


@dataclass(frozen=True)
class TrainingGeometry:
    """Voxel size and field of view (mm) of the training data per world axis (``LR``, ``AP``, ``IS``)."""

    spacing_mm: Mapping[str, float]
    fov_mm: Mapping[str, float]
    source: str

    def record(self) -> dict:
        return {"voxel_size_mm": dict(self.spacing_mm), "field_of_view_mm": dict(self.fov_mm), "source": self.source}


# The standard releases: BraTS 2021 240x240x155 at 1 mm (SRI24), ATLAS v2.0 197x233x189 at 1 mm (MNI152NLin2009aSym).
DATASET_GEOMETRY = {
    "brats": TrainingGeometry({"LR": 1.0, "AP": 1.0, "IS": 1.0}, {"LR": 240.0, "AP": 240.0, "IS": 155.0},
                              "BraTS 2021 (240x240x155 voxels of 1 mm)"),
    "atlas": TrainingGeometry({"LR": 1.0, "AP": 1.0, "IS": 1.0}, {"LR": 197.0, "AP": 233.0, "IS": 189.0},
                              "ATLAS v2.0 (197x233x189 voxels of 1 mm)"),
}


def training_geometry_from_records(records: Sequence[Mapping], source: str) -> Optional[TrainingGeometry]:
    """The median voxel size and field of view per world axis of subjects' geometry records (``Geometry.record``)."""
    spacing: Dict[str, List[float]] = {}
    fov: Dict[str, List[float]] = {}
    for rec in records:
        try:
            canonical = rec["canonical"]
            for code, s, f in zip(canonical["axcodes"], canonical["voxel_size_mm"], canonical["field_of_view_mm"]):
                spacing.setdefault(_PAIRS[code], []).append(float(s))
                fov.setdefault(_PAIRS[code], []).append(float(f))
        except (KeyError, TypeError, ValueError):
            continue
    if set(spacing) != set(AXIS_NAMES):
        return None
    return TrainingGeometry({k: float(np.median(v)) for k, v in spacing.items()},
                            {k: float(np.median(v)) for k, v in fov.items()}, source)


def voxel_sizes_mm(img) -> Tuple[float, float, float]:
    """Voxel sizes of the three spatial axes in mm (the header's spatial unit: mm unless it says m or µm)."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    unit = img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else "mm"
    per_mm = {"meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)
    return tuple(z * per_mm for z in zooms)


def _apply(arr: np.ndarray, ornt: Sequence[Sequence[int]]) -> np.ndarray:
    """``nibabel.apply_orientation`` on the last three axes (leading axes, e.g. channels, stay), as a contiguous copy.

    ``ornt[i] = (j, f)``: axis i goes to axis j, reversed when f is -1.
    """
    lead = arr.ndim - 3
    for i, (_, flip) in enumerate(ornt):
        if flip == -1:
            arr = np.flip(arr, lead + i)
    source = [0, 0, 0]
    for i, (j, _) in enumerate(ornt):
        source[j] = i
    # Contiguous: the same values in the same memory order whatever the storage, so every later reduction (sums,
    # quantiles) runs in the same order and gives bit-identical results for every storage of the same scan.
    return np.ascontiguousarray(np.transpose(arr, list(range(lead)) + [lead + i for i in source]))


@dataclass(frozen=True)
class Geometry:
    """Where a scan's array lies relative to the canonical frame its slices are cut in.

    ``ornt[i] = (j, f)``: stored axis i is canonical axis j, reversed when f is -1 (nibabel's orientation
    transform). ``file_shape`` is the file's shape (trailing singleton axes included: outputs get it back).
    """

    orientation: str
    file_shape: Tuple[int, ...]
    voxel_size_mm: Tuple[float, float, float]
    axcodes: str
    ornt: Tuple[Tuple[int, int], ...]
    obliquity_deg: float

    @property
    def stored_shape(self) -> Tuple[int, int, int]:
        return tuple(int(n) for n in self.file_shape[:3])

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The canonical frame's shape."""
        out = [0, 0, 0]
        for i, (j, _) in enumerate(self.ornt):
            out[j] = self.stored_shape[i]
        return tuple(out)

    @property
    def canonical_voxel_size_mm(self) -> Tuple[float, float, float]:
        out = [0.0, 0.0, 0.0]
        for i, (j, _) in enumerate(self.ornt):
            out[j] = self.voxel_size_mm[i]
        return tuple(out)

    @property
    def canonical_axcodes(self) -> str:
        return self.axcodes if self.orientation == STORED else self.orientation

    @property
    def inverse(self) -> Tuple[Tuple[int, int], ...]:
        inv = [(0, 1)] * 3
        for i, (j, flip) in enumerate(self.ornt):
            inv[j] = (i, flip)
        return tuple(inv)

    @property
    def is_identity(self) -> bool:
        return self.ornt == ((0, 1), (1, 1), (2, 1))

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """``[..., *stored_shape]`` -> ``[..., *shape]`` (a contiguous copy; lossless)."""
        if tuple(arr.shape[-3:]) != self.stored_shape:
            raise ValueError(f"array of shape {arr.shape} is not on the scan's grid {self.stored_shape}")
        return _apply(arr, self.ornt)

    def to_stored(self, arr: np.ndarray) -> np.ndarray:
        """``[..., *shape]`` -> ``[..., *stored_shape]``: exactly undoes ``to_canonical``."""
        if tuple(arr.shape[-3:]) != self.shape:
            raise ValueError(f"array of shape {arr.shape} is not on the canonical grid {self.shape}")
        return _apply(arr, self.inverse)

    def field_of_view_mm(self) -> Tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.canonical_voxel_size_mm))

    def record(self, image_size: Optional[int] = None) -> dict:
        """What was done to the scan (JSON): stored and canonical grids, the transform, the slice axis, the resize."""
        slice_axis = next(i for i, (j, _) in enumerate(self.ornt) if j == 2)
        rec = {
            "orientation": self.orientation,
            "stored": {"shape": list(self.file_shape), "voxel_size_mm": _rounded(self.voxel_size_mm),
                       "axcodes": self.axcodes, "obliquity_deg": round(self.obliquity_deg, 3)},
            "to_canonical": [list(o) for o in self.ornt],
            "canonical": {"shape": list(self.shape), "voxel_size_mm": _rounded(self.canonical_voxel_size_mm),
                          "axcodes": self.canonical_axcodes, "field_of_view_mm": _rounded(self.field_of_view_mm())},
            "slice_axis": {"stored_axis": slice_axis, "reversed": self.ornt[slice_axis][1] == -1},
        }
        if image_size is not None:
            fov = self.field_of_view_mm()
            rec["resize"] = {"from": list(self.shape[:2]), "to": [image_size, image_size],
                             "pixel_mm": _rounded((fov[0] / image_size, fov[1] / image_size))}
        return rec

    def warnings(self, subject: str, reference: Optional[TrainingGeometry] = None) -> List[str]:
        """Why this scan may be far from the training data: an oblique grid; with ``reference``, a voxel size or an
        in-plane field of view beyond ``SPACING_FACTOR`` / ``FOV_FACTOR`` of the training data's."""
        notes = []
        codes = self.canonical_axcodes
        if self.obliquity_deg > OBLIQUE_DEGREES:
            notes.append(f"subject {subject}: the scan's axes are {self.obliquity_deg:.0f} degrees oblique to the world "
                         f"axes; slices are cut along the closest axes ({self.axcodes} stored, {codes} canonical), so "
                         f"the brain is rotated by up to that angle against the training data (resample the scan onto "
                         "an axis-aligned grid for results like the training data's)")
        if reference is None:
            return notes
        pairs = [_PAIRS[c] for c in codes]
        for pair, size in zip(pairs, self.canonical_voxel_size_mm):
            ref = float(reference.spacing_mm[pair])
            if not 1 / SPACING_FACTOR <= size / ref <= SPACING_FACTOR:
                notes.append(f"subject {subject}: voxel size {size:.3g} mm along the {AXIS_NAMES[pair]} axis is "
                             f"{size / ref:.2g} times the training data's {ref:.3g} mm ({reference.source}); slices "
                             "are resized as the training data were, not resampled, so the image looks "
                             f"{'coarser' if size > ref else 'finer'} than in training")
        fov = self.field_of_view_mm()
        ratios = [fov[k] / float(reference.fov_mm[pairs[k]]) for k in (0, 1)]
        if any(not 1 / FOV_FACTOR <= r <= FOV_FACTOR for r in ratios):
            ref = [float(reference.fov_mm[pairs[k]]) for k in (0, 1)]
            notes.append(f"subject {subject}: in-plane field of view {fov[0]:.0f} x {fov[1]:.0f} mm "
                         f"({AXIS_NAMES[pairs[0]]} x {AXIS_NAMES[pairs[1]]}) differs from the training data's "
                         f"{ref[0]:.0f} x {ref[1]:.0f} mm ({reference.source}) by more than a factor {FOV_FACTOR}: "
                         "every slice is resized to the model's size as a whole, so the brain appears "
                         f"{'smaller' if max(ratios) > 1 else 'larger'} (or stretched) compared with training")
        return notes


def _rounded(values: Sequence[float]) -> List[float]:
    return [round(float(v), 6) for v in values]


def scan_geometry(img, orientation: str) -> Geometry:
    """The geometry of a nibabel image (its header and affine only) for the canonical ``orientation``
    (``resolve_orientation``). A ValueError when the affine does not give every axis a direction."""
    import nibabel as nib
    from nibabel import orientations as nio

    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"the affine {affine.tolist()} is not a finite 4x4 matrix")
    stored = nio.io_orientation(affine)
    if np.isnan(stored).any():
        raise ValueError(f"the affine gives no direction to some array axis (affine {np.round(affine, 4).tolist()})")
    axcodes = "".join(nio.ornt2axcodes(stored))
    if orientation == STORED:
        ornt = ((0, 1), (1, 1), (2, 1))
    else:
        transform = nio.ornt_transform(stored, nio.axcodes2ornt(tuple(orientation)))
        ornt = tuple((int(j), int(f)) for j, f in transform)
    with np.errstate(invalid="ignore", divide="ignore"):
        oblique = nib.affines.obliquity(affine)
    deg = float(np.degrees(np.nanmax(oblique))) if np.isfinite(oblique).any() else 0.0
    return Geometry(orientation, tuple(int(n) for n in img.shape), voxel_sizes_mm(img), axcodes, ornt,
                    0.0 if math.isnan(deg) else deg)
