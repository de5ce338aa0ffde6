"""The evaluation driver: one run of a segmentation method on the val/test slices, resumable, on 1..N processes.

Every method (``--method anofpdm|anoddpm|clf_guided|ddib``, ``guided_diffusion/methods``) goes through the same
run; the method only turns batches into records, hyper-parameters and anomaly maps (``methods/base.py``):

1. Build the method: its models from ``--model_dir`` (``model{step:06d}.pt`` or ``ema_{rate}_{step:06d}.pt`` with
   ``--ema True``), into the model its ``config.json`` describes (written by training; explicit flags that contradict
   it are an error), or, for an upstream folder without one, into the model the flags describe; the classifier of
   ``clf_guided`` from ``--clf_dir`` likewise.
2. Validation (``--num_batches_val`` batches of ``--batch_size_val`` slices): per-slice records of each batch, then
   ``method.fit`` on all of them (``hyperparams.json``). AnoFPDM sees slice labels only; the baselines also the
   pixel labels (their threshold is a grid search of the Dice), and every output of theirs says so
   (``pixel_labels_used``). With ``--num_batches_val 0`` the values come from ``--hyperparams_file`` or the
   method's own rule (AnoFPDM: upstream's recorded values, only for upstream's function; baselines: ``--opt_thr``).
3. Test (``--num_batches`` batches of ``--batch_size`` slices; -1 = the whole split): ``method.test_batch`` gives
   the anomaly map, the post-processed mask and the slice label of every slice.
4. Rank 0 evaluates every test batch: ``metrics.json`` (keys ``mixed`` and ``unhealthy`` with ``dice``, ``iou``,
   ``auprc``, plus ``accuracy``, ``method``, ``pixel_labels_used``), ``metrics.csv``, ``per_slice.csv``, PNG panels
   and, with ``--save_data True``, ``per_slice_arrays.npz``.

Batch sizes are global: with N processes each takes ``batch_size // N`` slices per batch from its own shard of the
split (slices are drawn without replacement and never repeat across ranks or batches); the noise of a global batch
is drawn once and dealt out with its slices, so results do not depend on N. Each finished batch is written
atomically to ``$OPENAI_LOGDIR/batches/`` with a fingerprint of everything that determines it: the method and its
settings, the model flags, the *content* of the checkpoints and of the data split (``evaluation/fingerprint.py``),
the slice order and, for test batches, the hyper-parameters. A restarted run reuses every batch whose fingerprint
matches. The log folder must be visible to every rank (one machine, or a shared file system).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.errors import HyperparameterError, entry_point
from guided_diffusion.evaluation import fingerprint as fp
from guided_diffusion.evaluation.volumes.report import test_split_volumes
from guided_diffusion.methods import anofpdm as af
from guided_diffusion.methods.base import METHODS, BatchContext, SliceMethod, build_method, method_class
from guided_diffusion.methods.postprocess import check_median_kernel, component_size
from guided_diffusion.metrics import (
    AUPRC_POOLINGS,
    PR_POOLINGS,
    dice_iou_per_slice,
    evaluate_segmentation,
    foreground_mask,
)
from guided_diffusion.runtime import PRECISIONS  # noqa: F401  (re-exported for older imports)
from guided_diffusion.script_util import (
    UNET_VERSIONS,
    add_dict_to_argparser,
    apply_run_config,
    args_to_dict,
    check_model_flags,
    diffusion_defaults,
    explicit_flags,
    model_and_diffusion_defaults,
)

BATCH_DIR = "batches"
FILE_VERSION = 4  # 4: one driver for every method, content fingerprints


# ------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------


def shared_defaults() -> dict:
    """The driver's flags (upstream's translation flags every method has, then this project's additions)."""
    return dict(
        method="anofpdm",
        name="brats",
        data_dir="",
        image_dir="",
        model_dir="",
        batch_size=32,
        model_num="",  # "" = the latest checkpoint in --model_dir
        ema=False,
        save_data=False,
        num_batches_val=2,
        batch_size_val=100,
        median_filter=True,
        median_kernel=5,  # the median filter's window (odd); upstream's 5 at any image size
        dynamic_clip=False,
        seed=0,
        use_weighted_sampler=False,
        threshold=-1.0,  # accepted for upstream command lines; unused at inference
        # additions
        ema_rate="0.9999",
        cc_filter_size=-1,  # -1: upstream's 40 px at 128², scaled with the image area
        auprc_pooling="global",  # exact over the whole test set; "batch": upstream's per-batch pooling
        pr_pooling="global",  # pixel precision/recall over all test pixels; "upstream": per-batch ratios averaged
        hyperparams_file="",
        num_panels=8,
        panel_modality=-1,
        resume=True,
        precision="fp32",
        num_workers=0,
        progress=True,
    )


