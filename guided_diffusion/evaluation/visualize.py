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


def _text_tile(width: int, height: int, lines: Sequence[str]) -> np.ndarray:
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, 3 + 12 * i), line, fill=(220, 220, 220))
    return np.asarray(canvas)


def _label_tile(tile: np.ndarray, text: str) -> np.ndarray:
    canvas = Image.fromarray(tile)
    ImageDraw.Draw(canvas).text((3, 2), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def save_method_columns(
    path: str,
    images: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    titles: Sequence[str],
    maps: Sequence[Sequence[np.ndarray]],
    masks: Sequence[Sequence[np.ndarray]],
    notes: Optional[Sequence[Sequence[str]]] = None,
    mask_captions: Optional[Sequence[Sequence[str]]] = None,
    scale: Optional[int] = None,
) -> dict:
    """One picture comparing methods on the same slices: a column per method, two rows per slice.

    Columns: input, ground truth (green over the input), then one per method (``titles[m]``). For slice i the
    first row holds the input, the ground truth and each method's anomaly map ``maps[m][i]`` (heat colours, scaled
    per tile); the second row the slice's ``notes[i]`` (text lines) and each method's mask ``masks[m][i]`` over the
    input (red; yellow where it overlaps the ground truth) with ``mask_captions[m][i]`` written on it. Images are
    ``[H, W]`` in [-1, 1]. Written atomically; returns the layout ``{"columns", "rows", "tile"}`` (tile side in px).
    """
    n_methods, n_slices = len(titles), len(images)
    if not n_slices or not n_methods:
        raise ValueError("save_method_columns needs at least one slice and one method")
    if len(maps) != n_methods or len(masks) != n_methods or any(len(m) != n_slices for m in (*maps, *masks)):
        raise ValueError(f"maps and masks need one list of {n_slices} slices per method ({n_methods} methods)")
    side = int(np.squeeze(images[0]).shape[-1])
    scale = scale or max(1, -(-140 // side))
    tile = side * scale

    def big(a: np.ndarray) -> np.ndarray:
        return np.kron(a, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else a

    header = np.concatenate([_text_tile(tile, 18, [t]) for t in ("input", "ground truth", *titles)], axis=1)
    rows = [header]
    for i in range(n_slices):
        gray = _to_uint8(np.squeeze(images[i]), -1.0, 1.0)
        gt = np.asarray(np.squeeze(gts[i]), bool)
        top = [big(np.repeat(gray[..., None], 3, -1)), big(overlay(gray, gt, (0, 255, 0), 0.5))]
        bottom = [_text_tile(2 * tile, tile, list(notes[i]) if notes is not None else [])]
        for m in range(n_methods):
            amap = np.nan_to_num(np.asarray(np.squeeze(maps[m][i]), np.float32))
            hi = float(np.percentile(amap, 99.5)) if amap.size else 1.0
            top.append(big(heat_colormap(amap / hi if hi > 0 else amap)))
            pred = np.asarray(np.squeeze(masks[m][i]), bool)
            tile_img = big(overlay(overlay(gray, pred & ~gt, (255, 0, 0), 0.6), pred & gt, (255, 255, 0), 0.6))
            if mask_captions is not None:
                tile_img = _label_tile(tile_img, mask_captions[m][i])
            bottom.append(tile_img)
        rows += [np.concatenate(top, axis=1), np.concatenate(bottom, axis=1), np.zeros((3, tile * (2 + n_methods), 3), np.uint8)]
    sheet = np.concatenate(rows, axis=0)
    with fileio.atomic_write(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return {"columns": 2 + n_methods, "rows": 2 * n_slices, "tile": tile}
