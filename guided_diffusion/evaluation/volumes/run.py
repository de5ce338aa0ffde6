"""A whole-volume segmentation run: the method and its hyper-parameters, every subject (resumable, sharded over
processes), the summary."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

from guided_diffusion import dist_util, fileio, logger
from guided_diffusion.data import geometry as geo
from guided_diffusion.data import preprocess as pp
from guided_diffusion.evaluation import fingerprint as fp
from guided_diffusion.evaluation import translation
from guided_diffusion.evaluation.volumes.report import (
    CSV_COLUMNS,
    CSV_FILE,
    SUMMARY_FILE,
    _csv_row,
    format_summary,
    summarize,
)
from guided_diffusion.evaluation.volumes.subject import (
    FORMAT_VERSION,
    MAP_SUFFIX,
    MASK_SUFFIX,
    OVERLAY_SUFFIX,
    RECORD_SUFFIX,
    _digests,
    finished_record,
    segment_subject,
)
from guided_diffusion.evaluation.volumes.subjects import collect_subjects
from guided_diffusion.methods import base

RUN_FILE = "segment_run.json"

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


def run_settings(method: base.SliceMethod, args: argparse.Namespace, hyper: dict, out_dir: Path) -> dict:
    """Everything that determines a subject's outputs besides its input files."""
    return {
        "format_version": FORMAT_VERSION, "method": args.method, "settings": method.settings(),
        "checkpoints": _digests(method.checkpoints(), out_dir), "hyperparams": hyper,
        "preprocessing": {"name": args.name, "mod": args.mod, "first": args.first, "last": args.last,
                          "image_size": args.image_size,
                          "orientation": geo.resolve_orientation(getattr(args, "orientation", ""), args.name)},
        "batch_size": args.batch_size, "seed": args.seed, "zero_healthy_slices": args.zero_healthy_slices,
        "raw_map": bool(getattr(args, "raw_map", False)),
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
                "preprocessing": settings["preprocessing"],
                "training_geometry": pp.training_geometry(args.name, getattr(args, "data_dir", None))}
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