def method_defaults() -> dict:
    """Every method's own flags (names do not clash; a flag shared by two methods means the same)."""
    out: dict = {}
    for name in METHODS:
        out.update(method_class(name).flag_defaults())
    return out


def translation_defaults() -> dict:
    return {**shared_defaults(), **method_defaults()}


def create_argparser(description: Optional[str] = None, method: Optional[str] = None) -> argparse.ArgumentParser:
    """Every flag of every method; ``method`` (an entry point's fixed method) applies its default overrides."""
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model_keys = model_and_diffusion_defaults()
    add_dict_to_argparser(parser, {k: v for k, v in translation_defaults().items() if k not in model_keys})
    add_dict_to_argparser(parser, model_keys)
    parser.add_argument("--modality", type=int, nargs="+", default=[0, 3],
                        help="input channels used for the anomaly maps (BraTS: 0 FLAIR, 3 T2; ATLAS: 0)")
    parser.add_argument("--t_e_ratio", type=float, nargs="+", default=[1.0],
                        help="AnoFPDM: scale t_e before aggregating; the first value feeds metrics.json")
    parser.add_argument("--w", type=float, default=-1.0,
                        help="guidance weight (AnoFPDM: BraTS 2, ATLAS 30; DDIB: 1.1, 1.3); required by both")
    parser.add_argument("--num_batches", type=int, default=1, help="test batches; -1 = the whole test split")
    if method is not None:
        parser.set_defaults(method=method, **method_class(method).flag_overrides)
    return parser


def diffusion_grid_steps(args: argparse.Namespace) -> int:
    """Steps of the diffusion the methods run on (respaced with --timestep_respacing)."""
    if not args.timestep_respacing:
        return args.diffusion_steps
    from guided_diffusion.diffusion.respace import space_timesteps

    return len(space_timesteps(args.diffusion_steps, args.timestep_respacing))


