"""A volume's slices as the model sees them: per-channel percentile scaling, the brain's slice range, the resize
to the model's size, in the canonical orientation (``PreparedSlices`` keeps what is needed to go back)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.data import geometry as geo
from guided_diffusion.data.raw import SubjectError


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
