"""A whole-volume segmentation run: the method and its hyper-parameters, every subject (resumable, sharded over
processes), the summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

from guided_diffusion import dist_util, fileio, logger
from guided_diffusion.data import preprocess as pp
from guided_diffusion.evaluation import fingerprint as fp
from guided_diffusion.evaluation.driver import Evaluation, fit_provenance, read_hyperparams
from guided_diffusion.evaluation.settings import EvaluationSettings
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
from guided_diffusion.evaluation.volumes.settings import SegmentSettings
from guided_diffusion.methods import base
from guided_diffusion.methods.registry import build_method

RUN_FILE = "segment_run.json"

# ------------------------------------------------------------------------------------------------------------
# Hyper-parameters


VALIDATION_DIR = "validation"  # the driver's validation batches and hyperparams.json (reused on a rerun)


def resolve_hyperparams(method: base.SliceMethod, s: SegmentSettings, out_dir: Path) -> Tuple[dict, str]:
    """``(hyper-parameters, where they come from)``: ``--hyperparams_file``, or the method's recorded values with
    ``--num_batches_val 0``, or the evaluation's validation pass on ``--data_dir`` (the same code, slices, batches
    and noise as an evaluation run with the same flags; its content-keyed batch files in ``<output>/validation/``
    are reused on a rerun)."""
    val = s.validation
    if val.hyperparams_file:
        fitted_with = fit_provenance(method, s.inference, _digests(method.checkpoints(), out_dir))
        return (read_hyperparams(method, val.hyperparams_file, fitted_with, val.accept_hyperparams),
                f"file {os.path.abspath(val.hyperparams_file)}")
    if val.num_batches_val == 0:
        return read_hyperparams(method, ""), "recorded values (--num_batches_val 0)"
    folder = str(out_dir / VALIDATION_DIR)
    driver = Evaluation(EvaluationSettings(inference=s.inference, data=s.data, validation=val, output=folder,
                                           resume=s.resume, progress=s.progress,
                                           world_size=dist_util.get_world_size()), method, log_dir=folder)
    return driver.validation(), f"validation pass on {s.data.data_dir}"


def run_settings(method: base.SliceMethod, s: SegmentSettings, hyper: dict, out_dir: Path) -> dict:
    """Everything that determines a subject's outputs besides its input files."""
    v = s.volumes
    return {
        "format_version": FORMAT_VERSION, "method": s.inference.method, "settings": method.settings(),
        "checkpoints": _digests(method.checkpoints(), out_dir),
        "hyperparams": {k: v for k, v in hyper.items() if k != "fitted_on"},  # not where the data lay
        "preprocessing": {"name": s.data.name, "mod": v.mod, "first": v.first, "last": v.last,
                          "image_size": s.inference.image_size, "orientation": s.orientation},
        "batch_size": v.batch_size, "seed": s.inference.seed, "zero_healthy_slices": v.zero_healthy_slices,
        "raw_map": v.raw_map, "overlay": [v.overlay_slices, s.panel_modality],
    }