def check_args(args: argparse.Namespace, world_size: int = 1, explicit: Optional[set] = None) -> None:
    """Validate and normalise flags in place; raises ValueError naming the flag.

    The model flags come from ``--model_dir``'s config.json when it has one (``explicit``: the flags given on the
    command line, see ``script_util.apply_run_config``), else from the command line (upstream checkpoint folders).
    The method's own flags are checked by ``method_class(args.method).check_args``.
    """
    cls = method_class(args.method)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        raise ValueError(f"--data_dir {args.data_dir!r} is not a folder (expected the one holding npy_val/, npy_test/)")
    if not args.model_dir or not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir!r} is not a folder holding model*.pt / ema_*.pt checkpoints")
    args.config_recorded = apply_run_config(args, args.model_dir, explicit) is not None
    if args.unet_ver not in UNET_VERSIONS:
        raise ValueError(f"unknown --unet_ver {args.unet_ver!r}; valid: {', '.join(UNET_VERSIONS)}")
    check_model_flags(args_to_dict(args, model_and_diffusion_defaults().keys()))
    for flag in ("num_panels", "num_workers"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    try:
        fileio.format_rate(args.ema_rate)
    except ValueError:
        raise ValueError(f"--ema_rate must be a number (e.g. 0.9999), got {args.ema_rate!r}") from None
    if args.unet_ver.startswith("hae") and not args.use_hae:
        raise ValueError(f"--unet_ver {args.unet_ver} needs --use_hae True (as upstream's configs pass it)")
    for flag in ("batch_size", "batch_size_val"):
        if getattr(args, flag) < world_size:
            raise ValueError(f"--{flag} {getattr(args, flag)} is global and must be >= the number of processes "
                             f"({world_size})")
    if args.num_batches == 0 or args.num_batches < -1:
        raise ValueError(f"--num_batches must be >= 1 or -1 (whole test split), got {args.num_batches}")
    if args.num_batches_val < -1:
        raise ValueError(f"--num_batches_val must be >= 0 or -1 (whole val split), got {args.num_batches_val}")
    if args.dynamic_clip:
        raise ValueError("--dynamic_clip True is not supported (upstream's configs use False)")
    if args.use_fp16 and args.precision == "fp32":
        args.precision = "fp16"  # upstream's flag, through autocast here
    args.use_fp16 = False
    runtime.check_precision(args.precision)
    if args.auprc_pooling not in AUPRC_POOLINGS:
        raise ValueError(f"--auprc_pooling must be one of {', '.join(AUPRC_POOLINGS)}, got {args.auprc_pooling!r}")
    if args.pr_pooling not in PR_POOLINGS:
        raise ValueError(f"--pr_pooling must be one of {', '.join(PR_POOLINGS)}, got {args.pr_pooling!r}")
    if args.hyperparams_file and not os.path.isfile(args.hyperparams_file):
        raise ValueError(f"--hyperparams_file {args.hyperparams_file!r} does not exist")
    if len(args.modality) == 0 or len(set(args.modality)) != len(args.modality):
        raise ValueError(f"--modality must list distinct channel indices, got {list(args.modality)}")
    if any(not 0 <= m < args.in_channels for m in args.modality):
        raise ValueError(f"--modality {list(args.modality)} out of range for --in_channels {args.in_channels}")
    args.cc_filter_size = component_size(args.cc_filter_size, args.image_size)
    check_median_kernel(args.median_kernel)
    if not args.median_filter:
        args.median_kernel = 1  # upstream's switch: no median filter
    if args.panel_modality == -1:
        args.panel_modality = args.modality[0]
    if not 0 <= args.panel_modality < args.in_channels:
        raise ValueError(f"--panel_modality {args.panel_modality} out of range for --in_channels {args.in_channels}")
    cls.check_args(args, diffusion_grid_steps(args))


def forward_config(args: argparse.Namespace) -> af.ForwardConfig:
    """AnoFPDM's forward-process options from the flags (``anofpdm.forward_config_from_args``)."""
    return af.forward_config_from_args(args)


# ------------------------------------------------------------------------------------------------------
# Per-batch result files
# ------------------------------------------------------------------------------------------------------



def batch_path(log_dir: str, split: str, world_size: int, rank: int, index: int) -> str:
    return os.path.join(log_dir, BATCH_DIR, f"{split}_ws{world_size}_r{rank}_b{index:05d}.npz")


def _batch_index(path: str) -> int:
    """The batch number k of a result file name (``..._b{k:05d}.npz``)."""
    return int(re.search(r"_b(\d+)\.npz$", path).group(1))


def _batch_rank(path: str) -> int:
    return int(re.search(r"_r(\d+)_b\d+\.npz$", path).group(1))


def load_batch(path: str, fingerprint: Optional[str] = None) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a finished batch, or None if missing, unreadable or computed with other settings."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception:  # truncated or corrupt: recompute
        return None
    if fingerprint is not None and str(data.get("fingerprint", "")) != fingerprint:
        return None
    return data


def interleave_ranks(parts: Sequence[Dict[str, np.ndarray]], keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """The rows of one global batch in a one-process run's order from the ranks' shares (rank r holds rows
    r, r + N, r + 2N, ...), for the arrays ``keys`` (first axis = slices)."""
    world = len(parts)
    position = np.concatenate([np.arange(len(p[keys[0]])) * world + r for r, p in enumerate(parts)])
    order = np.argsort(position, kind="stable")
    return {k: np.concatenate([p[k] for p in parts])[order] for k in keys}


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------


def eval_batches(args: argparse.Namespace, split: str, global_batch: int, num_batches: int,
                 with_files: bool = False) -> Iterator:
    """This rank's batches ``(x, gt_mask, label)`` of ``split``: at most ``num_batches`` (-1 = all).

    ``with_files``: ``(x, gt_mask, label, files)``, files the batch's slices as ``patient_<P>/slice_<z>.npz``.
    """
    from guided_diffusion.data.loaders import get_data_iter

    per_rank = global_batch // dist_util.get_world_size()  # val/test loaders take the per-rank batch
    loader = get_data_iter(
        args.name,
        args.data_dir,
        per_rank,
        split=split,
        ret_lab=True,
        mixed=True,
        seed=args.seed,
        use_weighted_sampler=args.use_weighted_sampler,
        num_workers=args.num_workers,
        image_size=args.image_size,  # the data must fit the model (and the component filter follows --image_size)
        in_channels=args.in_channels,
        flags_source=(f"{fileio.config_path(args.model_dir)}" if getattr(args, "config_recorded", False)
                      else "the command-line flags"),
    )
    if isinstance(loader, tuple):
        loader = loader[0]
    order = list(loader.sampler) if with_files else []  # the sampler's order is fixed: batch i is its i-th chunk
    for i, batch in enumerate(loader):
        if 0 <= num_batches <= i:
            break
        if with_files:
            rows = order[i * per_rank:(i + 1) * per_rank]
            batch = (*batch, [f"{loader.dataset.items[j].parent.name}/{loader.dataset.items[j].name}" for j in rows])
        yield batch


def batch_seed(args: argparse.Namespace, split: str, index: int) -> int:
    return (args.seed * 1_000_003 + (0 if split == "val" else 500_009) + index) % 2**63


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------

VALIDATION_REMEDY = (
    "validate on more slices (--num_batches_val -1: the whole val split; --use_weighted_sampler True: class-balanced "
    "batches) or preprocess with more validation subjects; pass --hyperparams_file (the hyperparams.json of a run "
    "with the same settings); or preprocess with --min_val_lesion_subjects 1, which puts a subject with a lesion "
    "into validation")
COLUMN = "col{}__{}"  # per-slice column of variant i in a test batch file
RECORD = "rec__{}"  # validation record
ARRAY = "arr__{}"  # per-slice array kept with --save_data


class Translation:
    """One run of ``args.method`` (see the module docstring). ``run()`` returns a summary dict."""

    def __init__(self, args: argparse.Namespace, method: Optional[SliceMethod] = None, log_dir: Optional[str] = None):
        self.args = args
        self.rank = dist_util.get_rank()
        self.world = dist_util.get_world_size()
        self.device = dist_util.dev()
        self.log_dir = log_dir or logger.get_dir() or os.getenv("OPENAI_LOGDIR") or "."
        self.image_dir = args.image_dir or self.log_dir
        self.method = method if method is not None else build_method(args.method, args, self.device)
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
                         else fp.split_fingerprint(self.args.data_dir, what, cache))
                cache.save()
            self._content[what] = dist_util.broadcast_object(value)
        return self._content[what]

    def _key(self, split: str, batch: int) -> dict:
        a = self.args
        model_flags = args_to_dict(a, (k for k in model_and_diffusion_defaults() if k not in diffusion_defaults()))
        return {
            "version": FILE_VERSION,
            "split": split,
            "method": self.method.name,
            "settings": self.method.settings(),
            "checkpoints": self.content("checkpoints"),
            "data": self.content(split),
            "order": (a.name, a.seed, a.use_weighted_sampler, batch, self.world),
            "model": model_flags,
            "diffusion": args_to_dict(a, diffusion_defaults()),
            "pixel_labels": self.method.uses_pixel_labels,
        }

    def _test_key(self, hyper: dict) -> str:
        return fp.json_digest({
            **self._key("test", self.args.batch_size),
            "hyper": {k: v for k, v in hyper.items() if k != "source"},
            "store": self.args.save_data,
        })

    # -- passes ---------------------------------------------------------------------------------------

    def _progress(self, total: Optional[int], desc: str, leave: bool = True):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=leave, disable=not (self.args.progress and self.rank == 0),
                    dynamic_ncols=True)

    def _context(self, split: str, index: int, global_batch: int, bar) -> BatchContext:
        # The noise is drawn per global batch and dealt out like the slices (rank r holds rows r::world of the
        # global batch, see data.ShardedOrderSampler), so each slice sees the same noise for any number of processes.
        bar.reset(total=self.method.steps_per_batch(split))
        bar.set_description(f"{split} batch {index} steps")
        gen = torch.Generator().manual_seed(batch_seed(self.args, split, index))
        return BatchContext(gen, rows=(global_batch // self.world) * self.world, rank=self.rank, world=self.world,
                            progress=bar.update)

    def read_hyperparams(self) -> dict:
        """``--hyperparams_file``, else the method's recorded values (``--num_batches_val 0``), checked."""
        a = self.args
        if a.hyperparams_file:
            try:
                with open(a.hyperparams_file) as f:
                    hyper = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"--hyperparams_file {a.hyperparams_file} cannot be read as JSON: {e}; pass the "
                                 "hyperparams.json of an earlier run with the same settings, or validate "
                                 "(--num_batches_val N)") from None
            if not isinstance(hyper, dict):
                raise ValueError(f"--hyperparams_file {a.hyperparams_file} must hold a JSON object (a run's "
                                 "hyperparams.json)")
            hyper = dict(hyper, source=f"file {a.hyperparams_file}")
        else:
            hyper = self.method.hyperparams_without_validation()
        try:
            return self.method.check_hyperparams(hyper)
        except ValueError as e:
            raise ValueError(f"hyper-parameters from {hyper.get('source', '?')} do not fit --method "
                             f"{self.method.name}: {e}") from None

    def validation(self) -> dict:
        a = self.args
        if a.num_batches_val == 0:
            return self.read_hyperparams()
        key = fp.json_digest(self._key("val", a.batch_size_val))
        pixel = self.method.uses_pixel_labels
        paths: List[str] = []
        outer = self._progress(None if a.num_batches_val < 0 else a.num_batches_val, "validation batches")
        inner = self._progress(self.method.steps_per_batch("val"), "steps", leave=False)
        for k, (x, gt, lab) in enumerate(eval_batches(a, "val", a.batch_size_val, a.num_batches_val)):
            path = batch_path(self.log_dir, "val", self.world, self.rank, k)
            paths.append(path)
            if a.resume and load_batch(path, key) is not None:
                self.summary["reused"]["val"] += 1
            else:
                records = self.method.validation_batch(x.to(self.device).float(),
                                                       self._context("val", k, a.batch_size_val, inner))
                data = {"fingerprint": np.array(key), "label": lab.cpu().numpy().astype(np.int64),
                        **{RECORD.format(n): np.asarray(v) for n, v in records.items()}}
                if pixel:
                    data["gt"] = gt.cpu().numpy() > 0.5
                fileio.save_npz(path, data)
                self.summary["computed"]["val"] += 1
            outer.update(1)
        inner.close()
        outer.close()
        all_paths = self._gathered(paths)
        hyper = None
        if self.rank == 0:  # every rank's batches are in the shared log folder: fit once, tell the others
            hyper = self._fit(all_paths, key)
            fileio.write_json(os.path.join(self.log_dir, "hyperparams.json"), hyper)
        return dist_util.broadcast_object(hyper)

    def _fit(self, paths: List[str], key: str) -> dict:
        batches = []
        for _, group in itertools.groupby(paths, key=_batch_index):
            parts = [load_batch(p, key) for p in group]
            if any(p is None for p in parts):
                raise FileNotFoundError(f"validation result files of batch {_batch_index(paths[0])} are missing or "
                                        "stale; the log folder must be shared by all ranks")
            names = [n for n in parts[0] if n != "fingerprint"]
            batches.append(interleave_ranks(parts, names))
        if not batches or not sum(len(b["label"]) for b in batches):
            raise ValueError(f"the validation split of {self.args.data_dir} gave no slices")
        merged = {n: np.concatenate([b[n] for b in batches]) for n in batches[0]}
        records = {n[len(RECORD.format("")):]: v for n, v in merged.items() if n.startswith(RECORD.format(""))}
        gt = merged.get("gt") if self.method.uses_pixel_labels else None
        try:
            hyper = self.method.fit(records, merged["label"], gt)
        except HyperparameterError as e:  # nothing is written; the validation batches stay cached
            labels = merged["label"]
            raise HyperparameterError(
                f"{e}. Validation had {len(labels)} slice(s), {int((labels == 1).sum())} unhealthy, in {len(batches)} "
                f"batch(es) from {os.path.join(self.args.data_dir, 'npy_val')}. To fix it: {VALIDATION_REMEDY}"
            ) from None
        return dict(hyper, pixel_labels_used=self.method.uses_pixel_labels)

    def test(self, hyper: dict) -> List[str]:
        a = self.args
        key = self._test_key(hyper)
        paths = []
        outer = self._progress(None if a.num_batches < 0 else a.num_batches, "test batches")
        inner = self._progress(self.method.steps_per_batch("test"), "steps", leave=False)
        for k, (x, gt, lab, files) in enumerate(eval_batches(a, "test", a.batch_size, a.num_batches, True)):
            path = batch_path(self.log_dir, "test", self.world, self.rank, k)
            paths.append(path)
            if a.resume and load_batch(path, key) is not None:
                self.summary["reused"]["test"] += 1
                outer.update(1)
                continue
            xd = x.to(self.device).float()
            out = self.method.test_batch(xd, hyper, self._context("test", k, a.batch_size, inner))
            out.check(x.shape[0], x.shape[-2], x.shape[-1], self.method.name)
            x_np = x.cpu().float().numpy()
            data = {
                "fingerprint": np.array(key),
                "slice_file": np.array(files),  # patient and z: per-volume metrics
                "label": lab.cpu().numpy().astype(np.int64),
                "gt": gt.cpu().numpy() > 0.5,
                "foreground": foreground_mask(x_np),
                "panel_input": x_np[:, [a.panel_modality]].astype(np.float16),
            }
            for i, o in enumerate([out] + out.variants):
                data[f"anomaly_map_{i}"] = o.anomaly_map.detach().cpu().float().numpy()
                data[f"mask_{i}"] = o.mask.detach().cpu().numpy().astype(bool)
                data[f"pred_label_{i}"] = o.pred_label.detach().cpu().numpy().astype(np.int64)
                data.update({COLUMN.format(i, n): np.asarray(v) for n, v in o.columns.items()})
            if a.save_data:
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
                          key=lambda p: (_batch_index(p), _batch_rank(p)))
        dist_util.barrier()
        return everyone

    # -- evaluation and outputs (rank 0) ---------------------------------------------------------------

    def evaluate(self, paths: List[str], hyper: dict) -> dict:
        a = self.args
        key = self._test_key(hyper)
        missing = [p for p in paths if load_batch(p, key) is None]
        if missing:
            raise FileNotFoundError(f"{len(missing)} test result files are missing or stale, e.g. {missing[0]}; "
                                    "the log folder must be shared by all ranks")
        m = self.method
        variants = m.variants()
        results = []
        for i, value in enumerate(variants):
            res = evaluate_segmentation(_ResultBatches(paths, i), auprc_pooling=a.auprc_pooling,
                                        pr_pooling=a.pr_pooling)
            if m.variant_key:
                res[m.variant_key] = value
            results.append(res)
        metrics = dict(results[0])
        metrics["method"] = m.name
        metrics["pixel_labels_used"] = m.uses_pixel_labels
        metrics["hyperparams"] = hyper
        metrics["checkpoint"] = self.checkpoint
        metrics["checkpoints"] = m.checkpoints()
        metrics["settings"] = {**m.settings(), "batch_size": a.batch_size, "num_batches": a.num_batches,
                               "world_size": self.world, "auprc_pooling": a.auprc_pooling,
                               "pr_pooling": a.pr_pooling}
        if len(results) > 1:
            metrics[f"by_{m.variant_key}"] = {str(r[m.variant_key]): r for r in results}
        per_volume = test_split_volumes(_ResultBatches(paths, 0), paths, a.data_dir,
                                        os.path.join(self.log_dir, "per_volume.csv"))
        if per_volume is not None:
            metrics["per_volume"] = per_volume
            logger.log(f"per volume: {per_volume['n_volumes']} complete test patient(s), Dice "
                       f"{(per_volume.get('with_lesion') or {}).get('dice')} (with a lesion; per_volume.csv)")
        fileio.write_json(os.path.join(self.log_dir, "metrics.json"), metrics)
        self._write_metrics_csv(results)
        self._write_per_slice(paths)
        if a.num_panels > 0:
            self._write_panels(paths)
        if a.save_data:
            self._write_arrays(paths)
        return metrics

    def _write_metrics_csv(self, results: List[dict]) -> None:
        m = self.method
        lead = [m.variant_key] if m.variant_key else []
        cols = lead + ["setup", "dice", "iou", "auprc", "auroc", "precision", "recall", "n_slices", "accuracy",
                       "method", "pixel_labels_used"]
        rows = []
        for r in results:
            for setup in ("mixed", "unhealthy"):
                row = {"setup": setup, "accuracy": r["accuracy"], "method": m.name,
                       "pixel_labels_used": m.uses_pixel_labels,
                       **{c: r[setup].get(c) for c in ("dice", "iou", "auprc", "auroc", "precision", "recall",
                                                       "n_slices")}}
                row.update({k: r[k] for k in lead})
                rows.append(row)
        fileio.write_csv(os.path.join(self.log_dir, "metrics.csv"), cols, rows)

    @staticmethod
    def _columns(d: Dict[str, np.ndarray], i: int = 0) -> Dict[str, np.ndarray]:
        prefix = COLUMN.format(i, "")
        return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}

    @staticmethod
    def _flat_columns(columns: Dict[str, np.ndarray], n: int) -> Dict[str, Any]:
        """Row ``n`` of the per-slice columns; ``[B, k]`` columns become ``name_m0 .. name_m{k-1}``."""
        row: Dict[str, Any] = {}
        for name, v in columns.items():
            v = np.asarray(v)
            if v.ndim == 1:
                row[name] = v[n].item()
            else:
                row.update({f"{name}_m{j}": x.item() for j, x in enumerate(v[n].reshape(-1))})
        return row

    def _write_per_slice(self, paths: List[str]) -> None:
        cols = ["file", "index", "label", "pred_label", "dice", "iou", "gt_pixels", "pred_pixels"]
        rows = []
        for p in paths:
            d = load_batch(p)
            dice, iou = dice_iou_per_slice(d["mask_0"], d["gt"])
            extra = self._columns(d)
            for n in range(d["label"].shape[0]):
                row = {"file": os.path.basename(p), "index": n, "label": int(d["label"][n]),
                       "pred_label": int(d["pred_label_0"][n]), "dice": float(dice[n]), "iou": float(iou[n]),
                       "gt_pixels": int(d["gt"][n].sum()), "pred_pixels": int(d["mask_0"][n].sum())}
                row.update(self._flat_columns(extra, n))
                cols.extend(c for c in row if c not in cols)
                rows.append(row)
        fileio.write_csv(os.path.join(self.log_dir, "per_slice.csv"), cols, rows)

    def _write_panels(self, paths: List[str]) -> None:
        from guided_diffusion.evaluation.visualize import save_panels

        want = self.args.num_panels
        picked: List[tuple] = []  # unhealthy slices first, then healthy ones, in file order
        for wanted_label in (1, 0):
            for p in paths:
                if len(picked) >= want:
                    break
                d = load_batch(p)
                for n in np.flatnonzero(d["label"] == wanted_label):
                    if len(picked) >= want:
                        break
                    picked.append((d, int(n)))
        if not picked:
            return
        images, gts, maps, masks, captions = [], [], [], [], []
        tag = f"{self.method.name}{' (pixel labels used)' if self.method.uses_pixel_labels else ''}"
        for d, n in picked:
            dice, _ = dice_iou_per_slice(d["mask_0"][n:n + 1], d["gt"][n:n + 1])
            images.append(d["panel_input"][n, 0].astype(np.float32))
            gts.append(d["gt"][n, 0])
            maps.append(d["anomaly_map_0"][n, 0])
            masks.append(d["mask_0"][n, 0])
            cols = self._columns(d)
            shown = "  ".join(f"{c} {_short(np.asarray(cols[c])[n])}" for c in self.method.caption_columns if c in cols)
            captions.append(f"{tag}: label {int(d['label'][n])}  predicted {int(d['pred_label_0'][n])}  "
                            f"dice {dice[0]:.3f}  {shown}".rstrip())
        out = os.path.join(self.image_dir, "panels.png")
        save_panels(out, images, gts, maps, masks, captions)
        logger.log(f"panels: {out}")

    def _write_arrays(self, paths: List[str]) -> None:
        parts: Dict[str, List[np.ndarray]] = {}
        for p in paths:
            d = load_batch(p)
            picked = {"source": d["source"], "gt": d["gt"], "anomaly_map": d["anomaly_map_0"],
                      "pred_mask_all": d["mask_0"], "label": d["label"], "pred_label": d["pred_label_0"],
                      **self._columns(d),
                      **{k[len(ARRAY.format("")):]: v for k, v in d.items() if k.startswith(ARRAY.format(""))}}
            for k, v in picked.items():
                parts.setdefault(k, []).append(v)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        arrays["pred_mask"] = arrays["pred_mask_all"] & (arrays["pred_label"] == 1)[:, None, None, None]
        fileio.save_npz(os.path.join(self.image_dir, "per_slice_arrays.npz"), arrays)

    # -- driver ---------------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        a = self.args
        t0 = time.time()
        if self.rank == 0:  # before any rank writes: partial files of a killed run go
            for folder in {self.log_dir, os.path.join(self.log_dir, BATCH_DIR), self.image_dir}:
                fileio.sweep_temp_files(folder, warn=logger.warn)
        if not a.resume and self.rank == 0:
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
            for setup in ("mixed", "unhealthy"):
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


