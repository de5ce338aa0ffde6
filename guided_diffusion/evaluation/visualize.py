"""PNG panels of anomaly-segmentation results (pillow only, no matplotlib needed).

One row per slice: the input modality, the ground truth over the input (green), the aggregated anomaly map
(heat colours, scaled per slice), and the predicted mask over the input (red; yellow where it overlaps
the ground truth). A caption states the slice labels and the Dice.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from guided_diffusion import fileio

TILE_TITLES = ("input", "ground truth", "anomaly map", "prediction")


def _to_uint8(img: np.ndarray, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    img = np.nan_to_num(np.asarray(img, dtype=np.float32))
    lo = float(img.min()) if lo is None else lo
    hi = float(img.max()) if hi is None else hi
    scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Black -> red -> yellow -> white for values in [0, 1]: ``[H, W]`` -> uint8 ``[H, W, 3]``."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def overlay(base: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """Blend ``color`` into a uint8 image (grey ``[H, W]`` or RGB ``[H, W, 3]``) where ``mask`` is set."""
    rgb = base if base.ndim == 3 else np.repeat(base[..., None], 3, -1)
    rgb = rgb.astype(np.float32)
    m = np.asarray(mask, bool)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    return rgb.astype(np.uint8)


def panel_row(image: np.ndarray, gt: np.ndarray, anomaly_map: np.ndarray, pred_mask: np.ndarray) -> np.ndarray:
    """Four tiles side by side for one slice; inputs ``[H, W]`` (image in [-1, 1]) -> uint8 ``[H, 4W, 3]``."""
    gray = _to_uint8(image, -1.0, 1.0)
    gt = np.asarray(gt, bool)
    pred = np.asarray(pred_mask, bool)
    pred_tile = overlay(overlay(gray, pred & ~gt, (255, 0, 0), 0.6), pred & gt, (255, 255, 0), 0.6)
    amap = np.nan_to_num(np.asarray(anomaly_map, np.float32))
    hi = float(np.percentile(amap, 99.5)) if amap.size else 1.0
    tiles = [
        np.repeat(gray[..., None], 3, -1),
        overlay(gray, gt, (0, 255, 0), 0.5),
        heat_colormap(amap / hi if hi > 0 else amap),
        pred_tile,
    ]
    return np.concatenate(tiles, axis=1)


def save_panels(
    path: str,
    images: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    captions: Optional[Sequence[str]] = None,
    scale: Optional[int] = None,
) -> str:
    """Write a PNG with one row per slice (see module docstring); returns ``path``. Written atomically.

    ``scale`` enlarges the pixels (default: so that a tile is at least 160 px wide).
    """
    if not len(images):
        raise ValueError("save_panels needs at least one slice")
    rows = []
    for i, (img, gt, amap, mask) in enumerate(zip(images, gts, maps, masks)):
        row = panel_row(np.squeeze(img), np.squeeze(gt), np.squeeze(amap), np.squeeze(mask))
        if scale is None:
            scale = max(1, -(-160 // (row.shape[1] // 4)))
        if scale > 1:
            row = np.kron(row, np.ones((scale, scale, 1), np.uint8))
        caption_h = 14
        canvas = Image.new("RGB", (row.shape[1], row.shape[0] + caption_h), (0, 0, 0))
        canvas.paste(Image.fromarray(row), (0, caption_h))
        draw = ImageDraw.Draw(canvas)
        text = captions[i] if captions is not None else ""
        tile_w = row.shape[1] // 4
        for j, title in enumerate(TILE_TITLES):
            draw.text((j * tile_w + 2, 1), title, fill=(255, 255, 255))
        row_img = np.asarray(canvas)
        if text:  # a caption line above the tile titles
            cap = Image.new("RGB", (row.shape[1], caption_h), (0, 0, 0))
            ImageDraw.Draw(cap).text((2, 1), text, fill=(200, 200, 200))
            row_img = np.concatenate([np.asarray(cap), row_img], axis=0)
        rows.append(row_img)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    with fileio.atomic_write(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return path
