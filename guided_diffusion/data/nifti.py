"""NIfTI on the scan's own grid: results written like their input, slices mapped back to voxels.

Preprocessing (``preprocess.prepare_slices``) brings the scan into its canonical orientation (``geometry.py``: a
permutation and flips of the array), keeps the z range ``[first + start, first + stop)`` of that frame's last axis
and resizes every kept slice from H×W to S×S (``preprocess.resize_slices``: bilinear, half-pixel centres). Here the
inverse: ``slices_to_canonical`` resizes S×S results back to H×W with the same function and puts them at their z in
the canonical frame, zero elsewhere; ``slices_to_volume`` / ``mask_to_volume`` then undo the permutation and flips
losslessly, so a result voxel (i, j, k) lies where input voxel (i, j, k) lies. A binary mask is decided (> 0.5) in the
canonical frame before that, so ties at exactly 0.5 fall the same way whichever way the scan was stored, and every
storage of one scan gets bit-identical results in physical space. ``save_like`` writes a result with the reference's
own shape (trailing singleton axes included), affine, qform and sform (codes included), voxel sizes and units: it
opens over the scan in any viewer.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional, Sequence

import numpy as np
import torch

from guided_diffusion.data.geometry import voxel_sizes_mm
from guided_diffusion.data.preprocess import PreparedSlices, resize_slices


def load_reference(path: str | os.PathLike):
    """The image whose grid results are written on (header only; nibabel reads the data lazily)."""
    import nibabel as nib

    return nib.load(str(path))


def voxel_volume_ml(reference) -> float:
    """Volume of one voxel in millilitres (mm³ / 1000) from the header's voxel sizes (spatial units assumed mm,
    unless the header says metres or micrometres)."""
    return float(np.prod(voxel_sizes_mm(reference))) / 1000.0


def like_reference(data: np.ndarray, reference, dtype, description: str = ""):
    """A NIfTI image of ``data`` (the reference's spatial shape) on the reference's grid, stored as ``dtype``.

    Affine, qform and sform with their codes, voxel sizes and units come from the reference, and its shape: a
    reference of shape (240, 240, 155, 1) gets data of shape (240, 240, 155) back as (240, 240, 155, 1). Scaling is
    reset so the stored values are ``data`` exactly.
    """
    import nibabel as nib

    spatial = tuple(int(n) for n in reference.shape[:3])
    if tuple(data.shape) != spatial:
        raise ValueError(f"result shape {tuple(data.shape)} differs from the reference grid {spatial}")
    if len(reference.shape) > 3 and all(int(n) == 1 for n in reference.shape[3:]):
        data = np.reshape(data, tuple(int(n) for n in reference.shape))
    klass = nib.Nifti2Image if isinstance(reference, nib.Nifti2Image) else nib.Nifti1Image
    header = klass.header_class.from_header(reference.header)
    img = klass(np.asarray(data, dtype=dtype), reference.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if isinstance(reference, nib.Nifti1Image):  # Nifti2Image is one too
        img.set_qform(reference.get_qform(), int(reference.header["qform_code"]))
        img.set_sform(reference.get_sform(), int(reference.header["sform_code"]))
    img.header["descrip"] = description.encode()[:79]
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header["cal_min"], img.header["cal_max"] = 0, 1
    return img


def nifti_bytes(img, path: str | os.PathLike) -> bytes:
    """The single-file NIfTI bytes of ``img``, gzip-compressed when ``path`` ends in ``.gz``."""
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if str(path).endswith(".gz") else raw


def save_like(path: str | os.PathLike, data: np.ndarray, reference, dtype, description: str = "") -> None:
    """Write ``data`` on the reference's grid (``like_reference``) to ``path`` atomically (``fileio``)."""
    from guided_diffusion import fileio

    fileio.write_bytes(path, nifti_bytes(like_reference(data, reference, dtype, description), path))


def slices_to_canonical(slices: np.ndarray, prepared: PreparedSlices) -> np.ndarray:
    """Results on the kept slices ``[N, 1, S, S]`` (or ``[N, S, S]``) -> float32 volume ``prepared.shape`` in the
    frame the slices were cut in.

    Each slice is resized back to H×W with preprocessing's own resize and put at its z; slices outside the kept
    range are zero.
    """
    arr = np.asarray(slices, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    n = len(prepared.original_z)
    if arr.ndim != 4 or arr.shape[0] != n or arr.shape[1] != 1:
        raise ValueError(f"expected {n} slices [N, 1, S, S] for the kept range {prepared.original_z}, "
                         f"got shape {arr.shape}")
    h, w, depth = prepared.shape
    volume = np.zeros((h, w, depth), np.float32)
    if n:
        back = resize_slices(torch.from_numpy(np.ascontiguousarray(arr)), (h, w))[:, 0].numpy()  # [N, H, W]
        volume[..., prepared.original_z.start:prepared.original_z.stop] = back.transpose(1, 2, 0)
    return volume


def slices_to_volume(slices: np.ndarray, prepared: PreparedSlices) -> np.ndarray:
    """Results on the kept slices -> float32 volume on the scan's grid as stored (``slices_to_canonical``, then
    the reorientation undone)."""
    return prepared.to_stored(slices_to_canonical(slices, prepared))


def mask_to_volume(mask: np.ndarray, prepared: PreparedSlices) -> np.ndarray:
    """A binary slice mask back on the scan's grid, uint8: the resized mask > 0.5 (as the slices' ground truth is
    read), decided in the canonical frame, so that every storage of a scan gets the same voxels."""
    decided = (slices_to_canonical(np.asarray(mask, np.float32), prepared) > 0.5).astype(np.uint8)
    return prepared.to_stored(decided)


def display_slice(plane: np.ndarray, axcodes: Sequence[Optional[str]]) -> np.ndarray:
    """A 2-D slice (array axes 0, 1) oriented for display in radiological convention.

    ``axcodes``: the orientation codes of the two in-plane array axes (``nibabel.aff2axcodes``: the direction each
    axis increases towards). The left-right axis runs horizontally with the patient's right on the image's left
    and the top is anterior (axial slices); without a left-right axis (sagittal) anterior is left and superior up.
    """
    codes = [str(c) if c else "?" for c in axcodes[:2]]
    if "L" in codes or "R" in codes:
        h = 0 if codes[0] in "LR" else 1
    else:
        h = 0 if codes[0] in "AP" else 1
    v = 1 - h
    img = plane if v == 0 else plane.T  # rows follow axis v, columns axis h
    if codes[v] in ("A", "S"):  # index grows toward anterior/superior: flip so that it is on top
        img = img[::-1]
    if codes[h] in ("R", "A"):  # index grows toward right/anterior: flip so that it is on the left
        img = img[:, ::-1]
    return np.ascontiguousarray(img)
