"""Whole-volume anomaly segmentation in the patient's own space: NIfTI in, NIfTI out, per-volume metrics.

``scripts/segment.py`` is the command line. For every subject (a BraTS 2021 / ATLAS subject folder, a data set
root holding such folders, or explicit per-modality files):

1. the volume is prepared exactly as training data were (``preprocess.load_subject`` + ``prepare_slices``: the
   per-channel 99th-percentile scaling, the brain slice range, the bilinear resize; then the loaders' per-slice
   min-max scaling to [-1, 1]);
2. its kept slices go through the slice method (``--method``, any of ``methods.base.METHODS``) in batches of
   ``--batch_size`` with the hyper-parameters of a validation run (``--hyperparams_file``, e.g. a translation
   run's ``hyperparams.json``) or of a validation pass this command runs itself (``--data_dir`` with ``npy_val/``);
3. the map and the mask are resized back to the scan's grid (``data/nifti.py``) and written as
   ``<id>_anomaly_map.nii.gz`` (float32) and ``<id>_anomaly_mask.nii.gz`` (uint8, slices classified healthy are
   empty unless ``--zero_healthy_slices False``) with the input's shape, affine, qform and sform; slices outside
   the kept range are zero;
4. ``<id>_segmentation.json`` records the slices classified unhealthy, the lesion volume in ml, the
   hyper-parameters, settings and checkpoint, and (with a ground-truth file) 3-D Dice / IoU / AUPRC next to the
   slice-level metrics of that subject; ``<id>_overlay.png`` shows a few axial slices.

At the end, ``subjects.csv`` (one row per subject) and ``summary.json`` (mean ± sd across subjects, failures).
Subjects are dealt to processes (rank r takes every world-th subject in name order; ``torchrun``); a subject whose
``_segmentation.json`` (written last, every file atomically) matches this run is skipped, so a killed run resumes
where it stopped. A subject with a missing modality, a corrupt file or mismatched shapes is reported by name
(``summary.json``, the log, the exit code) and the others go on.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.data import nifti
from guided_diffusion.data import preprocess as pp
from guided_diffusion.evaluation import fingerprint as fp
from guided_diffusion.evaluation import metrics as M
from guided_diffusion.evaluation import translation
from guided_diffusion.errors import entry_point
from guided_diffusion.methods import base

FORMAT = "guided_diffusion volume segmentation"
FORMAT_VERSION = 1
MAP_SUFFIX = "_anomaly_map.nii.gz"
MASK_SUFFIX = "_anomaly_mask.nii.gz"
RECORD_SUFFIX = "_segmentation.json"
OVERLAY_SUFFIX = "_overlay.png"
RUN_FILE = "segment_run.json"
CSV_FILE = "subjects.csv"
SUMMARY_FILE = "summary.json"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# ------------------------------------------------------------------------------------------------------------
# Flags


def segment_defaults() -> dict:
    """This command's own flags (the model, method and validation flags are translation's and the methods')."""
    return dict(
        output="",
        id="",
        subjects_csv="",
        method="anofpdm",
        mod="all",
        first=0,
        last=0,
        zero_healthy_slices=True,
        overlay_slices=4,
    )


def method_flags() -> dict:
    """Flags of every registered method beyond translation's (``<name>_flags()`` of each method's module)."""
    import importlib

    from guided_diffusion.methods.reconstruction import ReconstructionMethod, reconstruction_flags

    flags: dict = {}
    for name in base.METHODS:
        cls = base.method_class(name)
        module = importlib.import_module(cls.__module__)
        flags.update(getattr(module, f"{name}_flags", dict)())
        if issubclass(cls, ReconstructionMethod):
            flags.update(reconstruction_flags())
    return flags


