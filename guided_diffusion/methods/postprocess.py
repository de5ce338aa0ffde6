"""Post-processing of anomaly maps, shared by every method: the median window, the component filter, their size
defaults, and the fixed-threshold mask of the reconstruction baselines.

As upstream: the anomaly map is median-filtered over ``kernel``² windows with reflect padding (``median_pool``), and
8-connected components of at most ``max_size`` pixels are removed from the binary mask (skimage ``regionprops(...)
.filled_area <= 40`` at 128²). Upstream's sizes were chosen for 128-px slices; the defaults here keep the 5-px median
window at every size and scale the component size with the image area (``default_component_size``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: upstream's median window (pixels), at every image size
DEFAULT_MEDIAN_KERNEL = 5
#: upstream's component filter: components of at most this many pixels are removed at 128 px
UPSTREAM_COMPONENT_SIZE = 40
UPSTREAM_IMAGE_SIZE = 128
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def default_component_size(image_size: int) -> int:
    """Upstream's 40 px at 128², scaled with the image area: round(40 · (image_size / 128)²)."""
    return int(round(UPSTREAM_COMPONENT_SIZE * (image_size / UPSTREAM_IMAGE_SIZE) ** 2))


def component_size(size: int, image_size: int) -> int:
    """``size`` as given (>= 0), or the default for ``image_size`` when negative (the flags' -1)."""
    return size if size >= 0 else default_component_size(image_size)


def check_median_kernel(kernel: int) -> int:
    """A ValueError naming the flag unless ``kernel`` is an odd window size >= 1."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"--median_kernel must be an odd window size >= 1, got {kernel}")
    return kernel


def median_filter2d(x: torch.Tensor, kernel_size: int = DEFAULT_MEDIAN_KERNEL) -> torch.Tensor:
    """Median over ``kernel_size``² windows of ``[B, C, H, W]`` with reflect padding (upstream ``median_pool``)."""
    if kernel_size <= 1:
        return x
    if kernel_size % 2 == 0:
        raise ValueError(f"median kernel size must be odd, got {kernel_size}")
    pad = kernel_size // 2
    b, c, h, w = x.shape
    mode = "reflect" if min(h, w) > pad else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    patches = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # [B, C, H, W, k, k]
    return patches.reshape(b, c, h, w, -1).median(-1).values


def remove_small_components(mask, max_size: int = UPSTREAM_COMPONENT_SIZE):
    """Drop 8-connected components of at most ``max_size`` pixels (holes are not counted).

    Accepts a numpy array or tensor ``[..., H, W]`` and returns the same type (a new object). ``max_size <= 0``
    keeps everything. Upstream uses skimage ``regionprops(label(m, connectivity=3)).filled_area <= 40`` on each
    ``[1, H, W]`` slice; in a volume one voxel deep every background voxel touches the border, so no hole is
    filled and ``filled_area`` is the pixel count (a 40-px ring around 81 px is removed there and here).
    """
    is_tensor = isinstance(mask, torch.Tensor)
    arr = mask.detach().cpu().numpy() if is_tensor else np.asarray(mask)
    out = arr.astype(bool).copy()
    if max_size > 0:
        flat = out.reshape(-1, *out.shape[-2:])
        for img in flat:
            labelled, n = ndimage.label(img, structure=_EIGHT_CONNECTED)
            if n == 0:
                continue
            sizes = np.bincount(labelled.ravel(), minlength=n + 1)
            small = sizes <= max_size
            small[0] = False  # background
            img[small[labelled]] = False
    if is_tensor:
        return torch.from_numpy(out).to(mask.device)
    return out


def threshold_mask(amap: torch.Tensor, threshold: float,
                   cc_max_size: int = UPSTREAM_COMPONENT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask after the component filter [B,1,H,W] bool, predicted label [B] int64 from the mask before it)``.

    The comparison is in the map's dtype (float32), as upstream's ``tensor >= python float``.
    """
    raw = amap >= torch.tensor(threshold, dtype=amap.dtype, device=amap.device)
    pred_label = raw.flatten(1).any(1).long()
    mask = remove_small_components(raw, cc_max_size) if cc_max_size > 0 else raw
    return mask, pred_label