class _ResultBatches:
    """The test results of variant ``i`` as global batches, read from the batch files on each pass.

    The ranks' batch k together are exactly the global batch k of a single-process run. Re-iterable, so the
    global AUPRC can make its two passes without holding every pixel in memory.
    """

    def __init__(self, paths: List[str], i: int):
        self.paths, self.i = paths, i

    def __iter__(self) -> Iterator[dict]:
        for _, group in itertools.groupby(self.paths, key=_batch_index):
            ds = [load_batch(p) for p in group]
            batch = {name: np.concatenate([d[src] for d in ds]) for name, src in (
                ("label", "label"), ("pred_label", f"pred_label_{self.i}"), ("gt", "gt"),
                ("pred_mask", f"mask_{self.i}"), ("anomaly_map", f"anomaly_map_{self.i}"),
                ("foreground", "foreground"))}
            if all("slice_file" in d for d in ds):
                batch["slice_file"] = np.concatenate([d["slice_file"] for d in ds])
            yield batch


def _fmt(v: Any) -> str:
    return "null" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _short(v: Any) -> str:
    v = np.asarray(v)
    if v.ndim:
        return str([_short(x) for x in v.tolist()]).replace("'", "")
    return f"{v.item():.4g}" if np.issubdtype(v.dtype, np.floating) else str(v.item())


