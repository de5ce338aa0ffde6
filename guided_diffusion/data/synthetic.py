"""BraTS-like synthetic brain MRI, built from the MNI ICBM152 templates shipped in the nilearn wheel.

Each subject is the MNI152 (2009a, 1 mm) T1 / grey-matter / white-matter templates pushed through a random
affine + smooth non-linear warp, rendered into four modalities [flair, t1, t1ce, t2] with tissue contrasts,
a multiplicative bias field, Rician noise and a global intensity scale. Tumour subjects get a lesion with a
necrotic core (label 1), surrounding oedema (label 2) and an enhancing rim (label 4): bright oedema on FLAIR/T2,
bright rim on T1ce, dark on T1. Output follows the BraTS 2021 raw layout,
``<out>/<P>/<P>_{flair,t1,t1ce,t2,seg}.nii.gz`` (240x240x155, skull-stripped, zero background), so the normal
preprocessing runs on it unchanged. Everything is deterministic given (seed, subject index).

nilearn is only needed here (``pip install -e .[demo]``); loading its templates reads package files, no network.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from concurrent.futures import as_completed
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion import fileio, logger, runtime
from guided_diffusion.errors import UserError

MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_SHAPE = (240, 240, 155)
SEG_NECROTIC, SEG_OEDEMA, SEG_ENHANCING = 1, 2, 4

# Relative intensities per modality (WM on T1 ~ 1) for csf, gm, wm, necrotic core, oedema, enhancing rim.
CONTRASTS: Dict[str, Tuple[float, float, float, float, float, float]] = {
    "flair": (0.12, 0.62, 0.48, 0.35, 1.20, 0.95),
    "t1": (0.22, 0.62, 0.95, 0.20, 0.48, 0.58),
    "t1ce": (0.22, 0.62, 0.95, 0.25, 0.55, 1.50),
    "t2": (1.20, 0.62, 0.42, 1.25, 1.05, 0.75),
}
# How the T1 template's fine anatomy (residual after the tissue model) shows up in each modality.
TEXTURE_SIGN = {"flair": -0.5, "t1": 1.0, "t1ce": 1.0, "t2": -0.8}


@dataclasses.dataclass(frozen=True)
class LesionSettings:
    """What the tumours of a synthetic data set look like.

    ``radius_mm``: range of the outer (oedema) radius, drawn uniformly per lesion. ``contrast``: scales every
    lesion's intensity difference from the healthy tissue it replaces (1 = the default contrasts, 0.5 = half as
    conspicuous, 0 = invisible). ``lesions``: range of the number of lesions per tumour subject (inclusive).
    """

    radius_mm: Tuple[float, float] = (15.0, 35.0)
    contrast: float = 1.0
    lesions: Tuple[int, int] = (1, 1)

    def validate(self) -> "LesionSettings":
        lo, hi = self.radius_mm
        if not 2.0 <= lo <= hi:
            raise ValueError(f"--lesion_radius_mm must satisfy 2 <= LOW <= HIGH (mm), got {self.radius_mm}")
        if not 0.0 <= self.contrast <= 2.0:
            raise ValueError(f"--lesion_contrast must be in [0, 2], got {self.contrast}")
        if not 1 <= self.lesions[0] <= self.lesions[1] <= 8:
            raise ValueError(f"--lesions_per_subject must satisfy 1 <= LOW <= HIGH <= 8, got {self.lesions}")
        return self


# Named data sets. "default" is the original generator (bit-identical); the others are harder or different, so the
# quickstart can be tuned on some and judged on the rest.
PRESETS: Dict[str, LesionSettings] = {
    "default": LesionSettings(),
    "small": LesionSettings(radius_mm=(8.0, 18.0)),
    "faint": LesionSettings(contrast=0.6),
    "multi": LesionSettings(radius_mm=(10.0, 22.0), lesions=(2, 3)),
    "small_faint": LesionSettings(radius_mm=(10.0, 20.0), contrast=0.75),
}


def lesion_settings(preset: str = "default", radius_mm: Optional[Sequence[float]] = None,
                    contrast: Optional[float] = None, lesions: Optional[Sequence[int]] = None) -> LesionSettings:
    """A preset with optional overrides (None keeps the preset's value)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    changes = {}
    if radius_mm is not None:
        changes["radius_mm"] = tuple(float(r) for r in radius_mm)
    if contrast is not None:
        changes["contrast"] = float(contrast)
    if lesions is not None:
        changes["lesions"] = tuple(int(n) for n in lesions)
    return dataclasses.replace(base, **changes).validate()


def subject_name(index: int) -> str:
    return f"BraTS2021_{index:05d}"


class MissingDependencyError(UserError, ImportError):
    """nilearn (the MNI152 templates) is not installed."""


@lru_cache(maxsize=1)
def load_templates() -> Tuple[torch.Tensor, np.ndarray]:
    """MNI152 templates as a [1, 4, X, Y, Z] float32 tensor of (t1, gm, wm, brain mask) and the brain centre (voxels)."""
    try:
        from nilearn import datasets
    except ImportError as exc:  # optional dependency
        raise MissingDependencyError(
            "The synthetic data set needs nilearn's MNI152 templates: pip install nilearn  (or pip install -e .[demo])"
        ) from exc

    def load(fn):
        try:
            return fn(resolution=1).get_fdata(dtype=np.float32)
        except TypeError:  # old nilearn without the resolution argument
            return fn().get_fdata(dtype=np.float32)

    t1 = load(datasets.load_mni152_template)
    gm = load(datasets.load_mni152_gm_template)
    wm = load(datasets.load_mni152_wm_template)
    mask = (t1 > 0.05).astype(np.float32)
    t1, gm, wm = t1 * mask, gm * mask, wm * mask
    idx = np.nonzero(mask)
    centre = np.array([(i.min() + i.max()) / 2.0 for i in idx], dtype=np.float64)
    vol = torch.from_numpy(np.stack([t1, gm, wm, mask])[None].copy())
    return vol, centre


def _smooth_field(rng: np.random.Generator, channels: int, coarse: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Random smooth field [1, channels, *shape] ~ N(0, 1) on a coarse grid, upsampled trilinearly."""
    coarse_field = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32))
    return F.interpolate(coarse_field, size=tuple(shape), mode="trilinear", align_corners=True)


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def warp_templates(rng: np.random.Generator, shape: Sequence[int]) -> Tuple[torch.Tensor, float]:
    """Sample (t1, gm, wm, mask) of one random subject on an output grid of `shape`; returns ([4, *shape], spacing mm)."""
    vol, centre = load_templates()
    spacing = BRATS_SHAPE[0] / shape[0]  # smaller test shapes cover the same field of view
    # Output voxel centres in mm, centred; the brain sits slightly low in BraTS volumes (less empty space below).
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0) * spacing for n in shape]
    px, py, pz = torch.meshgrid(*axes, indexing="ij")
    pts = torch.stack([px, py, pz], dim=-1)  # [X, Y, Z, 3] mm

    # Random affine: head size (brains are ~150 mm tall, the volume is 155 mm), small rotation, shift.
    scale = rng.uniform(0.90, 1.0) * np.exp(rng.normal(0, 0.03, size=3))
    rot = _rotation(np.deg2rad(rng.uniform(-6, 6, size=3)))
    shift = rng.uniform(-4, 4, size=3) + np.array([0.0, 0.0, 2.0])
    inv = np.linalg.inv(rot @ np.diag(scale))  # output mm -> template mm
    q = pts @ torch.from_numpy(inv.T.astype(np.float32)) - torch.from_numpy(shift.astype(np.float32))
    # Smooth non-linear warp, a few mm.
    disp = _smooth_field(rng, 3, (5, 5, 4), shape)[0].permute(1, 2, 3, 0) * float(rng.uniform(1.5, 3.5))
    q = q + disp
    # Template voxel index -> grid_sample's normalised coordinates (grid order is (W, H, D) = (z, y, x)).
    size = torch.tensor(vol.shape[2:], dtype=torch.float32)
    idx = q + torch.from_numpy(centre.astype(np.float32))
    norm = idx / (size - 1) * 2 - 1
    grid = norm.flip(-1)[None]
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return out, spacing


def _place_tumour(
    rng: np.random.Generator, tissue: torch.Tensor, spacing: float, radius_mm: Tuple[float, float] = (15.0, 35.0)
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft compartment weights [3, *shape] (necrotic, oedema, enhancing) and the BraTS label volume (uint8)."""
    t1, gm, wm, mask = tissue
    shape = mask.shape
    # Centre: deep-ish white/grey matter, away from the midline (mostly in one hemisphere).
    # Search on a ~4 mm subgrid: cheap, and good enough for picking a centre.
    step = max(1, int(round(4 / spacing)))
    sub = (slice(None, None, step),) * 3
    xs = (torch.arange(0, shape[0], step, dtype=torch.float32) - (shape[0] - 1) / 2.0) * spacing
    lateral = xs.abs()[:, None, None] > 15.0
    inside = ((wm + gm)[sub] > 0.7) & lateral
    # Keep >= ~12 mm from the brain's edge so most of the lesion lies in the brain.
    eroded = F.max_pool3d((mask[sub] < 0.5).float()[None, None], kernel_size=7, stride=1, padding=3)[0, 0] < 0.5
    cand = torch.nonzero(inside & eroded) * step
    if len(cand) == 0:
        cand = torch.nonzero(mask > 0.5)
    centre = cand[int(rng.integers(len(cand)))].numpy()

    radius = float(rng.uniform(*radius_mm))  # outer oedema radius in mm (= voxels at 240 scale)
    core_frac = float(rng.uniform(0.4, 0.65))
    necrotic_frac = float(rng.uniform(0.35, 0.7)) if rng.random() < 0.85 else 0.0
    half = int(np.ceil(radius * 1.6 / spacing)) + 2
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, np.array(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    bshape = [b.stop - b.start for b in box]
    grids = torch.meshgrid(*[(torch.arange(s.start, s.stop, dtype=torch.float32) - c) * spacing
                             for s, c in zip(box, centre)], indexing="ij")
    r = torch.sqrt(sum(g ** 2 for g in grids) + 1e-6)
    # Irregular outline: anisotropic stretch plus low-frequency radial noise.
    stretch = rng.uniform(0.8, 1.25, size=3)
    r_aniso = torch.sqrt(sum((g / float(s)) ** 2 for g, s in zip(grids, stretch)) + 1e-6)
    wobble = _smooth_field(rng, 2, (4, 4, 4), bshape)[0]
    d_outer = r_aniso / radius * (1 + 0.18 * wobble[0])
    d_core = r / (radius * core_frac) * (1 + 0.12 * wobble[1])

    in_brain = mask[box] > 0.5
    soft = lambda d, w=0.04: torch.sigmoid((1.0 - d) / w)  # noqa: E731  (soft indicator of d < 1)
    core = soft(d_core) * in_brain
    outer = soft(d_outer) * in_brain
    nec = soft(d_core / max(necrotic_frac, 1e-3)) * in_brain if necrotic_frac > 0 else torch.zeros_like(core)
    w_nec = nec
    w_enh = (core - nec).clamp(min=0)
    w_oed = (outer - core).clamp(min=0)

    weights = torch.zeros((3, *shape), dtype=torch.float32)
    weights[(slice(0, 1),) + box] = w_nec[None]
    weights[(slice(1, 2),) + box] = w_oed[None]
    weights[(slice(2, 3),) + box] = w_enh[None]

    seg = torch.zeros(shape, dtype=torch.uint8)
    sub = torch.zeros(bshape, dtype=torch.uint8)
    sub[(d_outer < 1) & in_brain] = SEG_OEDEMA
    sub[(d_core < 1) & in_brain] = SEG_ENHANCING
    if necrotic_frac > 0:
        sub[(d_core < necrotic_frac) & in_brain] = SEG_NECROTIC
    seg[box] = sub
    return weights, seg


def _place_tumours(
    rng: np.random.Generator, tissue: torch.Tensor, spacing: float, lesions: LesionSettings
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One or several lesions: compartment weights summed (at most 1 per voxel), labels merged innermost-first."""
    lo, hi = lesions.lesions
    count = lo if lo == hi else int(rng.integers(lo, hi + 1))  # no draw for a fixed count (keeps "default" exact)
    weights, seg = _place_tumour(rng, tissue, spacing, lesions.radius_mm)
    for _ in range(count - 1):
        w, s = _place_tumour(rng, tissue, spacing, lesions.radius_mm)
        weights = weights + w
        # BraTS labels of overlapping lesions: necrotic core (1) over enhancing rim (4) over oedema (2)
        rank = torch.tensor([0, 3, 1, 0, 2], dtype=torch.uint8)
        seg = torch.where(rank[s.long()] > rank[seg.long()], s, seg)
    total = weights.sum(0, keepdim=True)
    weights = weights / total.clamp(min=1.0)
    return weights, seg


def render_subject(
    seed: int, index: int, healthy: bool, shape: Sequence[int] = BRATS_SHAPE,
    lesions: LesionSettings = LesionSettings(),
) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One subject: ({modality: int16 volume}, seg uint8 volume, affine). Deterministic in (seed, index, lesions)."""
    rng = np.random.default_rng([int(seed), int(index)])
    tissue, spacing = warp_templates(rng, shape)
    t1_tpl, gm, wm, mask = tissue
    brain = mask > 0.5
    csf = (mask - gm - wm).clamp(min=0)
    model_t1 = 0.33 * csf + 0.65 * gm + 0.86 * wm  # what the tissue model predicts for the T1 template
    texture = t1_tpl - model_t1

    if healthy:
        weights = torch.zeros((3, *mask.shape))
        seg = torch.zeros(mask.shape, dtype=torch.uint8)
    else:
        weights, seg = _place_tumours(rng, tissue, spacing, lesions)
    w_tumour = weights.sum(0).clamp(max=1.0)
    heterogeneity = 1 + 0.08 * _smooth_field(rng, 1, (12, 12, 8), mask.shape)[0, 0]

    # Render only brain voxels (flattened): the background is exactly zero anyway, and this is ~4x cheaper.
    sel = torch.nonzero(brain.reshape(-1)).squeeze(1)
    flat = lambda v: v.reshape(-1).index_select(0, sel)  # noqa: E731
    csf_v, gm_v, wm_v, tex_v = flat(csf), flat(gm), flat(wm), flat(texture)
    w_v = [flat(w) for w in weights]
    wt_v, het_v = flat(w_tumour), flat(heterogeneity)
    n_vox = len(sel)

    images: Dict[str, np.ndarray] = {}
    for mod in MODALITIES:
        c = np.asarray(CONTRASTS[mod]) * rng.uniform(0.93, 1.07, size=6)
        healthy_img = c[0] * csf_v + c[1] * gm_v + c[2] * wm_v + TEXTURE_SIGN[mod] * tex_v
        lesion = (c[3] * w_v[0] + c[4] * w_v[1] + c[5] * w_v[2]) * het_v
        # contrast c scales the lesion's difference from the tissue it replaces: healthy + c·(lesion - healthy·w)
        c_les = lesions.contrast
        img = healthy_img * (1 - c_les * wt_v) + c_les * lesion
        bias = torch.exp(0.12 * flat(_smooth_field(rng, 1, (3, 3, 3), mask.shape)[0, 0]))
        img = img.clamp(min=0) * bias
        sigma = float(rng.uniform(0.01, 0.03))
        noise = torch.from_numpy(rng.standard_normal((2, n_vox), dtype=np.float32)) * sigma
        img = torch.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
        img = img * float(rng.uniform(400, 1500))  # scanner scale
        vol = torch.zeros(mask.numel(), dtype=torch.float32)
        vol.index_copy_(0, sel, img)
        images[mod] = np.round(vol.reshape(mask.shape).numpy()).clip(0, 32767).astype(np.int16)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return images, seg.numpy().astype(np.uint8), affine


def _write_subject(out_dir: Path, name: str, images: Dict[str, np.ndarray], seg: np.ndarray, affine: np.ndarray) -> None:
    """Write one subject atomically: everything goes to a hidden temp folder that is renamed into place."""
    with fileio.atomic_dir(out_dir / name) as tmp:
        for mod, vol in images.items():
            nib.save(nib.Nifti1Image(vol, affine), str(tmp / f"{name}_{mod}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(tmp / f"{name}_seg.nii.gz"))


def _make_one(out_dir: str, seed: int, index: int, healthy: bool, shape: Tuple[int, int, int], threads: int,
              lesions: LesionSettings = LesionSettings()) -> str:
    if threads > 0:
        torch.set_num_threads(threads)
    name = subject_name(index)
    images, seg, affine = render_subject(seed, index, healthy, shape, lesions)
    _write_subject(Path(out_dir), name, images, seg, affine)
    return name


def healthy_indices(num_subjects: int, healthy_fraction: float, seed: int) -> List[int]:
    """Which subjects are tumour-free: exactly round(fraction * N), chosen by the seed."""
    n_healthy = int(round(healthy_fraction * num_subjects))
    order = np.random.default_rng([int(seed), 2**31 - 1]).permutation(num_subjects)
    return sorted(int(i) for i in order[:n_healthy])


SETTINGS_FILE = ".synthetic.json"  # hidden: preprocessing ignores dot files in --source
GENERATOR_VERSION = 1  # bump when the rendering changes, so old folders are not extended with different subjects


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Record what determines the subjects; refuse to add subjects made with other settings to the folder."""

    def older_run() -> None:
        if any(out_dir.glob("BraTS2021_*")):
            print(f"warning: {out_dir} holds subjects but no {SETTINGS_FILE} (an older run): their settings cannot be "
                  "checked; recording the current ones", file=sys.stderr, flush=True)

    compared = {k: v for k, v in settings.items() if k != "num_subjects"}  # more subjects is a resume
    fileio.check_settings_record(
        out_dir / SETTINGS_FILE, compared, what=f"the synthetic data set in {out_dir}",
        labels={"generator_version": "generator version", "lesions": "lesions (--preset, --lesion_*)"},
        remedy="Use another --output folder, or the recorded settings (delete the folder to start over)",
        on_missing=older_run)
    fileio.write_settings_record(out_dir / SETTINGS_FILE, compared, {"num_subjects": settings.get("num_subjects")})


def make_synthetic_brats(
    output: str | os.PathLike,
    num_subjects: int = 24,
    healthy_fraction: float = 0.25,
    seed: int = 0,
    workers: int = 1,
    shape: Sequence[int] = BRATS_SHAPE,
    progress: bool = True,
    lesions: LesionSettings = LesionSettings(),
) -> List[str]:
    """Write `num_subjects` BraTS-2021-layout subjects under `output`; subjects already there are kept (resumable).

    The settings that determine the subjects (seed, shape, healthy fraction, lesion settings) are recorded in
    ``<output>/.synthetic.json``; a rerun with other settings is an error instead of a folder of mixed subjects.
    Returns the subject names (all of them, new and existing).
    """
    if num_subjects < 1:
        raise ValueError(f"--num_subjects must be >= 1, got {num_subjects}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"--healthy_fraction must be in [0, 1], got {healthy_fraction}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"--shape must be three sizes >= 8, got {shape}")
    out_dir = Path(output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise OSError(f"cannot write to output folder {out_dir}: {exc}") from exc
    lesions = lesions.validate()
    fileio.sweep_temp_files(out_dir)  # left by a killed run
    _check_settings(out_dir, {"generator_version": GENERATOR_VERSION, "seed": int(seed), "shape": list(shape),
                              "healthy_fraction": float(healthy_fraction), "num_subjects": int(num_subjects),
                              "lesions": {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in dataclasses.asdict(lesions).items()}})
    load_templates()  # fail early (and clearly) if nilearn is missing

    healthy = set(healthy_indices(num_subjects, healthy_fraction, seed))
    names = [subject_name(i) for i in range(num_subjects)]
    todo = [i for i in range(num_subjects) if not (out_dir / names[i]).is_dir()]
    if len(todo) < num_subjects:
        print(f"{num_subjects - len(todo)} subjects already in {out_dir}, skipping them", flush=True)
    bar = logger.progress_bar(len(todo), "synthetic subjects", enabled=progress)
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            _make_one(str(out_dir), seed, i, i in healthy, shape, 0, lesions)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with runtime.worker_pool(workers) as pool:  # workers end with this process
            futures = [pool.submit(_make_one, str(out_dir), seed, i, i in healthy, shape, threads, lesions)
                       for i in todo]
            for fut in as_completed(futures):
                fut.result()
                bar.update()
    bar.close()
    return names
