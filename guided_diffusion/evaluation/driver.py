"""The evaluation driver: one run of a segmentation method on the val/test slices, resumable, on 1..N processes.

Every method (``anofpdm``, ``anoddpm``, ``clf_guided``, ``ddib``: ``guided_diffusion/methods``) goes through the
same run; the method only turns batches into records, hyper-parameters and anomaly maps (``methods/base.py``):

1. The method is built from ``EvaluationSettings.inference`` (its models from the checkpoint folder, built as its
   ``config.json`` says, or as the flags say for an upstream folder without one).
2. Validation (``num_batches_val`` batches of ``batch_size_val`` slices): per-slice records of each batch, then
   ``method.fit`` on all of them (``hyperparams.json``). AnoFPDM sees slice labels only; the baselines also the
   pixel labels (their threshold is a grid search of the Dice), and every output of theirs says so
   (``pixel_labels_used``). With ``num_batches_val 0`` the values come from ``--hyperparams_file`` or the method's
   own rule (AnoFPDM: upstream's recorded values, only for upstream's function; baselines: ``--opt_thr``).
3. Test (``num_batches`` batches of ``batch_size`` slices; -1 = the whole split): ``method.test_batch`` gives the
   anomaly map, the post-processed mask and the slice label of every slice.
4. Rank 0 evaluates every test batch: ``metrics.json`` (keys ``mixed`` and ``unhealthy`` with ``dice``, ``iou``,
   ``auprc``, plus ``accuracy``, ``method``, ``pixel_labels_used``), ``metrics.csv``, ``per_slice.csv``,
   ``per_volume.csv``, PNG panels and, with ``--save_data true``, ``per_slice_arrays.npz`` (``reports.py``).

Batch sizes are global: with N processes each takes ``batch_size // N`` slices per batch from its own shard of the
split (slices are drawn without replacement and never repeat across ranks or batches); the noise of a global batch
is drawn once and dealt out with its slices, so results do not depend on N. Each finished batch is written
atomically to ``<output>/batches/`` (``batch_store.py``) with a fingerprint of everything that determines it: the
method and its settings, the model flags, the *content* of the checkpoints and of the data split
(``fingerprint.py``), the slice order and, for test batches, the hyper-parameters. A restarted run reuses every
batch whose fingerprint matches. The output folder must be visible to every rank (one machine, or a shared file
system).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from guided_diffusion import dist_util, fileio, logger
from guided_diffusion.errors import HyperparameterError, SettingsMismatchError
from guided_diffusion.evaluation import fingerprint as fp
from guided_diffusion.evaluation import reports
from guided_diffusion.evaluation.batch_store import (
    ARRAY,
    BATCH_DIR,
    COLUMN,
    RECORD,
    ResultBatches,
    batch_index,
    batch_path,
    batch_rank,
    interleave_ranks,
    load_batch,
    prefixed,
)
from guided_diffusion.evaluation.settings import EvaluationSettings
from guided_diffusion.evaluation.volumes.report import test_split_volumes
from guided_diffusion.factory import diffusion_defaults
from guided_diffusion.methods.base import BatchContext, SliceMethod
from guided_diffusion.methods.registry import build_method
from guided_diffusion.methods.settings import InferenceSettings
from guided_diffusion.metrics import evaluate_segmentation, foreground_mask

FILE_VERSION = 5  # 5: settings objects (keys of the model and its diffusion from the model's settings)

VALIDATION_REMEDY = (
    "validate on more slices (--num_batches_val -1: the whole val split; --use_weighted_sampler true: class-balanced "
    "batches) or preprocess with more validation subjects; pass --hyperparams_file (the hyperparams.json of a run "
    "with the same settings); or preprocess with --min_val_lesion_subjects 1, which puts a subject with a lesion "
    "into validation")


def eval_batches(s: EvaluationSettings, split: str, global_batch: int, num_batches: int,
                 with_files: bool = False) -> Iterator:
    """This rank's batches ``(x, gt_mask, label)`` of ``split``: at most ``num_batches`` (-1 = all).

    ``with_files``: ``(x, gt_mask, label, files)``, files the batch's slices as ``patient_<P>/slice_<z>.npz``.
    """
    from guided_diffusion.data.loaders import get_data_iter

    per_rank = global_batch // dist_util.get_world_size()  # val/test loaders take the per-rank batch
    loader = get_data_iter(
        s.data.name,
        s.data.data_dir,
        per_rank,
        split=split,
        ret_lab=True,
        mixed=True,
        seed=s.inference.seed,
        use_weighted_sampler=s.data.use_weighted_sampler,
        num_workers=s.data.num_workers,
        image_size=s.inference.image_size,  # the data must fit the model (and the component filter its size)
        in_channels=s.inference.in_channels,
        flags_source=s.inference.source.flags_source,
    )
    if isinstance(loader, tuple):
        loader = loader[0]
    if num_batches > len(loader) and dist_util.get_rank() == 0:
        flag = "--num_batches_val" if split == "val" else "--num_batches"
        logger.warn(f"WARNING: {flag} {num_batches} is more than the {split} split holds: {len(loader.dataset)} "
                    f"slices make {len(loader)} batch(es) of {global_batch}; all {len(loader)} are used")
    order = list(loader.sampler) if with_files else []  # the sampler's order is fixed: batch i is its i-th chunk
    for i, batch in enumerate(loader):
        if 0 <= num_batches <= i:
            break
        if with_files:
            rows = order[i * per_rank:(i + 1) * per_rank]
            batch = (*batch, [f"{loader.dataset.items[j].parent.name}/{loader.dataset.items[j].name}" for j in rows])
        yield batch


def batch_seed(seed: int, split: str, index: int) -> int:
    """The noise seed of global batch ``index`` of ``split``."""
    return (seed * 1_000_003 + (0 if split == "val" else 500_009) + index) % 2**63


def fit_provenance(method: SliceMethod, s: InferenceSettings, checkpoint_digests: Sequence[str]) -> dict:
    """What a method's hyper-parameters are fitted with (``fitted_with`` in hyperparams.json): the method's settings
    that the fit depends on, the diffusion grid, the data set, the model's shape and the checkpoints' content. A
    file read with other values is refused (``read_hyperparams``)."""
    model = s.source.model
    return _plain({"method": method.name, "settings": method.fit_settings(), "dataset": s.dataset,
                   "image_size": s.image_size, "in_channels": s.in_channels, "diffusion_steps": model.diffusion_steps,
                   "timestep_respacing": model.timestep_respacing or "", "checkpoints": list(checkpoint_digests)})


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def hyper_key(hyper: dict) -> dict:
    """The hyper-parameters as they determine results: without where they were read from or fitted on."""
    return {k: v for k, v in hyper.items() if k not in ("source", "fitted_on")}


#: how the keys of ``fitted_with`` are named to the user; the method's settings by their own flags (--<key>)
_FIT_KEY_NAMES = {"method": "--method", "dataset": "--name", "image_size": "--image_size",
                  "in_channels": "--in_channels", "diffusion_steps": "--diffusion_steps",
                  "timestep_respacing": "--timestep_respacing"}


def fit_differences(recorded: dict, current: dict) -> List[str]:
    """Each setting in which ``current`` differs from a file's ``fitted_with``: ``<flag> <recorded> (now <value>)``."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if a == b:
            continue
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"--{k} {json.dumps(a.get(k))} (now {json.dumps(b.get(k))})" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif key == "checkpoints":
            out.append("the checkpoint: fitted on another model (its content differs from --model_dir's)")
        else:
            out.append(f"{_FIT_KEY_NAMES.get(key, '--' + key)} {json.dumps(a)} (now {json.dumps(b)})")
    return out


