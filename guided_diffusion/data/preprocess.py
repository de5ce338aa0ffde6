"""Raw NIfTI volumes (BraTS 2021, ATLAS v2.0) -> the upstream AnoFPDM on-disk slice format.

Output (kept identical to upstream so existing preprocessed data keeps working)::

    <root>/data_splits/{train,val,test}/scans.csv          subject names, '\\n'-joined
    <root>/npy_{train,val,test}/patient_<P>/slice_<z>.npz  x: float64 [1,C,S,S], y: float32 [1,1,S,S]

with ``<root>`` = ``<source.parent>/preprocessed_data_{mod}_{first}{last}_{image_size}`` unless ``output`` is given.
Per subject, as upstream: load with nibabel, stack channels [flair, t1, t1ce, t2] (or the one chosen), optionally
drop the first/last slices, binarise the label at 0.5, divide each channel by the 99th percentile of its voxels > 0
(no clipping), keep the contiguous z range whose channel-mean slice sum exceeds 0.5, and bilinearly resize every
kept slice (image and binary mask, so the saved mask is soft) to ``image_size``.

Beyond upstream, before all that every scan is brought into one canonical orientation (``orientation``, recorded in
``preprocess_settings.json``; see ``geometry.py``): slices are always cut along the inferior-superior axis. The default
is the orientation each data set's standard release is stored in (BraTS LPS, ATLAS RAS), so standard data give the
same slices as upstream; ``orientation="stored"`` is upstream's slicing of the array as stored. What was done to each
subject (stored shape, voxel size and axis codes, the transform, the resize) is in ``preprocess_summary.json``.

Beyond upstream: stray entries and broken subjects are reported (naming the subject and file) and skipped without
losing the others; each subject is written to a hidden temp folder and renamed into place (``fileio.atomic_dir``:
a killed run leaves no half-written subject, and its leftovers are removed at the next start); finished subjects
are skipped on a rerun; a full disk stops the run naming the subject; subjects run in parallel worker processes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from guided_diffusion import fileio, logger, runtime
from guided_diffusion.data import geometry as geo
from guided_diffusion.data.loaders import MODALITIES, SPLITS, SUMMARY_FILE, read_slice, read_slice_shape
from guided_diffusion.errors import SettingsMismatchError, UserError
from guided_diffusion.data.raw import (  # noqa: F401  (the preprocessing API in one place)
    DATASETS,
    Subject,
    SubjectError,
    _warn,
    discover_subjects,
    grid_warnings,
    load_subject,
    load_volume,
    subject_from_folder,
    subject_geometry,
    subject_has_lesion,
)
from guided_diffusion.data.slices import (  # noqa: F401
    PreparedSlices,
    brain_slice_range,
    normalise_percentile,
    prepare_slices,
    resize_slices,
    trim_slices,
)
from guided_diffusion.data.splits import SPLIT_FRACTIONS, SPLIT_RECORD, SPLIT_SEED, make_splits, seeded_split  # noqa: F401

SETTINGS_FILE = "preprocess_settings.json"  # what determined the output (checked on every rerun into it)
FORMAT_VERSION = 1  # of the slice files; bump when what they hold changes


@dataclass
class SubjectResult:
    name: str
    split: str
    status: str  # "done", "skipped" (already there) or "failed"
    healthy: int = 0
    unhealthy: int = 0
    message: str = ""
    slice_range: Tuple[int, int] = (0, 0)
    geometry: Optional[dict] = None  # geo.Geometry.record() of the subject's scan
    warnings: Tuple[str, ...] = ()  # reported by the main process (e.g. modalities not co-registered)


def default_output_dir(source: str | os.PathLike, mod: str, first: int, last: int, image_size: int) -> Path:
    """Upstream's location: beside the source folder."""
    return Path(source).absolute().parent / f"preprocessed_data_{mod}_{first}{last}_{image_size}"


def _count_existing(patient_dir: Path) -> Tuple[int, int]:

    healthy = unhealthy = 0
    for f in patient_dir.glob("slice_*.npz"):
        try:
            y = read_slice(f, ("y",))["y"]
        except ValueError as exc:  # names the file
            raise SubjectError(f"{exc} (a finished subject: delete {patient_dir} and rerun to preprocess it again)") from None
        if (y > 0.5).any():
            unhealthy += 1
        else:
            healthy += 1
    return healthy, unhealthy