#: how the keys of segment_run.json are named to the user (the flag that sets them); others: --<key>
_RUN_KEY_NAMES = {
    "format_version": "the output format (written by another version of this code)",
    "checkpoints": "the checkpoint's content (--model_dir / --model_num / --ema)",
    "hyperparams": "the hyper-parameters (--hyperparams_file, or the validation pass on --data_dir)",
    "overlay": "--overlay_slices / --panel_modality",
}


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def run_differences(old: dict, now: dict) -> List[str]:
    """What differs between two runs' settings (segment_run.json), each as ``<flag> <recorded> (now <value>)``; the
    method's and the preprocessing's settings by their own flags."""
    out = []
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key), now.get(key)
        if a == b:
            continue
        if key in ("settings", "preprocessing") and isinstance(a, dict) and isinstance(b, dict):
            out += [f"--{k} {_shown(a.get(k))} (now {_shown(b.get(k))})" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif key in _RUN_KEY_NAMES:
            out.append(_RUN_KEY_NAMES[key])
        else:
            out.append(f"--{key} {_shown(a)} (now {_shown(b)})")
    return out


def finished_subjects(out_dir: Path) -> List[str]:
    """The ids of the subjects with a record (``<id>_segmentation.json``) in ``out_dir``."""
    return sorted(p.name[:-len(RECORD_SUFFIX)] for p in out_dir.glob(f"*{RECORD_SUFFIX}"))


def _check_run_file(out_dir: Path, settings: dict, resume: bool, subjects: List[str]) -> Optional[str]:
    """Record this run's settings in ``segment_run.json``; the error message if the folder holds another run's
    results that this run would mix with its own (``--resume true``: any; ``--resume false``: those of subjects it
    does not recompute, which would stay beside the new ones)."""
    path = out_dir / RUN_FILE
    now = json.loads(json.dumps(settings, default=str))
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
    if isinstance(old, dict) and old != now:
        diff = "; ".join(run_differences(old, now))
        if resume:
            return (f"--output {out_dir} holds results of a run with other settings ({path}): {diff}. Use another "
                    "--output, or --resume false to recompute the subjects there")
        others = sorted(set(finished_subjects(out_dir)) - set(subjects))
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            return (f"--resume false recomputes this run's {len(subjects)} subject(s), but --output {out_dir} also "
                    f"holds results of {len(others)} other subject(s) ({shown}) made with other settings ({path}: "
                    f"{diff}), which would stay beside the new ones under the new settings record. Use another "
                    "--output, include those subjects in this run, or delete their files (<id>_*) first")
    fileio.write_json(path, settings)
    return None


def run(s: SegmentSettings, subjects: Optional[List[pp.Subject]] = None) -> dict:
    """Segment every subject of ``s`` (see the package docstring); returns the summary on rank 0 and
    ``{"statuses": [...]}`` (this process's subjects) on the others."""
    t0 = time.time()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = dist_util.dev()
    out_dir = Path(s.output)
    subjects = collect_subjects(s.volumes, s.data.name) if subjects is None else subjects
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        fileio.sweep_temp_files(out_dir, warn=logger.warn)  # partial files of a killed run
    dist_util.barrier()
    method = build_method(s.inference, device)
    hyper, source = resolve_hyperparams(method, s, out_dir)
    logger.log(f"{s.inference.method}: {method.describe(hyper)}")
    settings = run_settings(method, s, hyper, out_dir)
    run_key = fp.json_digest(settings)
    problem = _check_run_file(out_dir, settings, s.resume, [x.name for x in subjects]) if rank == 0 else None
    problem = dist_util.broadcast_object(problem)  # every rank stops, not only rank 0
    if problem:
        raise ValueError(problem)
    checkpoint = (method.checkpoints() or [None])[0]
    run_info = {"device": device, "method": s.inference.method, "settings": method.settings(), "hyperparams": hyper,
                "hyperparams_source": source, "checkpoint": checkpoint,
                "preprocessing": settings["preprocessing"],
                "training_geometry": pp.training_geometry(s.data.name, s.data.data_dir or None)}
    logger.log(f"{len(subjects)} subject(s); {world} process(es); checkpoint {checkpoint}; output {out_dir}")

    mine = subjects[rank::world]
    show = s.progress and rank == 0
    outer = logger.progress_bar(len(mine), f"subjects (rank 0 of {world})" if world > 1 else "subjects", enabled=show)
    inner = logger.progress_bar(0, "steps", leave=False, enabled=show)
    statuses = []
    for subject in mine:
        done = (finished_record(out_dir, subject, run_key, overlay=s.volumes.overlay_slices > 0, warn=logger.warn)
                if s.resume else None)
        if done is not None:
            statuses.append({"id": subject.name, "status": "skipped"})
            outer.update(1)
            continue
        outer.set_postfix_str(subject.name)
        try:
            record = segment_subject(subject, method, hyper, s, out_dir, run_key, run_info, bar=inner)
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

    gathered = [st for part in dist_util.gather_objects(statuses) for st in part]
    if rank != 0:
        return {"statuses": statuses}
    failures = [{"id": st["id"], "message": st["message"]} for st in gathered if st["status"] == "failed"]
    failed = {f["id"] for f in failures}
    records = []
    for subject in subjects:
        if subject.name in failed:
            continue
        rec = finished_record(out_dir, subject, run_key, overlay=s.volumes.overlay_slices > 0)
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
    summary.update(method=s.inference.method, settings=method.settings(), hyperparams=hyper, hyperparams_source=source,
                   checkpoint=checkpoint, computed=sum(st["status"] == "done" for st in gathered),
                   skipped=sum(st["status"] == "skipped" for st in gathered), seconds=time.time() - t0)
    fileio.write_json(out_dir / SUMMARY_FILE, summary)
    logger.log(format_summary(summary))
    logger.log(f"results: {out_dir} ({CSV_FILE}, {SUMMARY_FILE}, <id>{MAP_SUFFIX}, <id>{MASK_SUFFIX}, "
               f"<id>{RECORD_SUFFIX}, <id>{OVERLAY_SUFFIX})")
    return summary