def create_argparser() -> argparse.ArgumentParser:
    from guided_diffusion.script_util import add_dict_to_argparser

    parser = translation.create_argparser(__doc__)
    parser.set_defaults(batch_size=16)  # here: slices per forward, per process
    known = {a.dest for a in parser._actions}
    add_dict_to_argparser(parser, {k: v for k, v in segment_defaults().items() if k not in known})
    add_dict_to_argparser(parser, {k: v for k, v in method_flags().items() if k not in known})
    parser.add_argument("--input", nargs="+", default=[],
                        help="subject folders (BraTS <P>/<P>_flair.nii.gz ..., ATLAS <P>/<P>_T1w.nii.gz or a BIDS "
                             "sub-* folder) or data set roots holding them")
    parser.add_argument("--files", nargs="+", default=[], metavar="KEY=PATH",
                        help="one subject as explicit files: flair=F t1=F t1ce=F t2=F [seg=F] (ATLAS: t1=F [seg=F]); "
                             "its name is --id")
    return parser


def channel_names(args: argparse.Namespace) -> Tuple[str, ...]:
    """The modalities the model takes, in channel order, as preprocessing stacks them."""
    if args.name == "atlas":
        return ("t1",)
    return pp.MODALITIES if args.mod == "all" else (args.mod,)


def check_args(args: argparse.Namespace, explicit: Optional[set] = None) -> None:
    """Validate the flags in place; a ValueError names the flag.

    The model flags come from ``--model_dir``'s config.json when it has one (``explicit``: the flags given on the
    command line; one that contradicts the record is a ``fileio.RunConfigError``), else from the command line
    (upstream checkpoint folders)."""
    if args.name not in pp.DATASETS:
        raise ValueError(f"--name must be one of {', '.join(pp.DATASETS)}, got {args.name!r}")
    if args.mod not in ("all",) + pp.MODALITIES:
        raise ValueError(f"--mod must be one of all, {', '.join(pp.MODALITIES)}; got {args.mod!r}")
    if args.name == "atlas" and args.mod not in ("all", "t1"):
        raise ValueError(f"ATLAS has only T1w images: --mod must be t1 (or all), got {args.mod!r}")
    if not args.output:
        raise ValueError("--output is required: the folder the NIfTI results, JSON and pictures go to")
    if not (args.input or args.files or args.subjects_csv):
        raise ValueError("no subjects: pass --input FOLDER..., --files KEY=PATH... or --subjects_csv FILE")
    if args.files and not args.id:
        raise ValueError("--files needs --id NAME (the subject's name, used for the output file names)")
    if args.id and not _SAFE_ID.match(args.id):
        raise ValueError(f"--id {args.id!r}: use letters, digits and . _ + - only (it names the output files)")
    if not args.model_dir or not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir!r} is not a folder holding the checkpoints")
    base.method_class(args.method)  # a ValueError listing the known methods
    from guided_diffusion.script_util import (UNET_VERSIONS, apply_run_config, args_to_dict, check_model_flags,
                                              model_and_diffusion_defaults)

    args.config_recorded = apply_run_config(args, args.model_dir, explicit) is not None
    check_model_flags(args_to_dict(args, model_and_diffusion_defaults().keys()))

    if args.unet_ver not in UNET_VERSIONS:
        raise ValueError(f"unknown --unet_ver {args.unet_ver!r}; valid: {', '.join(UNET_VERSIONS)}")
    if args.unet_ver not in ("v1", "v2") and not args.use_hae:
        raise ValueError(f"--unet_ver {args.unet_ver} needs --use_hae True (as upstream's configs pass it)")
    n = len(channel_names(args))
    if args.in_channels != n:
        raise ValueError(f"the model takes --in_channels {args.in_channels} channels but --name {args.name} "
                         f"--mod {args.mod} gives {n} ({', '.join(channel_names(args))}): pass the --mod the model "
                         "was trained on")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size (slices per forward) must be >= 1, got {args.batch_size}")
    if args.first < 0 or args.last < 0:
        raise ValueError(f"--first/--last must be >= 0, got {args.first}/{args.last}")
    if args.overlay_slices < 0:
        raise ValueError(f"--overlay_slices must be >= 0, got {args.overlay_slices}")
    if args.hyperparams_file and not os.path.isfile(args.hyperparams_file):
        raise ValueError(f"--hyperparams_file {args.hyperparams_file!r} does not exist")
    if not args.hyperparams_file and args.num_batches_val != 0:
        if not args.data_dir or not os.path.isdir(os.path.join(args.data_dir, "npy_val")):
            raise ValueError("the hyper-parameters come from --hyperparams_file (a translation run's "
                             "hyperparams.json) or from a validation pass on --data_dir (a preprocessed folder with "
                             f"npy_val/); got --data_dir {args.data_dir!r}")
    if args.use_fp16 and args.precision == "fp32":
        args.precision = "fp16"
    args.use_fp16 = False
    runtime.check_precision(args.precision)
    if args.panel_modality == -1:
        args.panel_modality = args.modality[0]
    if not 0 <= args.panel_modality < args.in_channels:
        raise ValueError(f"--panel_modality {args.panel_modality} out of range for --in_channels {args.in_channels}")