def read_hyperparams(method: SliceMethod, path: str, fitted_with: Optional[dict] = None, accept: bool = False,
                     warn: Callable[[str], None] = logger.warn) -> dict:
    """The hyper-parameters in ``path`` (a run's hyperparams.json), else the method's values for a run without
    validation (``--num_batches_val 0``), checked by the method.

    ``fitted_with`` (``fit_provenance`` of this run): a file that records other settings is refused naming each,
    unless ``accept`` (``--accept_hyperparams``: a warning lists them); a file without a record (upstream's, or an
    older version's) is used with a warning that it cannot be checked."""
    if path:
        try:
            with open(path) as f:
                hyper = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--hyperparams_file {path} cannot be read as JSON: {e}; pass the hyperparams.json of an "
                             "earlier run with the same settings, or validate (--num_batches_val N)") from None
        if not isinstance(hyper, dict):
            raise ValueError(f"--hyperparams_file {path} must hold a JSON object (a run's hyperparams.json)")
        hyper = dict(hyper, source=f"file {path}")
    else:
        hyper = method.hyperparams_without_validation()
    try:
        hyper = method.check_hyperparams(hyper)
    except ValueError as e:
        raise ValueError(f"hyper-parameters from {hyper.get('source', '?')} do not fit --method {method.name}: "
                         f"{e}") from None
    if path and fitted_with is not None:
        recorded = hyper.get("fitted_with")
        if not isinstance(recorded, dict):
            warn(f"WARNING: --hyperparams_file {path} records nothing of what it was fitted with (upstream's file, or "
                 "one written by an older version): it is used as given, and cannot be checked against this run's "
                 "method settings, diffusion grid and checkpoint; make sure they are those it was fitted with")
            return hyper
        diffs = fit_differences(recorded, _plain(fitted_with))
        if diffs and not accept:
            raise SettingsMismatchError(
                f"--hyperparams_file {path} was fitted with other settings than this run's: {'; '.join(diffs)}. Its "
                "values would mean something else here: validate with this run's settings (drop --hyperparams_file, "
                "--num_batches_val -1), pass the hyperparams.json of a run with these settings, or pass "
                "--accept_hyperparams true to use it anyway")
        if diffs:
            warn(f"WARNING: --hyperparams_file {path} was fitted with other settings than this run's, used anyway "
                 f"(--accept_hyperparams true): {'; '.join(diffs)}")
    return hyper