@entry_point
def main(argv: Optional[Sequence[str]] = None, unet_ver: Optional[str] = None,
         method: Optional[str] = None) -> Dict[str, Any]:
    """Command-line entry point. ``method`` fixes the method (the upstream-named scripts: translation_HEALTHY.py is
    anoddpm, ...) and applies its default flags; ``unet_ver`` fixes the variant (the per-variant alias scripts)."""
    if method is None:  # --method picks the method, and with it the defaults of its flags
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--method", default="anofpdm")
        chosen = pre.parse_known_args(argv)[0].method
    else:
        chosen = method
    parser = create_argparser(method=chosen)  # an unknown --method is a user error (errors.entry_point)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    if method is not None and args.method != method:
        parser.error(f"this script runs --method {method}; got --method {args.method}")
    if unet_ver is not None:  # the alias scripts fix the variant (a choice as explicit as a flag)
        args.unet_ver = unet_ver
        args.use_hae = unet_ver.startswith("hae")
        explicit |= {"unet_ver", "use_hae"}
    dist_util.setup_dist()
    try:
        try:
            check_args(args, dist_util.get_world_size(), explicit)
        except fileio.RunConfigError as e:  # not a usage problem: no usage dump
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        except ValueError as e:
            parser.error(str(e))
        logger.configure()
        runtime.configure_threads()
        logger.log(f"args: {vars(args)}")
        logger.log(runtime.thread_summary())
        runtime.seed_everything(args.seed)
        return Translation(args).run()  # user errors: one message and exit code 2 (errors.entry_point)
    finally:
        dist_util.cleanup_dist()