# ------------------------------------------------------------------------------------------------------------
# Subjects


def _is_subject_folder(folder: Path) -> bool:
    if folder.name.startswith("sub-"):
        return True
    return any(p.is_file() and p.name.endswith((".nii", ".nii.gz")) for p in folder.iterdir())


def _subject_from_files(name: str, entries: Dict[str, str], mods: Sequence[str], where: str,
                        base_dir: Optional[Path] = None) -> pp.Subject:
    unknown = sorted(set(entries) - set(mods) - {"seg"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(mods)} and optionally seg")

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path

    images = {m: resolve(entries[m]) if entries.get(m) else None for m in mods}  # a missing one fails by name
    seg = resolve(entries["seg"]) if entries.get("seg") else None
    problem = None
    absent = [m for m in mods if images[m] is None]
    if absent:
        problem = f"subject {name}: no {', '.join(absent)} file given ({where})"
    return pp.Subject(name, images, seg, problem)


def collect_subjects(args: argparse.Namespace, warn=logger.warn) -> List[pp.Subject]:
    """Every subject of ``--input``, ``--files`` and ``--subjects_csv``, sorted by name (names must be unique)."""
    mods = channel_names(args)
    mod = "t1" if args.name == "atlas" else args.mod
    found: List[Tuple[pp.Subject, str]] = []
    for entry in args.input:
        folder = Path(entry)
        if not folder.is_dir():
            raise ValueError(f"--input {entry}: not a folder")
        sink: List[str] = []
        if _is_subject_folder(folder):
            subjects = [pp.subject_from_folder(folder, args.name, mod, sink, require_mask=False)]
        else:
            subjects = pp.discover_subjects(folder, args.name, mod, sink, require_mask=False)
        found += [(s, f"--input {entry}") for s in subjects]
    if args.files:
        entries = {}
        for item in args.files:
            key, sep, path = item.partition("=")
            if not sep or not path:
                raise ValueError(f"--files {item!r}: expected KEY=PATH, e.g. flair=scan_flair.nii.gz")
            entries[key.strip().lower()] = path
        found.append((_subject_from_files(args.id, entries, mods, "--files"), "--files"))
    if args.subjects_csv:
        csv_path = Path(args.subjects_csv)
        try:
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise ValueError(f"--subjects_csv {csv_path}: {e}") from None
        for i, row in enumerate(rows, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            name = row.pop("id", "")
            where = f"--subjects_csv {csv_path} line {i}"
            if not _SAFE_ID.match(name):
                raise ValueError(f"{where}: id {name!r} must be letters, digits and . _ + - (it names output files)")
            found.append((_subject_from_files(name, row, mods, where, csv_path.parent), where))
    by_name: Dict[str, str] = {}
    for subject, where in found:
        if subject.name in by_name:
            raise ValueError(f"subject {subject.name} is given twice ({by_name[subject.name]} and {where}); "
                             "output files are named by subject, so names must be unique")
        by_name[subject.name] = where
    return sorted((s for s, _ in found), key=lambda s: s.name)


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


# ------------------------------------------------------------------------------------------------------------
# Hyper-parameters


VALIDATION_DIR = "validation"  # the driver's validation batches and hyperparams.json (reused on a rerun)


def resolve_hyperparams(method: base.SliceMethod, args: argparse.Namespace, out_dir: Path) -> Tuple[dict, str]:
    """``(hyper-parameters, where they come from)``: ``--hyperparams_file``, or the method's recorded values with
    ``--num_batches_val 0``, or translation's validation pass on ``--data_dir`` (the same code, slices, batches and
    noise as a translation run with the same flags; its content-keyed batch files in ``<output>/validation/`` are
    reused on a rerun)."""
    driver = translation.Translation(args, method, log_dir=str(out_dir / VALIDATION_DIR))
    if args.hyperparams_file:
        return driver.read_hyperparams(), f"file {os.path.abspath(args.hyperparams_file)}"
    if args.num_batches_val == 0:
        return driver.read_hyperparams(), "recorded values (--num_batches_val 0)"
    return driver.validation(), f"validation pass on {args.data_dir}"


def _digests(paths: Sequence[Optional[str]], out_dir: Path) -> List[Optional[str]]:
    """Content digests of files (None for a missing one), remembered in the output folder between runs."""
    cache = fp.DigestCache(str(out_dir / translation.DIGESTS_FILE))
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


def finished_record(out_dir: Path, subject: pp.Subject, run_key: str, overlay: bool = True) -> Optional[dict]:
    """The record of a subject finished by this run's settings on the same input files, else None."""
    paths = output_paths(out_dir, subject.name)
    try:
        record = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fp.json_digest([run_key, _input_key(subject, out_dir)]):
        return None
    needed = ["anomaly_map", "anomaly_mask"] + (["overlay"] if overlay else [])
    return record if all(paths[k].exists() for k in needed) else None


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


def segment_subject(subject: pp.Subject, method: base.SliceMethod, hyper: dict, args: argparse.Namespace,
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
    notes = _grid_warnings(subject, reference)
    foreground = volume.mean(0) > 0  # sign-invariant under preprocessing's positive scaling
    image = volume[args.panel_modality].copy() if args.overlay_slices else None
    prepared = pp.prepare_slices(volume, gt_labels, args.image_size, args.first, args.last, subject.name)
    del volume
    device = run_info["device"]
    x = model_input(prepared).to(device)
    clock.lap("prepare")
    if bar is not None:
        bar.reset(total=-(-x.shape[0] // args.batch_size) * method.steps_per_batch("test"))
    res = segment_slices(method, x, hyper, subject=subject.name, seed=args.seed, batch_size=args.batch_size,
                         progress=None if bar is None else bar.update)
    clock.lap("model")
    gate = (res.pred_label == 1)[:, None, None, None] if args.zero_healthy_slices else True
    amap = nifti.slices_to_volume(res.anomaly_map, prepared)
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
        metrics = {"volume": M.volume_metrics(mask, gt, amap, foreground, voxel_ml),
                   "slice": {"mixed": sl["mixed"], "unhealthy": sl["unhealthy"], "accuracy": sl["accuracy"]}}

    paths = output_paths(out_dir, subject.name)
    what = f"{method.name} anomaly"
    nifti.save_like(paths["anomaly_map"], amap, reference, np.float32, f"{what} map")
    nifti.save_like(paths["anomaly_mask"], mask, reference, np.uint8, f"{what} mask")
    if args.overlay_slices:
        import nibabel as nib

        zs = overlay_slices(gt, mask, kept, args.overlay_slices)
        if zs:
            _write_overlay(paths["overlay"], subject.name, image, gt, amap, mask, zs,
                           nib.aff2axcodes(reference.affine), set(unhealthy_z))
    clock.lap("write")
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "id": subject.name,
        "fingerprint": fp.json_digest([run_key, _input_key(subject, out_dir)]),
        "inputs": {**{m: str(p) for m, p in subject.images.items()},
                   "seg": str(subject.mask) if gt_labels is not None else None},
        "reference": str(ref_path),
        "outputs": {k: p.name for k, p in paths.items() if k != "record" and (k != "overlay" or p.exists())},
        "grid": {"shape": list(prepared.shape), "voxel_size": [float(z) for z in reference.header.get_zooms()[:3]],
                 "voxel_ml": voxel_ml, "axcodes": "".join(str(c) for c in nib_axcodes(reference))},
        "slices": {"kept": [kept.start, kept.stop], "n_kept": len(kept), "unhealthy": unhealthy_z,
                   "n_unhealthy": len(unhealthy_z)},
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


def _grid_warnings(subject: pp.Subject, reference) -> List[str]:
    """Modalities or mask on another grid than the reference (same shape, different affine): segmentation still
    runs voxel by voxel as preprocessing does, but the inputs were probably not co-registered."""
    notes = []
    files = [*subject.images.values()] + ([subject.mask] if subject.mask and Path(subject.mask).exists() else [])
    for path in files[1:]:
        other = nifti.load_reference(path)
        if not np.allclose(other.affine, reference.affine, atol=1e-3):
            notes.append(f"subject {subject.name}: {Path(path).name} has another affine than {Path(files[0]).name} "
                         "(not co-registered?); results are on the grid of the latter")
    return notes


# ------------------------------------------------------------------------------------------------------------
# Per-volume metrics of a translation run's test split (slice space)


def _patient_of(slice_file: str) -> str:
    folder = str(slice_file).split("/")[0]
    return folder[len("patient_"):] if folder.startswith("patient_") else folder


class _ByPatient:
    """Result batches with each slice's patient as ``volume`` (re-iterable, as the batches it wraps)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for b in self.batches:
            yield {**b, "volume": np.array([_patient_of(f) for f in b["slice_file"]])}


VOLUME_CSV_COLUMNS = ["patient", "n_slices", "gt_voxels", "pred_voxels", "dice", "iou", "auprc", "precision", "recall"]


def test_split_volumes(batches, paths: Sequence[str], data_dir: str, csv_path: str) -> Optional[dict]:
    """Per-volume metrics of the test patients whose every slice the translation run evaluated (``--num_batches
    -1``), in slice space: the patient's kept slices at ``image_size``², stacked (``metrics.per_volume_metrics``).

    ``batches``: the run's result batches with ``slice_file`` (``patient_<P>/slice_<z>.npz``); ``paths``: its batch
    files. Writes ``csv_path`` (one row per complete patient) and returns the summary (mean ± sd over patients with a
    lesion and over all), or None when the batch files do not name their slices (written by an older version).
    """
    from guided_diffusion.data.loaders import slice_paths

    seen: Dict[str, int] = {}
    for p in paths:
        with np.load(p) as z:
            if "slice_file" not in z.files:
                return None
            for f in z["slice_file"]:
                seen[_patient_of(f)] = seen.get(_patient_of(f), 0) + 1
    root = Path(data_dir) / "npy_test"
    complete = sorted(v for v, n in seen.items() if n == len(slice_paths(root / f"patient_{v}")))
    summary: Dict[str, Any] = {"space": "preprocessed slices (kept range, image_size^2)", "n_volumes": len(complete),
                               "n_incomplete": len(seen) - len(complete)}
    if not complete:
        summary["note"] = "no test patient had every slice evaluated (--num_batches -1 evaluates the whole split)"
        return summary
    per = M.per_volume_metrics(_ByPatient(batches), volumes=complete)
    rows = [{"patient": v, **per[v]} for v in complete]
    fileio.write_csv(csv_path, VOLUME_CSV_COLUMNS, rows)
    lesion = [r for r in rows if r["gt_voxels"] > 0]
    for group, rs in (("with_lesion", lesion), ("all", rows)):
        summary[group] = {k: M.mean_sd(r[k] for r in rs) for k in ("dice", "iou", "auprc")}
    summary["csv"] = os.path.basename(csv_path)
    return summary


# ------------------------------------------------------------------------------------------------------------
# The run


CSV_COLUMNS = ["id", "status", "n_slices", "n_unhealthy_slices", "lesion_ml", "gt_ml", "dice", "iou", "auprc",
               "slice_dice_mixed", "slice_iou_mixed", "slice_auprc_mixed", "slice_dice_unhealthy",
               "slice_iou_unhealthy", "slice_auprc_unhealthy", "slice_accuracy", "seconds", "message"]


def _csv_row(record: dict) -> dict:
    row = {"id": record["id"], "status": "done", "n_slices": record["slices"]["n_kept"],
           "n_unhealthy_slices": record["slices"]["n_unhealthy"], "lesion_ml": record["lesion"]["ml"],
           "seconds": record.get("seconds")}
    m = record.get("metrics")
    if m:
        v, s = m["volume"], m["slice"]
        row.update(gt_ml=v["gt_ml"], dice=v["dice"], iou=v["iou"], auprc=v["auprc"], slice_accuracy=s["accuracy"])
        for setup in ("mixed", "unhealthy"):
            for k in ("dice", "iou", "auprc"):
                row[f"slice_{k}_{setup}"] = s[setup][k]
    return row


def summarize(records: Sequence[dict], failures: Sequence[dict]) -> dict:
    """Mean ± sd across subjects of the per-volume and per-subject slice-level metrics, and the slice-level Dice /
    IoU over all slices of all subjects (what the translation run would report on them)."""
    with_gt = [r for r in records if r.get("metrics")]
    lesion = [r for r in with_gt if r["metrics"]["volume"]["gt_voxels"] > 0]
    out: Dict[str, Any] = {"subjects": len(records) + len(failures), "done": len(records), "failed": list(failures),
                           "with_ground_truth": len(with_gt), "with_lesion": len(lesion),
                           "lesion_ml": M.mean_sd(r["lesion"]["ml"] for r in records)}
    for group, rs in (("volume_with_lesion", lesion), ("volume_all", with_gt)):
        out[group] = {k: M.mean_sd(r["metrics"]["volume"][k] for r in rs)
                      for k in ("dice", "iou", "auprc", "precision", "recall", "pred_ml", "gt_ml")}
    out["slice_per_subject"] = {f"{k}_{setup}": M.mean_sd(r["metrics"]["slice"][setup][k] for r in with_gt)
                                for setup in ("mixed", "unhealthy") for k in ("dice", "iou", "auprc")}
    pooled = {}
    for setup in ("mixed", "unhealthy"):
        n = [r["metrics"]["slice"][setup]["n_slices"] for r in with_gt]
        pooled[setup] = {"n_slices": int(sum(n))}
        for k in ("dice", "iou"):
            vals = [(r["metrics"]["slice"][setup][k], w) for r, w in zip(with_gt, n) if w > 0]
            total = sum(w for _, w in vals)
            pooled[setup][k] = float(sum(v * w for v, w in vals) / total) if total else None
    out["slice_all_slices"] = pooled
    return out


def _fmt_ms(stat: dict, pct: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    scale = 100 if pct else 1
    sd = "" if stat["sd"] is None else f" ± {scale * stat['sd']:.1f}"
    return f"{scale * stat['mean']:.1f}{sd} (n={stat['n']})"


def format_summary(summary: dict) -> str:
    lines = [f"{summary['done']} of {summary['subjects']} subjects segmented, {len(summary['failed'])} failed; "
             f"lesion volume {_fmt_ms(summary['lesion_ml'], pct=False)} ml"]
    if summary["with_ground_truth"]:
        v, s = summary["volume_with_lesion"], summary["slice_per_subject"]
        lines.append(f"per volume (subjects with a lesion), %: Dice {_fmt_ms(v['dice'])}, IoU {_fmt_ms(v['iou'])}, "
                     f"AUPRC {_fmt_ms(v['auprc'])}")
        lines.append(f"per slice, mean over subjects, %: Dice mixed {_fmt_ms(s['dice_mixed'])}, unhealthy "
                     f"{_fmt_ms(s['dice_unhealthy'])}; AUPRC unhealthy {_fmt_ms(s['auprc_unhealthy'])}")
    for f in summary["failed"]:
        lines.append(f"FAILED {f['id']}: {f['message']}")
    return "\n".join(lines)


def run_settings(method: base.SliceMethod, args: argparse.Namespace, hyper: dict, out_dir: Path) -> dict:
    """Everything that determines a subject's outputs besides its input files."""
    return {
        "format_version": FORMAT_VERSION, "method": args.method, "settings": method.settings(),
        "checkpoints": _digests(method.checkpoints(), out_dir), "hyperparams": hyper,
        "preprocessing": {"name": args.name, "mod": args.mod, "first": args.first, "last": args.last,
                          "image_size": args.image_size},
        "batch_size": args.batch_size, "seed": args.seed, "zero_healthy_slices": args.zero_healthy_slices,
        "overlay": [args.overlay_slices, args.panel_modality],
    }


def _check_run_file(out_dir: Path, settings: dict, resume: bool) -> Optional[str]:
    """Record this run's settings in ``segment_run.json``; the error message if the folder holds another run's."""
    path = out_dir / RUN_FILE
    now = json.loads(json.dumps(settings, default=str))
    if resume and path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old != now:
            diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            return (f"--output {out_dir} holds results of a run with other settings (differing: {', '.join(diff)}; "
                    f"see {path}). Use another --output, or --resume False to recompute every subject there")
    fileio.write_json(path, settings)
    return None


def run(args: argparse.Namespace, subjects: Optional[List[pp.Subject]] = None) -> dict:
    """Segment every subject of ``args`` (see the module docstring); returns the summary on rank 0 and
    ``{"statuses": [...]}`` (this process's subjects) on the others."""
    from tqdm.auto import tqdm

    t0 = time.time()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = dist_util.dev()
    out_dir = Path(args.output)
    subjects = collect_subjects(args) if subjects is None else subjects
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        fileio.sweep_temp_files(out_dir, warn=logger.warn)  # partial files of a killed run
    dist_util.barrier()
    method = base.build_method(args.method, args, device)
    hyper, source = resolve_hyperparams(method, args, out_dir)
    logger.log(f"{args.method}: {method.describe(hyper)}")
    settings = run_settings(method, args, hyper, out_dir)
    run_key = fp.json_digest(settings)
    problem = _check_run_file(out_dir, settings, args.resume) if rank == 0 else None
    problem = dist_util.broadcast_object(problem)  # every rank stops, not only rank 0
    if problem:
        raise ValueError(problem)
    checkpoint = (method.checkpoints() or [None])[0]
    run_info = {"device": device, "method": args.method, "settings": method.settings(), "hyperparams": hyper,
                "hyperparams_source": source, "checkpoint": checkpoint,
                "preprocessing": settings["preprocessing"]}
    logger.log(f"{len(subjects)} subject(s); {world} process(es); checkpoint {checkpoint}; output {out_dir}")

    mine = subjects[rank::world]
    show = args.progress and rank == 0
    outer = tqdm(total=len(mine), desc=f"subjects (rank 0 of {world})" if world > 1 else "subjects",
                 disable=not show, dynamic_ncols=True)
    inner = tqdm(total=0, desc="steps", leave=False, disable=not show, dynamic_ncols=True)
    statuses = []
    for subject in mine:
        done = finished_record(out_dir, subject, run_key, overlay=args.overlay_slices > 0) if args.resume else None
        if done is not None:
            statuses.append({"id": subject.name, "status": "skipped"})
            outer.update(1)
            continue
        outer.set_postfix_str(subject.name)
        try:
            record = segment_subject(subject, method, hyper, args, out_dir, run_key, run_info, bar=inner)
            statuses.append({"id": subject.name, "status": "done"})
            logger.log(f"{subject.name}: {record['slices']['n_unhealthy']} of {record['slices']['n_kept']} slices "
                       f"unhealthy, lesion {record['lesion']['ml']:.2f} ml ({record['seconds']:.1f} s)")
        except pp.SubjectError as e:
            statuses.append({"id": subject.name, "status": "failed", "message": str(e)})
            logger.error(f"ERROR: {e}")
        except fileio.DiskFullError:
            raise  # every further subject would fail the same way; finished ones are kept
        except Exception as e:  # an unexpected failure of one subject must not take the others down
            msg = f"subject {subject.name}: {type(e).__name__}: {e}"
            statuses.append({"id": subject.name, "status": "failed", "message": msg})
            logger.error(f"ERROR: {msg}")
        outer.update(1)
    inner.close()
    outer.close()

    gathered = [s for part in dist_util.gather_objects(statuses) for s in part]
    if rank != 0:
        return {"statuses": statuses}
    failures = [{"id": s["id"], "message": s["message"]} for s in gathered if s["status"] == "failed"]
    failed = {f["id"] for f in failures}
    records = []
    for subject in subjects:
        if subject.name in failed:
            continue
        rec = finished_record(out_dir, subject, run_key, overlay=args.overlay_slices > 0)
        if rec is None:  # another rank could not write it: the folder must be shared by all ranks
            failures.append({"id": subject.name, "message": f"subject {subject.name}: no finished record in "
                                                           f"{out_dir} (is the output folder shared by all ranks?)"})
            continue
        records.append(rec)
    rows = [_csv_row(r) for r in records] + [{"id": f["id"], "status": "failed", "message": f["message"]}
                                             for f in failures]
    rows.sort(key=lambda r: r["id"])
    fileio.write_csv(str(out_dir / CSV_FILE), CSV_COLUMNS, rows)
    summary = summarize(records, failures)
    summary.update(method=args.method, settings=method.settings(), hyperparams=hyper, hyperparams_source=source,
                   checkpoint=checkpoint, computed=sum(s["status"] == "done" for s in gathered),
                   skipped=sum(s["status"] == "skipped" for s in gathered), seconds=time.time() - t0)
    fileio.write_json(out_dir / SUMMARY_FILE, summary)
    logger.log(format_summary(summary))
    logger.log(f"results: {out_dir} ({CSV_FILE}, {SUMMARY_FILE}, <id>{MAP_SUFFIX}, <id>{MASK_SUFFIX}, "
               f"<id>{RECORD_SUFFIX}, <id>{OVERLAY_SUFFIX})")
    return summary


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; the exit code is 0 when every subject was segmented, 1 when some failed, 2 for a
    user error (one message, ``errors.entry_point``)."""
    from guided_diffusion.script_util import explicit_flags

    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    dist_util.setup_dist()
    try:
        try:
            check_args(args, explicit)
            subjects = collect_subjects(args)  # bad --input / --files / --subjects_csv: before any model is loaded
        except fileio.RunConfigError as e:  # not a usage problem: no usage dump
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        except (ValueError, OSError) as e:
            parser.error(str(e))
        rank = dist_util.get_rank()
        try:
            logger.configure(dir=args.output, format_strs=["stdout", "log"] if rank == 0 else ["log"])
        except OSError as e:
            parser.error(f"--output {args.output} cannot be written: {e}")
        runtime.configure_threads()
        logger.log(f"args: {vars(args)}")
        logger.log(runtime.thread_summary())
        runtime.seed_everything(args.seed)
        summary = run(args, subjects)
        return 1 if summary.get("failed") or any(s.get("status") == "failed" for s in summary.get("statuses", [])) \
            else 0
    finally:
        dist_util.cleanup_dist()