def process_subject(subject: Subject, split_dir: Path, image_size: int = 128, first: int = 0,
                    last: int = 0, orientation: str = geo.DEFAULT_ORIENTATION["brats"]) -> SubjectResult:
    """Preprocess one subject into ``split_dir/patient_<name>`` atomically; skip it if already there."""
    split = split_dir.name[len("npy_"):]
    final = split_dir / f"patient_{subject.name}"
    if final.is_dir():
        healthy, unhealthy = _count_existing(final)
        try:  # the record of what was done comes from the header alone
            record = subject_geometry(subject, orientation).record(image_size)
        except SubjectError:
            record = None
        return SubjectResult(subject.name, split, "skipped", healthy, unhealthy, geometry=record)
    volume, mask = load_subject(subject)
    geometry = subject_geometry(subject, orientation)
    prepared = prepare_slices(volume, mask, image_size, first, last, subject.name, geometry)
    x, y, start, stop = prepared.x, prepared.y, prepared.start, prepared.stop

    healthy = unhealthy = 0
    with fileio.atomic_dir(final) as tmp:
        for i, z in enumerate(range(start, stop)):
            np.savez_compressed(tmp / f"slice_{z}.npz", x=x[i:i + 1], y=y[i:i + 1])
            if (y[i] > 0.5).any():
                unhealthy += 1
            else:
                healthy += 1
    return SubjectResult(subject.name, split, "done", healthy, unhealthy, slice_range=(start, stop),
                         geometry=geometry.record(image_size), warnings=tuple(grid_warnings(subject)))


def _run_one(subject: Subject, split_dir: Path, image_size: int, first: int, last: int,
             orientation: str) -> SubjectResult:
    """Worker entry: never raises for bad input, so one subject cannot take down the others."""
    try:
        return process_subject(subject, split_dir, image_size, first, last, orientation)
    except SubjectError as exc:
        return SubjectResult(subject.name, split_dir.name[4:], "failed", message=str(exc))
    except fileio.DiskFullError:
        raise  # every other subject would fail the same way: stop the run
    except Exception as exc:  # unexpected: keep the traceback's last line for the report
        tb = traceback.format_exc(limit=-1).strip().splitlines()[-1]
        return SubjectResult(subject.name, split_dir.name[4:], "failed",
                             message=f"subject {subject.name}: unexpected {type(exc).__name__}: {exc} ({tb})")


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; avoid oversubscription


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise PermissionError(f"output folder {folder} is not writable: {exc}") from None


def _check_unrecorded_orientation(root: Path, orientation: str, subjects: Sequence[Subject]) -> None:
    """An output made before the orientation was recorded holds slices cut from the arrays as stored: adding subjects
    in the canonical ``orientation`` mixes frames unless its subjects were stored that way already (then both agree,
    as for BraTS in LPS). A SettingsMismatchError names the subjects stored otherwise and what to do."""
    if orientation == geo.STORED:
        return
    by_name = {s.name: s for s in subjects}
    differ = []
    for patient in sorted(root.glob("npy_*/patient_*")):
        subject = by_name.get(patient.name[len("patient_"):])
        if subject is None:
            continue
        try:
            stored = subject_geometry(subject, orientation).axcodes
        except SubjectError:
            continue
        if stored != orientation:
            differ.append(f"{subject.name} ({stored})")
    if differ:
        raise SettingsMismatchError(
            f"{root} was preprocessed before scans were brought into one orientation: its slices were cut from the "
            f"arrays as stored, and {len(differ)} of its subjects are not stored {orientation} (e.g. "
            f"{', '.join(differ[:3])}), so new subjects would be cut in another frame. Pass --orientation "
            f"{geo.STORED} to go on as it was made (and segment with --orientation {geo.STORED}), or preprocess into "
            "another --output")