class Evaluation:
    """One run of ``settings.inference.method`` (see the module docstring). ``run()`` returns a summary dict."""

    def __init__(self, settings: EvaluationSettings, method: Optional[SliceMethod] = None,
                 log_dir: Optional[str] = None):
        self.s = settings
        self.rank = dist_util.get_rank()
        self.world = dist_util.get_world_size()
        self.device = dist_util.dev()
        self.log_dir = log_dir or settings.output
        self.image_dir = settings.test.image_dir or self.log_dir
        self.method = method if method is not None else build_method(settings.inference, self.device)
        self.checkpoint = (self.method.checkpoints() or [""])[0]
        self.summary: Dict[str, Any] = {"computed": {"val": 0, "test": 0}, "reused": {"val": 0, "test": 0}}
        self._content: Dict[str, Any] = {}

    # -- fingerprints ---------------------------------------------------------------------------------

    def content(self, what: str) -> Any:
        """Digests of the checkpoints (``what="checkpoints"``) or the manifest of a split this run reads, computed
        on first use (rank 0 hashes, every rank gets the same value: call it on every rank)."""
        if what not in self._content:
            value = None
            if self.rank == 0:
                cache = fp.DigestCache(os.path.join(self.log_dir, fp.DIGESTS_FILE))
                value = (fp.checkpoints_fingerprint(self.method.checkpoints(), cache) if what == "checkpoints"
                         else fp.split_fingerprint(self.s.data.data_dir, what, cache))
                cache.save()
            self._content[what] = dist_util.broadcast_object(value)
        return self._content[what]

    def _key(self, split: str, batch: int) -> dict:
        s = self.s
        flags = s.inference.source.model.flags()
        diffusion_keys = set(diffusion_defaults())
        return {
            "version": FILE_VERSION,
            "split": split,
            "method": self.method.name,
            "settings": self.method.settings(),
            "checkpoints": self.content("checkpoints"),
            "data": self.content(split),
            "order": (s.data.name, s.inference.seed, s.data.use_weighted_sampler, batch, self.world),
            "model": {k: v for k, v in flags.items() if k not in diffusion_keys},
            "diffusion": {k: v for k, v in flags.items() if k in diffusion_keys},
            "pixel_labels": self.method.uses_pixel_labels,
        }

    def _test_key(self, hyper: dict) -> str:
        return fp.json_digest({
            **self._key("test", self.s.test.batch_size),
            "hyper": hyper_key(hyper),
            "store": self.s.test.save_data,
        })

    # -- passes ---------------------------------------------------------------------------------------

    def _progress(self, total: Optional[int], desc: str, leave: bool = True):
        return logger.progress_bar(total, desc, leave=leave, enabled=self.s.progress and self.rank == 0)

    def _context(self, split: str, index: int, global_batch: int, bar) -> BatchContext:
        # The noise is drawn per global batch and dealt out like the slices (rank r holds rows r::world of the
        # global batch, see data.ShardedOrderSampler), so each slice sees the same noise for any number of processes.
        bar.reset(total=self.method.steps_per_batch(split))
        bar.set_description(f"{split} batch {index} steps")
        gen = torch.Generator().manual_seed(batch_seed(self.s.inference.seed, split, index))
        return BatchContext(gen, rows=(global_batch // self.world) * self.world, rank=self.rank, world=self.world,
                            progress=bar.update)

    def fitted_with(self) -> dict:
        """What this run fits hyper-parameters with (``fit_provenance``); call it on every rank."""
        return fit_provenance(self.method, self.s.inference, self.content("checkpoints"))

    def read_hyperparams(self) -> dict:
        """``--hyperparams_file`` (checked against this run's settings), else the method's recorded values
        (``--num_batches_val 0``), checked."""
        v = self.s.validation
        fitted_with = self.fitted_with() if v.hyperparams_file else None
        return read_hyperparams(self.method, v.hyperparams_file, fitted_with, v.accept_hyperparams)

    def validation(self) -> dict:
        v = self.s.validation
        if v.num_batches_val == 0:
            return self.read_hyperparams()
        key = fp.json_digest(self._key("val", v.batch_size_val))
        pixel = self.method.uses_pixel_labels
        paths: List[str] = []
        outer = self._progress(None if v.num_batches_val < 0 else v.num_batches_val, "validation batches")
        inner = self._progress(self.method.steps_per_batch("val"), "steps", leave=False)
        for k, (x, gt, lab) in enumerate(eval_batches(self.s, "val", v.batch_size_val, v.num_batches_val)):
            path = batch_path(self.log_dir, "val", self.world, self.rank, k)
            paths.append(path)
            if self.s.resume and load_batch(path, key) is not None:
                self.summary["reused"]["val"] += 1
            else:
                records = self.method.validation_batch(x.to(self.device).float(),
                                                       self._context("val", k, v.batch_size_val, inner))
                data = {"fingerprint": np.array(key), "label": lab.cpu().numpy().astype(np.int64),
                        **{RECORD.format(n): np.asarray(r) for n, r in records.items()}}
                if pixel:
                    data["gt"] = gt.cpu().numpy() > 0.5
                fileio.save_npz(path, data)
                self.summary["computed"]["val"] += 1
            outer.update(1)
        inner.close()
        outer.close()
        all_paths = self._gathered(paths)
        provenance = {"fitted_with": self.fitted_with(),  # compared where the file is read; fitted_on: for the record
                      "fitted_on": _plain({"checkpoint_files": self.method.checkpoints(),
                                           "data_dir": self.s.data.data_dir, "dataset": self.s.data.name,
                                           "val_split": self.content("val")})}
        hyper = None
        if self.rank == 0:  # every rank's batches are in the shared output folder: fit once, tell the others
            hyper = dict(self._fit(all_paths, key), **provenance)
            fileio.write_json(os.path.join(self.log_dir, "hyperparams.json"), hyper)
        return dist_util.broadcast_object(hyper)

    def _fit(self, paths: List[str], key: str) -> dict:
        batches = []
        for _, group in itertools.groupby(paths, key=batch_index):
            parts = [load_batch(p, key) for p in group]
            if any(p is None for p in parts):
                raise FileNotFoundError(f"validation result files of batch {batch_index(paths[0])} are missing or "
                                        "stale; the output folder must be shared by all ranks")
            names = [n for n in parts[0] if n != "fingerprint"]
            batches.append(interleave_ranks(parts, names))
        if not batches or not sum(len(b["label"]) for b in batches):
            raise ValueError(f"the validation split of {self.s.data.data_dir} gave no slices")
        merged = {n: np.concatenate([b[n] for b in batches]) for n in batches[0]}
        records = prefixed(merged, RECORD)
        gt = merged.get("gt") if self.method.uses_pixel_labels else None
        try:
            hyper = self.method.fit(records, merged["label"], gt)
        except HyperparameterError as e:  # nothing is written; the validation batches stay cached
            labels = merged["label"]
            raise HyperparameterError(
                f"{e}. Validation had {len(labels)} slice(s), {int((labels == 1).sum())} unhealthy, in {len(batches)} "
                f"batch(es) from {os.path.join(self.s.data.data_dir, 'npy_val')}. To fix it: {VALIDATION_REMEDY}"
            ) from None
        return dict(hyper, pixel_labels_used=self.method.uses_pixel_labels)

    def test(self, hyper: dict) -> List[str]:
        t = self.s.test
        key = self._test_key(hyper)
        panel_modality = self.s.panel_modality
        paths = []
        outer = self._progress(None if t.num_batches < 0 else t.num_batches, "test batches")
        inner = self._progress(self.method.steps_per_batch("test"), "steps", leave=False)
        for k, (x, gt, lab, files) in enumerate(eval_batches(self.s, "test", t.batch_size, t.num_batches, True)):
            path = batch_path(self.log_dir, "test", self.world, self.rank, k)
            paths.append(path)
            if self.s.resume and load_batch(path, key) is not None:
                self.summary["reused"]["test"] += 1
                outer.update(1)
                continue
            xd = x.to(self.device).float()
            out = self.method.test_batch(xd, hyper, self._context("test", k, t.batch_size, inner))
            out.check(x.shape[0], x.shape[-2], x.shape[-1], self.method.name)
            x_np = x.cpu().float().numpy()
            data = {
                "fingerprint": np.array(key),
                "slice_file": np.array(files),  # patient and z: per-volume metrics
                "label": lab.cpu().numpy().astype(np.int64),
                "gt": gt.cpu().numpy() > 0.5,
                "foreground": foreground_mask(x_np),
                "panel_input": x_np[:, [panel_modality]].astype(np.float16),
            }
            for i, o in enumerate([out] + out.variants):
                data[f"anomaly_map_{i}"] = o.anomaly_map.detach().cpu().float().numpy()
                data[f"mask_{i}"] = o.mask.detach().cpu().numpy().astype(bool)
                data[f"pred_label_{i}"] = o.pred_label.detach().cpu().numpy().astype(np.int64)
                data.update({COLUMN.format(i, n): np.asarray(v) for n, v in o.columns.items()})
            if t.save_data:
                data["source"] = x_np.astype(np.float32)
                data.update({ARRAY.format(n): np.asarray(v) for n, v in out.arrays.items()})
            fileio.save_npz(path, data)
            self.summary["computed"]["test"] += 1
            outer.update(1)
        inner.close()
        outer.close()
        return paths

    def _gathered(self, paths: List[str]) -> List[str]:
        """Every rank's result files, in (batch, rank) order, after every rank has written its own."""
        everyone = sorted((p for ps in dist_util.gather_objects(paths) for p in ps),
                          key=lambda p: (batch_index(p), batch_rank(p)))
        dist_util.barrier()
        return everyone

    # -- evaluation and outputs (rank 0) ---------------------------------------------------------------

    def evaluate(self, paths: List[str], hyper: dict) -> dict:
        t = self.s.test
        key = self._test_key(hyper)
        missing = [p for p in paths if load_batch(p, key) is None]
        if missing:
            raise FileNotFoundError(f"{len(missing)} test result files are missing or stale, e.g. {missing[0]}; "
                                    "the output folder must be shared by all ranks")
        m = self.method
        results = []
        for i, value in enumerate(m.variants()):
            res = evaluate_segmentation(ResultBatches(paths, i), auprc_pooling=t.auprc_pooling,
                                        pr_pooling=t.pr_pooling)
            if m.variant_key:
                res[m.variant_key] = value
            results.append(res)
        metrics = dict(results[0])
        metrics["method"] = m.name
        metrics["pixel_labels_used"] = m.uses_pixel_labels
        metrics["hyperparams"] = hyper
        metrics["checkpoint"] = self.checkpoint
        metrics["checkpoints"] = m.checkpoints()
        metrics["settings"] = {**m.settings(), "batch_size": t.batch_size, "num_batches": t.num_batches,
                               "world_size": self.world, "auprc_pooling": t.auprc_pooling,
                               "pr_pooling": t.pr_pooling}
        if len(results) > 1:
            metrics[f"by_{m.variant_key}"] = {str(r[m.variant_key]): r for r in results}
        per_volume = test_split_volumes(ResultBatches(paths, 0), paths, self.s.data.data_dir,
                                        os.path.join(self.log_dir, "per_volume.csv"))
        if per_volume is not None:
            metrics["per_volume"] = per_volume
            logger.log(f"per volume: {per_volume['n_volumes']} complete test patient(s), Dice "
                       f"{(per_volume.get('with_lesion') or {}).get('dice')} (with a lesion; per_volume.csv)")
        fileio.write_json(os.path.join(self.log_dir, "metrics.json"), metrics)
        reports.write_metrics_csv(os.path.join(self.log_dir, "metrics.csv"), results, m)
        reports.write_per_slice(os.path.join(self.log_dir, "per_slice.csv"), paths)
        if t.num_panels > 0:
            out = os.path.join(self.image_dir, "panels.png")
            if reports.write_panels(out, paths, t.num_panels, m):
                logger.log(f"panels: {out}")
        if t.save_data:
            reports.write_arrays(os.path.join(self.image_dir, "per_slice_arrays.npz"), paths)
        return metrics

    # -- driver ---------------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        t0 = time.time()
        if self.rank == 0:  # before any rank writes: partial files of a killed run go
            for folder in {self.log_dir, os.path.join(self.log_dir, BATCH_DIR), self.image_dir}:
                fileio.sweep_temp_files(folder, warn=logger.warn)
        if not self.s.resume and self.rank == 0:
            for f in glob.glob(os.path.join(self.log_dir, BATCH_DIR, "*.npz")):
                os.remove(f)
        dist_util.barrier()
        m = self.method
        logger.log(f"method {m.name}{' (threshold tuned with pixel labels)' if m.uses_pixel_labels else ''}; "
                   f"checkpoint(s) {', '.join(m.checkpoints())}; device {self.device}; {self.world} process(es)")
        hyper = self.validation()
        logger.log(f"hyper-parameters: {m.describe(hyper)}")
        paths = self.test(hyper)
        all_paths = self._gathered(paths)
        metrics = None
        if self.rank == 0:
            metrics = self.evaluate(all_paths, hyper)
            for setup in reports.SETUPS:
                logger.log(f"{setup}: " + ", ".join(f"{k} {_fmt(metrics[setup].get(k))}"
                                                    for k in ("dice", "iou", "auprc", "n_slices")))
            logger.log(f"classification accuracy {_fmt(metrics['accuracy'])}")
            logger.log(f"metrics: {os.path.join(self.log_dir, 'metrics.json')}")
        # no barrier after the evaluation: the other ranks are done, and a long evaluation on rank 0 must not
        # run into a collective timeout on theirs
        self.summary.update(metrics=metrics, hyperparams=hyper, seconds=time.time() - t0, test_files=all_paths,
                            method=m.name)
        logger.log(f"evaluation complete ({self.summary['computed']} computed, {self.summary['reused']} reused, "
                   f"{self.summary['seconds']:.1f} s)")
        return self.summary


def _fmt(v: Any) -> str:
    return "null" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
