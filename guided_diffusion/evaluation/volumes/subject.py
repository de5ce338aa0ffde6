"""One subject of a whole-volume segmentation: prepare its slices as training data were, run the slice method, write
the map, the mask, the overlay and the record on the scan's own grid."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from guided_diffusion import fileio, logger
from guided_diffusion import metrics as M
from guided_diffusion.data import geometry as geo
from guided_diffusion.data import nifti
from guided_diffusion.data import preprocess as pp
from guided_diffusion.evaluation import fingerprint as fp
from guided_diffusion.evaluation.volumes.settings import SegmentSettings
from guided_diffusion.methods import base

FORMAT = "guided_diffusion volume segmentation"
FORMAT_VERSION = 2  # 2: scans reoriented before slicing (record "geometry"); the map is zero outside the brain
MAP_SUFFIX = "_anomaly_map.nii.gz"
MASK_SUFFIX = "_anomaly_mask.nii.gz"
RECORD_SUFFIX = "_segmentation.json"
OVERLAY_SUFFIX = "_overlay.png"

# ------------------------------------------------------------------------------------------------------------
# Running the slice method on one volume


@dataclass
class SliceResults:
    """The method's result on a volume's kept slices: ``anomaly_map`` float32 ``[N, 1, S, S]``, ``mask`` bool
    ``[N, 1, S, S]`` (post-processed, before any gating by the slice label), ``pred_label`` int64 ``[N]``."""

    anomaly_map: np.ndarray
    mask: np.ndarray
    pred_label: np.ndarray


def subject_seed(seed: int, subject: str, batch: int) -> int:
    """The noise seed of batch ``batch`` of a subject: the same whichever process or order runs it."""
    return int(hashlib.sha1(f"{seed}:{subject}:{batch}".encode()).hexdigest()[:15], 16)


def segment_slices(method: base.SliceMethod, x: torch.Tensor, hyper: dict, *, subject: str, seed: int = 0,
                   batch_size: int = 16, progress=None) -> SliceResults:
    """Run ``method.test_batch`` over the slices ``x`` ``[N, C, S, S]`` (in [-1, 1], on the method's device)."""
    maps, masks, labels = [], [], []
    for k, i in enumerate(range(0, x.shape[0], batch_size)):
        xb = x[i:i + batch_size]
        ctx = base.BatchContext.for_seed(subject_seed(seed, subject, k), progress=progress)
        out = method.test_batch(xb, hyper, ctx).check(xb.shape[0], xb.shape[2], xb.shape[3], method.name)
        maps.append(out.anomaly_map.detach().float().cpu().numpy())
        masks.append(out.mask.detach().cpu().numpy().astype(bool))
        labels.append(out.pred_label.detach().cpu().numpy().astype(np.int64))
    s = x.shape[-1]
    if not maps:
        return SliceResults(np.zeros((0, 1, s, s), np.float32), np.zeros((0, 1, s, s), bool), np.zeros(0, np.int64))
    return SliceResults(np.concatenate(maps), np.concatenate(masks), np.concatenate(labels))


def model_input(prepared: pp.PreparedSlices) -> torch.Tensor:
    """The prepared slices as the loaders give them to the model: per-slice, per-channel min-max to [-1, 1]."""
    from guided_diffusion.data.loaders import normalise_slice

    if prepared.x.shape[0] == 0:
        return torch.zeros((0, *prepared.x.shape[1:]), dtype=torch.float32)
    return torch.stack([normalise_slice(s) for s in prepared.x])


def _digests(paths: Sequence[Optional[str]], out_dir: Path) -> List[Optional[str]]:
    """Content digests of files (None for a missing one), remembered in the output folder between runs."""
    cache = fp.DigestCache(str(out_dir / fp.DIGESTS_FILE))
    digests = [cache.digest(p) if p and os.path.exists(p) else None for p in paths]
    cache.save()
    return digests

# ------------------------------------------------------------------------------------------------------------
# One subject


def _input_key(subject: pp.Subject, out_dir: Path) -> list:
    files = {**{m: str(p) if p else None for m, p in subject.images.items()},
             "seg": str(subject.mask) if subject.mask else None}
    names = sorted(files)
    return [[k, d] for k, d in zip(names, _digests([files[k] for k in names], out_dir))]


def output_paths(out_dir: Path, name: str) -> Dict[str, Path]:
    return {"anomaly_map": out_dir / f"{name}{MAP_SUFFIX}", "anomaly_mask": out_dir / f"{name}{MASK_SUFFIX}",
            "overlay": out_dir / f"{name}{OVERLAY_SUFFIX}", "record": out_dir / f"{name}{RECORD_SUFFIX}"}


def _damaged_output(path: Path, digest: Optional[str]) -> Optional[str]:
    """Why a finished output file cannot be reused (None: it can): missing, or not the bytes its record names. A
    record without digests (written by an older version) is checked by reading the file whole instead."""
    if not path.exists():
        return "missing"
    if digest is not None:
        return None if fp.file_digest(str(path)) == digest else "changed since it was written (digest differs)"
    if path.name.endswith((".nii", ".nii.gz")):
        try:
            np.asanyarray(nifti.load_reference(path).dataobj)  # gzip checks its CRC and length at the end
        except Exception as exc:
            return f"unreadable ({type(exc).__name__})"
    return None


def finished_record(out_dir: Path, subject: pp.Subject, run_key: str, overlay: bool = True,
                    warn=None) -> Optional[dict]:
    """The record of a subject finished by this run's settings on the same input files whose outputs are intact
    (their content digests, recorded when they were written, still match), else None. ``warn`` hears of a finished
    subject whose outputs were damaged afterwards (it is recomputed)."""
    paths = output_paths(out_dir, subject.name)
    try:
        record = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fp.json_digest([run_key, _input_key(subject, out_dir)]):
        return None
    digests = record.get("output_digests") or {}
    needed = ["anomaly_map", "anomaly_mask"] + (["overlay"] if overlay else [])
    for key in needed:
        problem = _damaged_output(paths[key], digests.get(key))
        if problem is not None:
            if warn is not None and problem != "missing":
                warn(f"WARNING: subject {subject.name}: its finished {paths[key]} is {problem}; computing the "
                     "subject again")
            return None
    return record


def overlay_slices(gt: Optional[np.ndarray], pred: np.ndarray, kept: range, n: int) -> List[int]:
    """``n`` z indices to show: spread over the lesion's extent (ground truth, else prediction), else the kept range."""
    if n <= 0 or len(kept) == 0:
        return []
    for vol in (gt, pred):
        if vol is not None and vol.any():
            zs = np.flatnonzero(vol.reshape(-1, vol.shape[-1]).any(0))
            break
    else:
        zs = np.arange(kept.start, kept.stop)
    picks = np.unique(zs[np.round(np.linspace(0, len(zs) - 1, min(n, len(zs)))).astype(int)])
    return [int(z) for z in picks]


def _write_overlay(path: Path, name: str, image: np.ndarray, gt: Optional[np.ndarray], amap: np.ndarray,
                   mask: np.ndarray, zs: Sequence[int], axcodes, unhealthy_z: set) -> None:
    from guided_diffusion.evaluation.visualize import save_panels

    pos = image[image > 0]
    hi = float(np.quantile(pos, 0.99)) if pos.size else 1.0
    images, gts, maps, masks, captions = [], [], [], [], []
    for z in zs:
        show = lambda v: nifti.display_slice(v[..., z], axcodes)  # noqa: E731
        images.append(np.clip(show(image) / max(hi, 1e-12), 0, 1) * 2 - 1)
        gts.append(show(gt) if gt is not None else np.zeros(images[-1].shape, bool))
        maps.append(show(amap))
        masks.append(show(mask).astype(bool))
        label = "unhealthy" if z in unhealthy_z else "healthy"
        gt_text = f"gt {int(gt[..., z].sum())} vox, " if gt is not None else "no ground truth, "
        captions.append(f"{name} z={z}: {gt_text}predicted {int(mask[..., z].sum())} vox, slice {label}")
    save_panels(str(path), images, gts, maps, masks, captions)


def segment_subject(subject: pp.Subject, method: base.SliceMethod, hyper: dict, s: SegmentSettings,
                    out_dir: Path, run_key: str, run_info: dict, bar=None) -> dict:
    """Prepare, segment and write one subject; returns its record (also written as ``<id>_segmentation.json``).

    Raises ``preprocess.SubjectError`` for bad input (naming the subject and file)."""
    clock = _Clock()
    volume, gt_labels = pp.load_subject(subject, require_mask=False)
    ref_path = next(iter(subject.images.values()))
    reference = nifti.load_reference(ref_path)
    if tuple(reference.shape[:3]) != tuple(volume.shape[1:]):
        raise pp.SubjectError(f"subject {subject.name}: {ref_path} has shape {reference.shape}, its data "
                              f"{volume.shape[1:]}")
    # Sliced in the canonical orientation as the training data were; results go back to the grid as stored.
    geometry = pp.subject_geometry(subject, s.orientation)
    training = run_info.get("training_geometry") or geo.DATASET_GEOMETRY[s.data.name]
    notes = pp.grid_warnings(subject) + geometry.warnings(subject.name, training)
    for note in notes:
        logger.warn(f"WARNING: {note}")
    foreground = volume.mean(0) > 0  # sign-invariant under preprocessing's positive scaling
    image = volume[s.panel_modality].copy() if s.volumes.overlay_slices else None
    prepared = pp.prepare_slices(volume, gt_labels, s.inference.image_size, s.volumes.first, s.volumes.last,
                                 subject.name, geometry)
    del volume
    device = run_info["device"]
    x = model_input(prepared).to(device)
    clock.lap("prepare")
    if bar is not None:
        bar.reset(total=-(-x.shape[0] // s.volumes.batch_size) * method.steps_per_batch("test"))
    res = segment_slices(method, x, hyper, subject=subject.name, seed=s.inference.seed, batch_size=s.volumes.batch_size,
                         progress=None if bar is None else bar.update)
    clock.lap("model")
    gate = (res.pred_label == 1)[:, None, None, None] if s.volumes.zero_healthy_slices else True
    amap = nifti.slices_to_volume(res.anomaly_map, prepared)
    raw_map = s.volumes.raw_map
    if not raw_map:  # the map outside the brain is the model's reconstruction of empty background: noise
        amap[~foreground] = 0.0
    mask = nifti.mask_to_volume(res.mask & gate, prepared)
    kept = prepared.original_z
    unhealthy_z = [int(z) for z, lab in zip(kept, res.pred_label) if lab == 1]
    voxel_ml = nifti.voxel_volume_ml(reference)
    gt = None if gt_labels is None else gt_labels > 0.5

    metrics = None
    if gt is not None:
        slice_gt = prepared.y > 0.5
        with warnings.catch_warnings():  # a subject without lesion has no unhealthy-setup metrics: null
            warnings.simplefilter("ignore")
            sl = M.evaluate_segmentation([{
                "label": slice_gt.reshape(len(kept), -1).any(1).astype(np.int64), "pred_label": res.pred_label,
                "gt": slice_gt, "pred_mask": res.mask, "anomaly_map": res.anomaly_map,
                "foreground": M.foreground_mask(x.cpu().numpy())}])
        zooms = np.asarray(reference.header.get_zooms()[:3], dtype=np.float64)
        spacing_mm = zooms * (voxel_ml * 1e3 / zooms.prod()) ** (1 / 3)  # in the header's units, as voxel_volume_ml
        metrics = {"volume": M.volume_metrics(mask, gt, amap, foreground, voxel_ml, spacing=spacing_mm),
                   "slice": {"mixed": sl["mixed"], "unhealthy": sl["unhealthy"], "accuracy": sl["accuracy"]}}

    paths = output_paths(out_dir, subject.name)
    what = f"{method.name} anomaly"
    nifti.save_like(paths["anomaly_map"], amap, reference, np.float32, f"{what} map")
    nifti.save_like(paths["anomaly_mask"], mask, reference, np.uint8, f"{what} mask")
    if s.volumes.overlay_slices:  # axial slices: the canonical frame the slices were cut in
        canonical = [None if v is None else prepared.to_canonical(v) for v in (image, gt, amap, mask)]
        zs = overlay_slices(canonical[1], canonical[3], kept, s.volumes.overlay_slices)
        if zs:
            _write_overlay(paths["overlay"], subject.name, *canonical, zs, tuple(geometry.canonical_axcodes),
                           set(unhealthy_z))
    clock.lap("write")
    written = {k: p for k, p in paths.items() if k != "record" and (k != "overlay" or p.exists())}
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "id": subject.name,
        "fingerprint": fp.json_digest([run_key, _input_key(subject, out_dir)]),
        "inputs": {**{m: str(p) for m, p in subject.images.items()},
                   "seg": str(subject.mask) if gt_labels is not None else None},
        "reference": str(ref_path),
        "outputs": {k: p.name for k, p in written.items()},
        "output_digests": {k: fp.file_digest(str(p)) for k, p in written.items()},  # checked before a resume
        "grid": {"shape": list(geometry.stored_shape),
                 "voxel_size": [float(z) for z in reference.header.get_zooms()[:3]],
                 "voxel_ml": voxel_ml, "axcodes": "".join(str(c) for c in nib_axcodes(reference))},
        "geometry": {**geometry.record(s.inference.image_size), "training": training.record()},
        "slices": {"kept": [kept.start, kept.stop], "n_kept": len(kept), "unhealthy": unhealthy_z,
                   "n_unhealthy": len(unhealthy_z), "axis": f"z of the canonical frame ({geometry.canonical_axcodes})"},
        "anomaly_map": "raw (upstream: the model's values everywhere)" if raw_map else "zero outside the brain",
        "lesion": {"voxels": int(mask.sum()), "ml": float(mask.sum()) * voxel_ml},
        "metrics": metrics,
        **{k: run_info[k] for k in ("method", "settings", "hyperparams", "hyperparams_source", "checkpoint",
                                    "preprocessing")},
        "warnings": notes,
        "seconds": clock.total(),
        "timing": clock.laps,
    }
    fileio.write_json(paths["record"], record)  # last: marks the subject as finished
    return record


class _Clock:
    """Wall and CPU seconds per phase (``laps``: ``{phase: [wall, cpu]}``; CPU time is robust on a shared machine)."""

    def __init__(self) -> None:
        self.start = self.last = (time.perf_counter(), time.process_time())
        self.laps: Dict[str, List[float]] = {}

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.laps[name] = [round(now[0] - self.last[0], 3), round(now[1] - self.last[1], 3)]
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start[0]


def nib_axcodes(img) -> tuple:
    import nibabel as nib

    return nib.aff2axcodes(img.affine)