def check_output_settings(root: Path, settings: Dict[str, object], warnings: List[str],
                          subjects: Sequence[Subject] = ()) -> Dict[str, object]:
    """Refuse to preprocess into ``root`` with other settings than it was made with (``preprocess_settings.json``);
    returns the settings to record (``fileio.write_settings_record``) once the split is checked too.

    An output made before settings were recorded is checked by what its slices show (image size, channels); one made
    before the orientation was recorded, by how its ``subjects`` are stored (``_check_unrecorded_orientation``).
    """
    settings = dict(settings, format_version=FORMAT_VERSION)
    channels = len(MODALITIES) if settings["mod"] == "all" else 1
    remedy = (f"Rerun with the recorded settings, preprocess into another --output (the default folder name carries "
              f"--mod, --first/--last and --image_size), or delete {root} to start over")

    def older_output() -> None:

        existing = next(iter(sorted(root.glob("npy_*/patient_*/slice_*.npz"))), None)
        if existing is None:
            return
        shape = read_slice_shape(existing)
        wanted = (channels, settings["image_size"], settings["image_size"])
        if shape != wanted:
            raise SettingsMismatchError(
                f"{root} holds slices of {shape[0]} channel(s) at {shape[1]}x{shape[2]} px (e.g. {existing}); this "
                f"run makes {channels} channel(s) at {wanted[1]}x{wanted[2]} px (--mod {settings['mod']}, --image_size "
                f"{settings['image_size']}). Adding to it would mix both. {remedy}")
        if "orientation" in settings:
            _check_unrecorded_orientation(root, settings["orientation"], subjects)
        _warn(f"{root} has no {SETTINGS_FILE} (made by an older version): its slices fit --mod {settings['mod']} "
              f"--image_size {settings['image_size']}; the other settings cannot be checked; recording these", warnings)

    compared = settings
    try:
        recorded = json.loads((root / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        recorded = None  # none, or unreadable (check_settings_record says so)
    if isinstance(recorded, dict) and "orientation" not in recorded and "orientation" in settings:
        _check_unrecorded_orientation(root, settings["orientation"], subjects)  # recorded before orientation was
        compared = {k: v for k, v in settings.items() if k != "orientation"}
    fileio.check_settings_record(root / SETTINGS_FILE, compared, what=f"the preprocessed data in {root}",
                                 remedy=remedy, labels={"format_version": "format version"}, on_missing=older_output)
    return settings


def preprocess(
    source: str | os.PathLike,
    name: str = "brats",
    mod: str = "all",
    first: int = 0,
    last: int = 0,
    output: Optional[str | os.PathLike] = None,
    image_size: int = 128,
    workers: int = 1,
    progress: bool = True,
    min_val_lesion: int = 0,
    orientation: str = "",
) -> dict:
    """Preprocess a whole data set; returns (and writes to ``<root>/preprocess_summary.json``) the summary.

    Summary: ``{"output", "orientation", "splits": {split: {patients, skipped, failed, healthy_slices,
    unhealthy_slices}}, "subjects": {name: geometry record}, "errors": [...], "warnings": [...]}``. Bad subjects are
    reported in "errors" and skipped. ``orientation``: the canonical orientation slices are cut in
    (``geometry.resolve_orientation``; empty: the data set's default, BraTS LPS, ATLAS RAS).
    """
    if name not in DATASETS:
        raise ValueError(f"--name must be one of {DATASETS}, got {name!r}")
    orientation = geo.resolve_orientation(orientation, name)
    if mod not in ("all",) + MODALITIES:
        raise ValueError(f"--mod must be one of all, {', '.join(MODALITIES)}; got {mod!r}")
    if name == "atlas":
        if mod == "all":
            mod = "t1"  # ATLAS has T1w only; upstream required --mod t1 (and crashed on all)
            print("ATLAS has only T1w: using --mod t1", flush=True)
        elif mod != "t1":
            raise ValueError(f"ATLAS has only T1w images: --mod must be t1 (or all), got {mod!r}")
    if image_size < 1:
        raise ValueError(f"--image_size must be positive, got {image_size}")
    if first < 0 or last < 0:
        raise ValueError(f"--first/--last must be >= 0, got {first}/{last}")
    if min_val_lesion < 0:
        raise ValueError(f"--min_val_lesion_subjects must be >= 0, got {min_val_lesion}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")

    warnings: List[str] = []
    subjects = discover_subjects(source, name, mod, warnings)
    root = Path(output) if output else default_output_dir(source, mod, first, last, image_size)
    if root.absolute().parent == Path(source).absolute():  # --output inside --source is not a subject
        subjects = [s for s in subjects if s.name != root.name]
    _check_writable(root)
    fileio.sweep_temp_files(root)  # partial files and folders left behind by a killed run
    settings = check_output_settings(root, dict(name=name, mod=mod, first=first, last=last, image_size=image_size,
                                                min_val_lesion_subjects=min_val_lesion, orientation=orientation),
                                     warnings, subjects)
    for split in SPLITS:
        _check_writable(root / f"npy_{split}")
        fileio.sweep_temp_files(root / f"npy_{split}")

    by_name = {s.name: s for s in subjects}
    splits = make_splits([s.name for s in subjects], root / "data_splits", warnings, min_val_lesion,
                         lambda n: subject_has_lesion(by_name[n]) if n in by_name else False)
    fileio.write_settings_record(root / SETTINGS_FILE, settings, {"source": str(Path(source).absolute())})
    tasks = []
    for split in SPLITS:
        for n in splits[split]:
            if n not in by_name:
                _warn(f"subject {n} listed in data_splits/{split}/scans.csv is not in --source {source}", warnings)
                continue
            tasks.append((by_name[n], root / f"npy_{split}"))
    print(f"Preprocessing {len(tasks)} subjects from {source} into {root} "
          f"({name}, mod={mod}, image_size={image_size}, orientation={orientation}, workers={workers})", flush=True)

    results: List[SubjectResult] = []
    bar = logger.progress_bar(len(tasks), "subjects", enabled=progress)
    if workers <= 1:
        for subject, split_dir in tasks:
            results.append(_run_one(subject, split_dir, image_size, first, last, orientation))
            bar.update()
    else:
        with runtime.worker_pool(workers, initializer=_init_worker) as pool:  # workers end with this process
            futures = [pool.submit(_run_one, s, d, image_size, first, last, orientation) for s, d in tasks]
            try:
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            except BrokenProcessPool:
                raise UserError(f"a worker process died (out of memory?); the {len(results)} subjects finished "
                                   f"so far are kept: rerun to resume, with fewer --workers") from None
    bar.close()

    errors = [r.message for r in results if r.status == "failed"]
    for msg in errors:
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
    for r in sorted(results, key=lambda r: r.name):
        for note in r.warnings:
            _warn(note, warnings)
        if r.geometry is not None and r.geometry["stored"]["obliquity_deg"] > geo.OBLIQUE_DEGREES:
            _warn(f"subject {r.name}: the scan's axes are {r.geometry['stored']['obliquity_deg']:.0f} degrees oblique "
                  f"to the world axes; its slices are cut along the closest axes ({r.geometry['stored']['axcodes']} "
                  "stored), not resampled", warnings)
    summary = {"output": str(root), "name": name, "mod": mod, "image_size": image_size, "orientation": orientation,
               "splits": {}, "errors": errors, "warnings": warnings}
    for split in SPLITS:
        rs = [r for r in results if r.split == split]
        ok = [r for r in rs if r.status != "failed"]
        summary["splits"][split] = {
            "patients": len(ok),
            "skipped": sum(r.status == "skipped" for r in rs),
            "failed": len(rs) - len(ok),
            "healthy_slices": sum(r.healthy for r in ok),
            "unhealthy_slices": sum(r.unhealthy for r in ok),
        }
    _check_validation_split(summary["splits"]["val"], min_val_lesion, root, warnings)
    summary["subjects"] = {r.name: {"split": r.split, "geometry": r.geometry}
                           for r in sorted(results, key=lambda r: r.name) if r.status != "failed"}
    fileio.write_text(root / SUMMARY_FILE, json.dumps(summary, indent=1))
    print(format_summary(summary), flush=True)
    return summary


def training_geometry(name: str, data_dir: Optional[str | os.PathLike] = None) -> geo.TrainingGeometry:
    """The training data's voxel size and field of view: the median over the train subjects of a preprocessed folder
    (``data_dir``, its ``preprocess_summary.json``) when it records them, else those of the data set's standard
    release (``geometry.DATASET_GEOMETRY``)."""
    if data_dir:
        path = Path(data_dir) / SUMMARY_FILE
        try:
            subjects = json.loads(path.read_text()).get("subjects") or {}
        except (OSError, ValueError, AttributeError):
            subjects = {}
        records = [s.get("geometry") for s in subjects.values() if isinstance(s, dict) and s.get("split") == "train"]
        found = geo.training_geometry_from_records([r for r in records if r], f"train subjects of {path}")
        if found is not None:
            return found
    return geo.DATASET_GEOMETRY[name]


def _check_validation_split(val: dict, min_val_lesion: int, root: Path, warnings: List[str]) -> None:
    """Say at preprocessing, with the fix, what would otherwise only surface as an error of the validation pass: an
    empty validation split, or one without a slice with a lesion (AnoFPDM fits M_max on those)."""
    if val["patients"] and val["unhealthy_slices"]:
        return
    what = ("is empty (upstream's split gives it 5 % of the subjects rounded down: none for fewer than 20)"
            if not val["patients"] else
            f"has no slice with a lesion ({val['patients']} subject(s), {val['healthy_slices']} healthy slices)")
    if min_val_lesion > 0:
        fix = (f"--min_val_lesion_subjects {min_val_lesion} found no training subject with a lesion to move there; "
               "add subjects with lesions, or pass a translation run's hyperparams.json (--hyperparams_file)")
    else:
        fix = (f"preprocess into a new --output (or delete {root}) with --min_val_lesion_subjects 1, which puts a "
               "subject with a lesion into validation")
    _warn(f"the validation split {what}: AnoFPDM's validation pass needs validation slices with a lesion to fit its "
          f"hyper-parameters (M_max), and will stop without them. To fix it: {fix}", warnings)


def format_summary(summary: dict) -> str:
    lines = [f"{'split':<6} {'patients':>8} {'skipped':>8} {'failed':>7} {'healthy':>9} {'unhealthy':>10}"]
    for split, s in summary["splits"].items():
        lines.append(f"{split:<6} {s['patients']:>8} {s['skipped']:>8} {s['failed']:>7} "
                     f"{s['healthy_slices']:>9} {s['unhealthy_slices']:>10}")
    lines.append(f"output: {summary['output']}")
    if summary["errors"]:
        lines.append(f"{len(summary['errors'])} subject(s) failed; see the ERROR lines above")
    return "\n".join(lines)
