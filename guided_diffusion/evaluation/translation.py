"""The AnoFPDM translation run: load a checkpoint, validate, test, evaluate, write metrics and pictures.

Flow (every step resumable; ``scripts/translation_FPDM.py`` is the command-line entry point):

1. Load ``model{step:06d}.pt`` (or ``ema_{rate}_{step:06d}.pt`` with ``--ema True``) from ``--model_dir``, into
   the model its ``config.json`` describes (written by training; explicit flags that contradict it are an error),
   or, for an upstream folder without one, into the model the flags describe.
2. Validation (``--num_batches_val`` batches of ``--batch_size_val`` slices, labels only): the forward
   process per slice, then the cosine threshold ``thr_01`` and ``M_max`` (``hyperparams.json``). With
   ``--num_batches_val 0`` the values come from ``--hyperparams_file`` or upstream's recorded fallbacks (only
   for upstream's forward function and guidance weight; refused otherwise).
3. Test (``--num_batches`` batches of ``--batch_size`` slices; -1 = the whole split): per slice the
   classification, t_e, the aggregated map, Algorithm 1's threshold, median filter and small-component
   removal.
4. Rank 0 evaluates every test batch: ``metrics.json`` (keys ``mixed`` and ``unhealthy`` with ``dice``,
   ``iou``, ``auprc`` pooled over the whole test set, plus ``accuracy``), ``metrics.csv``, ``per_slice.csv``, PNG panels and, with
   ``--save_data True``, ``per_slice_arrays.npz``.

Batch sizes are global: with N processes each takes ``batch_size // N`` slices per batch from its own
shard of the split (slices are drawn without replacement and never repeat across ranks or batches).
Each finished batch is written atomically to ``$OPENAI_LOGDIR/batches/`` together with a fingerprint of
everything that determines its result; a restarted run reuses every batch whose fingerprint matches.
The log folder must be visible to every rank (one machine, or a shared file system).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from guided_diffusion.methods import anofpdm as af
from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.evaluation.metrics import (
    AUPRC_POOLINGS,
    dice_iou_per_slice,
    evaluate_segmentation,
    foreground_mask,
)
from guided_diffusion.runtime import PRECISIONS
from guided_diffusion.script_util import (
    UNET_VERSIONS,
    add_dict_to_argparser,
    apply_run_config,
    args_to_dict,
    explicit_flags,
    load_model_from_dir,
    model_and_diffusion_defaults,
)

BATCH_DIR = "batches"
FILE_VERSION = 3  # 3: classification on the guided MSE in every map mode, pixel-count component filter


# ------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------


def translation_defaults() -> dict:
    """Upstream ``translation_FPDM.py`` flags and defaults, then this project's additions."""
    return dict(
        name="brats",
        data_dir="",
        image_dir="",
        model_dir="",
        batch_size=32,
        forward_steps=600,
        model_num="",  # "" = the latest checkpoint in --model_dir
        ema=False,
        null=True,  # paper: encode with the null embedding (upstream's default False crashed); False: healthy label
        save_data=False,
        num_batches_val=2,
        batch_size_val=100,
        d_reverse=True,
        median_filter=True,
        dynamic_clip=False,
        last_only=False,
        subset_interval=-1,
        seed=0,
        use_weighted_sampler=False,
        use_gradient_sam=False,
        use_gradient_para_sam=False,
        threshold=-1.0,  # accepted for upstream command lines; unused at inference
        # additions
        ugp_mode="null",
        legacy_ddim_encoding=False,
        include_t_e=False,
        ema_rate="0.9999",
        cc_filter_size=-1,  # -1: upstream's 40 px at 128², scaled with the image area
        quantile_a=af.A_QUANTILE,
        quantile_b=af.B_QUANTILE,
        auprc_pooling="global",  # exact over the whole test set; "batch": upstream's per-batch pooling
        hyperparams_file="",
        num_panels=8,
        panel_modality=-1,
        resume=True,
        precision="fp32",
        num_workers=0,
        progress=True,
    )


def create_argparser(description: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model_keys = model_and_diffusion_defaults()
    add_dict_to_argparser(parser, {k: v for k, v in translation_defaults().items() if k not in model_keys})
    add_dict_to_argparser(parser, model_keys)
    parser.add_argument("--modality", type=int, nargs="+", default=[0, 3],
                        help="input channels used for the anomaly maps (BraTS: 0 FLAIR, 3 T2; ATLAS: 0)")
    parser.add_argument("--t_e_ratio", type=float, nargs="+", default=[1.0],
                        help="scale t_e before aggregating; the first value feeds metrics.json")
    parser.add_argument("--w", type=float, default=-1.0, help="guidance weight (paper: BraTS 2, ATLAS 30); required")
    parser.add_argument("--num_batches", type=int, default=1, help="test batches; -1 = the whole test split")
    return parser


def check_args(args: argparse.Namespace, world_size: int = 1, explicit: Optional[set] = None) -> None:
    """Validate and normalise flags in place; raises ValueError naming the flag.

    The model flags come from ``--model_dir``'s config.json when it has one (``explicit``: the flags given on the
    command line, see ``script_util.apply_run_config``), else from the command line (upstream checkpoint folders).
    """
    if not args.data_dir or not os.path.isdir(args.data_dir):
        raise ValueError(f"--data_dir {args.data_dir!r} is not a folder (expected the one holding npy_val/, npy_test/)")
    if not args.model_dir or not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir!r} is not a folder holding model*.pt / ema_*.pt checkpoints")
    recorded = apply_run_config(args, args.model_dir, explicit)
    if args.unet_ver not in UNET_VERSIONS:
        raise ValueError(f"unknown --unet_ver {args.unet_ver!r}; valid: {', '.join(UNET_VERSIONS)}")
    if args.unet_ver != "v2" and not args.use_hae:
        raise ValueError(f"--unet_ver {args.unet_ver} needs --use_hae True (as upstream's configs pass it)")
    if args.num_classes < 1 or (recorded is not None and not args.class_cond):
        raise ValueError("AnoFPDM needs a class-conditional model: --num_classes must be >= 1 (2 in the configs)"
                         + (f"; {fileio.config_path(args.model_dir)} records an unconditional one" if recorded else ""))
    args.class_cond = True  # upstream: num_classes > 0 means class-conditional
    if args.w < 0:
        raise ValueError(f"--w {args.w}: pass the guidance weight (>= 0; paper: BraTS 2, ATLAS 30). Upstream's "
                         "default -1 silently disabled guidance")
    grid = args.diffusion_steps
    if args.timestep_respacing:  # forward steps then count on the respaced grid (e.g. ddim100: 60 steps ~ t <= 600)
        from guided_diffusion.diffusion.respace import space_timesteps

        grid = len(space_timesteps(args.diffusion_steps, args.timestep_respacing))
    if args.forward_steps < 1 or args.forward_steps > grid:
        raise ValueError(f"--forward_steps must lie in [1, {grid}] (the diffusion's steps"
                         f"{', respaced' if args.timestep_respacing else ''}), got {args.forward_steps}")
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
    if args.use_gradient_sam and args.use_gradient_para_sam:
        raise ValueError("--use_gradient_sam and --use_gradient_para_sam are exclusive")
    if args.use_fp16 and args.precision == "fp32":
        args.precision = "fp16"  # upstream's flag, through autocast here
    args.use_fp16 = False
    runtime.check_precision(args.precision)
    if args.auprc_pooling not in AUPRC_POOLINGS:
        raise ValueError(f"--auprc_pooling must be one of {', '.join(AUPRC_POOLINGS)}, got {args.auprc_pooling!r}")
    if not 0 <= args.quantile_a <= args.quantile_b <= 1:
        raise ValueError(f"need 0 <= --quantile_a ({args.quantile_a}) <= --quantile_b ({args.quantile_b}) <= 1")
    if args.hyperparams_file and not os.path.isfile(args.hyperparams_file):
        raise ValueError(f"--hyperparams_file {args.hyperparams_file!r} does not exist")
    if args.cc_filter_size < 0:
        args.cc_filter_size = int(round(40 * (args.image_size / 128) ** 2))
    if args.panel_modality == -1:
        args.panel_modality = args.modality[0]
    if not 0 <= args.panel_modality < args.in_channels:
        raise ValueError(f"--panel_modality {args.panel_modality} out of range for --in_channels {args.in_channels}")
    forward_config(args).validate(args.in_channels)


def forward_config(args: argparse.Namespace) -> af.ForwardConfig:
    sub = "gradient" if args.use_gradient_sam else ("gradient_para" if args.use_gradient_para_sam else "input")
    return af.ForwardConfig(
        w=args.w,
        forward_steps=args.forward_steps,
        modality=list(args.modality),
        ddim=args.d_reverse,
        ugp_mode=args.ugp_mode,
        encode_null=args.null,
        legacy_ddim_encoding=args.legacy_ddim_encoding,
        sub_anomaly=sub,
        last_only=args.last_only,
        interval=args.subset_interval if args.subset_interval > 0 else 1,
        include_end=args.include_t_e,
        store_maps=any(r != 1 for r in args.t_e_ratio),
    )


# ------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------


def load_model(args: argparse.Namespace, device: torch.device):
    """(model in eval mode on ``device``, diffusion, checkpoint path): ``--model_num`` (empty: the newest readable
    checkpoint), ``--ema``, built from the model flags (``check_args`` took them from config.json if there is one)."""
    return load_model_from_dir(args.model_dir, args_to_dict(args, model_and_diffusion_defaults().keys()),
                               model_num=args.model_num, ema=args.ema, ema_rate=args.ema_rate, device=device,
                               warn=logger.warn)


# ------------------------------------------------------------------------------------------------------
# Per-batch result files
# ------------------------------------------------------------------------------------------------------


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def batch_path(log_dir: str, split: str, world_size: int, rank: int, index: int) -> str:
    return os.path.join(log_dir, BATCH_DIR, f"{split}_ws{world_size}_r{rank}_b{index:05d}.npz")


def _batch_index(path: str) -> int:
    """The batch number k of a result file name (``..._b{k:05d}.npz``)."""
    return int(re.search(r"_b(\d+)\.npz$", path).group(1))


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


def _batch_seed(args: argparse.Namespace, split: str, index: int) -> int:
    return (args.seed * 1_000_003 + (0 if split == "val" else 500_009) + index) % 2**63


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


class Translation:
    """One translation run (see the module docstring). ``run()`` returns a summary dict."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank = dist_util.get_rank()
        self.world = dist_util.get_world_size()
        self.device = dist_util.dev()
        self.log_dir = logger.get_dir() or os.getenv("OPENAI_LOGDIR") or "."
        self.image_dir = args.image_dir or self.log_dir
        self.cfg = forward_config(args)
        self.model, self.diffusion, self.checkpoint = load_model(args, self.device)
        self.process = af.ForwardProcess(self.model, self.diffusion, self.cfg, PRECISIONS[args.precision])
        self.summary: Dict[str, Any] = {"computed": {"val": 0, "test": 0}, "reused": {"val": 0, "test": 0}}

    # -- fingerprints ---------------------------------------------------------------------------------

    def _forward_key(self, split: str, batch: int) -> dict:
        a = self.args
        st = os.stat(self.checkpoint)
        return {
            "version": FILE_VERSION,
            "split": split,
            "checkpoint": os.path.abspath(self.checkpoint),
            "checkpoint_size": st.st_size,
            "checkpoint_mtime": int(st.st_mtime),
            "data": (os.path.abspath(a.data_dir), a.name, a.seed, a.use_weighted_sampler, batch, self.world),
            "forward": {k: v for k, v in vars(self.cfg).items() if k != "store_maps"},
            "diffusion": (a.diffusion_steps, a.noise_schedule, a.timestep_respacing, a.rescale_timesteps),
            "precision": a.precision,
        }

    def _test_key(self, hyper: af.Hyperparams) -> str:
        a = self.args
        return _fingerprint({
            **self._forward_key("test", a.batch_size),
            "hyper": (hyper.thr_01, list(hyper.diff_max)),
            "t_e_ratio": list(a.t_e_ratio),
            "post": (a.median_filter, a.cc_filter_size, a.quantile_a, a.quantile_b),
            "store": a.save_data,
        })

    # -- passes ---------------------------------------------------------------------------------------

    def _progress(self, total: int, desc: str, leave: bool = True):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=leave, disable=not (self.args.progress and self.rank == 0),
                    dynamic_ncols=True)

    def _run_forward(self, x: torch.Tensor, split: str, index: int, global_batch: int, with_maps: bool,
                     bar) -> af.ForwardResult:
        # Noise is drawn per global batch and dealt out like the slices (rank r holds rows r::world of the global
        # batch, see data.ShardedOrderSampler), so each slice sees the same noise for any number of processes.
        gen = torch.Generator().manual_seed(_batch_seed(self.args, split, index))
        rows = (global_batch // self.world) * self.world
        bar.reset(total=self.cfg.forward_steps)
        bar.set_description(f"{split} batch {index} forward steps")
        return self.process.run(x.to(self.device).float(), with_maps=with_maps, generator=gen, progress=bar.update,
                                noise_rows=(rows, self.rank, self.world))

    def validation(self) -> af.Hyperparams:
        a = self.args
        if a.num_batches_val == 0:
            if a.hyperparams_file:
                with open(a.hyperparams_file) as f:
                    hyper = af.Hyperparams.from_dict(json.load(f))
                hyper.source = f"file {a.hyperparams_file}"
            else:
                hyper = af.upstream_fallback_hyperparams(a.name, a.forward_steps, len(a.modality), self.cfg)
            if len(hyper.diff_max) != len(a.modality):
                raise ValueError(f"hyper-parameters from {hyper.source} have {len(hyper.diff_max)} modalities; "
                                 f"--modality gives {len(a.modality)}")
            return hyper
        key = _fingerprint(self._forward_key("val", a.batch_size_val))
        parts: List[Dict[str, np.ndarray]] = []
        outer = self._progress(None if a.num_batches_val < 0 else a.num_batches_val, "validation batches")
        inner = self._progress(self.cfg.forward_steps, "forward steps", leave=False)
        for k, (x, _gt, lab) in enumerate(eval_batches(a, "val", a.batch_size_val, a.num_batches_val)):
            path = batch_path(self.log_dir, "val", self.world, self.rank, k)
            data = load_batch(path, key) if a.resume else None
            if data is None:
                res = self._run_forward(x, "val", k, a.batch_size_val, with_maps=False, bar=inner)
                data = {"fingerprint": np.array(key), "label": lab.cpu().numpy().astype(np.int64),
                        **res.stats.to_numpy()}
                fileio.save_npz(path, data)
                self.summary["computed"]["val"] += 1
            else:
                self.summary["reused"]["val"] += 1
            parts.append(data)
            outer.update(1)
        inner.close()
        outer.close()
        # every rank gets every rank's per-slice curves (small: [N, T, M]) and computes the same values
        mine = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0,)) for k in
                ("label", "mse_guided", "mse_unguided", "divergence", "sam_mean")}
        gathered = [g for g in dist_util.gather_objects(mine) if g["label"].size]
        if not gathered:
            raise ValueError(f"the validation split of {a.data_dir} gave no slices")
        labels = torch.from_numpy(np.concatenate([g["label"] for g in gathered]))
        stats = af.StepStats.from_numpy({k: np.concatenate([g[k] for g in gathered]) for k in
                                         ("mse_guided", "mse_unguided", "divergence", "sam_mean")})
        hyper = af.fit_hyperparams(stats, labels)
        if self.rank == 0:
            path = os.path.join(self.log_dir, "hyperparams.json")
            _write_json_atomic(path, hyper.to_dict())
        return hyper

    def test(self, hyper: af.Hyperparams) -> List[str]:
        a = self.args
        key = self._test_key(hyper)
        paths = []
        outer = self._progress(None if a.num_batches < 0 else a.num_batches, "test batches")
        inner = self._progress(self.cfg.forward_steps, "forward steps", leave=False)
        median = 5 if a.median_filter else 1
        for k, (x, gt, lab, files) in enumerate(eval_batches(a, "test", a.batch_size, a.num_batches, True)):
            path = batch_path(self.log_dir, "test", self.world, self.rank, k)
            paths.append(path)
            if a.resume and load_batch(path, key) is not None:
                self.summary["reused"]["test"] += 1
                outer.update(1)
                continue
            res = self._run_forward(x, "test", k, a.batch_size, with_maps=True, bar=inner)
            x_np = x.cpu().float().numpy()
            data = {
                "fingerprint": np.array(key),
                "slice_file": np.array(files),  # patient and z: per-volume metrics
                "label": lab.cpu().numpy().astype(np.int64),
                "gt": gt.cpu().numpy() > 0.5,
                "foreground": foreground_mask(x_np),
                "panel_input": x_np[:, [a.panel_modality]].astype(np.float16),
                **{f"stats_{n}": v for n, v in res.stats.to_numpy().items()},
            }
            if a.save_data:
                data["source"] = x_np.astype(np.float32)
            for i, ratio in enumerate(a.t_e_ratio):
                seg = af.segment_batch(res, hyper, self.cfg, t_e_ratio=ratio, median_kernel=median,
                                       cc_max_size=a.cc_filter_size, a=a.quantile_a, b=a.quantile_b)
                if i == 0:
                    data["similarity"] = seg["similarity"].cpu().numpy()
                    data["pred_label"] = seg["pred_label"].cpu().numpy().astype(np.int64)
                    data["quantile"] = seg["quantile"].cpu().numpy()
                data[f"end_step_{i}"] = seg["end_step"].cpu().numpy()
                data[f"threshold_{i}"] = seg["threshold"].cpu().numpy()
                data[f"anomaly_map_{i}"] = seg["anomaly_map"].cpu().float().numpy()
                data[f"mask_{i}"] = seg["mask"].cpu().numpy().astype(bool)
            fileio.save_npz(path, data)
            self.summary["computed"]["test"] += 1
            outer.update(1)
        inner.close()
        outer.close()
        return paths

    # -- evaluation and outputs (rank 0) ---------------------------------------------------------------

    def evaluate(self, paths: List[str], hyper: af.Hyperparams) -> dict:
        a = self.args
        key = self._test_key(hyper)
        missing = [p for p in paths if load_batch(p, key) is None]
        if missing:
            raise FileNotFoundError(f"{len(missing)} test result files are missing or stale, e.g. {missing[0]}; "
                                    "the log folder must be shared by all ranks")

        results = []
        for i, ratio in enumerate(a.t_e_ratio):
            res = evaluate_segmentation(_ResultBatches(paths, i), auprc_pooling=a.auprc_pooling)
            res["t_e_ratio"] = ratio
            results.append(res)
        metrics = dict(results[0])
        metrics["hyperparams"] = hyper.to_dict()
        metrics["checkpoint"] = self.checkpoint
        metrics["settings"] = {
            "w": a.w, "forward_steps": a.forward_steps, "modality": list(a.modality), "d_reverse": a.d_reverse,
            "ugp_mode": a.ugp_mode, "null": a.null, "legacy_ddim_encoding": a.legacy_ddim_encoding,
            "last_only": a.last_only, "include_t_e": a.include_t_e, "subset_interval": a.subset_interval,
            "batch_size": a.batch_size, "num_batches": a.num_batches, "world_size": self.world,
            "auprc_pooling": a.auprc_pooling,
        }
        if len(results) > 1:
            metrics["by_t_e_ratio"] = {str(r["t_e_ratio"]): r for r in results}
        from guided_diffusion.evaluation.volumes import test_split_volumes

        per_volume = test_split_volumes(_ResultBatches(paths, 0), paths, a.data_dir,
                                        os.path.join(self.log_dir, "per_volume.csv"))
        if per_volume is not None:
            metrics["per_volume"] = per_volume
            logger.log(f"per volume: {per_volume['n_volumes']} complete test patient(s), Dice "
                       f"{(per_volume.get('with_lesion') or {}).get('dice')} (with a lesion; per_volume.csv)")
        _write_json_atomic(os.path.join(self.log_dir, "metrics.json"), metrics)
        self._write_metrics_csv(results)
        self._write_per_slice(paths)
        if a.num_panels > 0:
            self._write_panels(paths)
        if a.save_data:
            self._write_arrays(paths)
        return metrics

    def _write_metrics_csv(self, results: List[dict]) -> None:
        cols = ["t_e_ratio", "setup", "dice", "iou", "auprc", "auroc", "precision", "recall", "n_slices", "accuracy"]
        rows = []
        for r in results:
            for setup in ("mixed", "unhealthy"):
                rows.append({"t_e_ratio": r["t_e_ratio"], "setup": setup, "accuracy": r["accuracy"],
                             **{c: r[setup].get(c) for c in cols[2:9]}})
        _write_csv_atomic(os.path.join(self.log_dir, "metrics.csv"), cols, rows)

    def _write_per_slice(self, paths: List[str]) -> None:
        m = len(self.args.modality)
        cols = (["file", "index", "label", "pred_label", "similarity", "dice", "iou", "gt_pixels", "pred_pixels",
                 "threshold"] + [f"end_step_m{j}" for j in range(m)] + [f"quantile_m{j}" for j in range(m)])
        rows = []
        for p in paths:
            d = load_batch(p)
            dice, iou = dice_iou_per_slice(d["mask_0"], d["gt"])
            for n in range(d["label"].shape[0]):
                row = {"file": os.path.basename(p), "index": n, "label": int(d["label"][n]),
                       "pred_label": int(d["pred_label"][n]), "similarity": float(d["similarity"][n]),
                       "dice": float(dice[n]), "iou": float(iou[n]), "gt_pixels": int(d["gt"][n].sum()),
                       "pred_pixels": int(d["mask_0"][n].sum()), "threshold": float(d["threshold_0"][n])}
                row.update({f"end_step_m{j}": int(d["end_step_0"][n, j]) for j in range(m)})
                row.update({f"quantile_m{j}": float(d["quantile"][n, j]) for j in range(m)})
                rows.append(row)
        _write_csv_atomic(os.path.join(self.log_dir, "per_slice.csv"), cols, rows)

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
        for d, n in picked:
            dice, _ = dice_iou_per_slice(d["mask_0"][n:n + 1], d["gt"][n:n + 1])
            images.append(d["panel_input"][n, 0].astype(np.float32))
            gts.append(d["gt"][n, 0])
            maps.append(d["anomaly_map_0"][n, 0])
            masks.append(d["mask_0"][n, 0])
            captions.append(f"label {int(d['label'][n])}  predicted {int(d['pred_label'][n])}  "
                            f"dice {dice[0]:.3f}  t_e {d['end_step_0'][n].tolist()}")
        out = os.path.join(self.image_dir, "panels.png")
        save_panels(out, images, gts, maps, masks, captions)
        logger.log(f"panels: {out}")

    def _write_arrays(self, paths: List[str]) -> None:
        keys = {"source": "source", "gt": "gt", "anomaly_map": "anomaly_map_0", "pred_mask_all": "mask_0",
                "label": "label", "pred_label": "pred_label", "similarity": "similarity", "end_step": "end_step_0",
                "mse_guided": "stats_mse_guided", "mse_unguided": "stats_mse_unguided",
                "divergence": "stats_divergence"}
        parts = {k: [] for k in keys}
        for p in paths:
            d = load_batch(p)
            for k, src in keys.items():
                parts[k].append(d[src])
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
        logger.log(f"checkpoint {self.checkpoint}; device {self.device}; {self.world} process(es)")
        hyper = self.validation()
        logger.log(f"hyper-parameters ({hyper.source}): thr_01 {hyper.thr_01:.8f}, diff_max {hyper.diff_max}, "
                   f"diff_min {hyper.diff_min}, val errors {hyper.n_errors} of {hyper.n_val} "
                   f"({hyper.n_val_unhealthy} unhealthy), val accuracy {hyper.val_accuracy}")
        paths = self.test(hyper)
        all_paths = sorted((p for ps in dist_util.gather_objects(paths) for p in ps),
                           key=lambda p: (_batch_index(p), p))
        dist_util.barrier()
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
        self.summary.update(metrics=metrics, hyperparams=hyper.to_dict(), seconds=time.time() - t0,
                            test_files=all_paths)
        logger.log(f"evaluation complete ({self.summary['computed']} computed, {self.summary['reused']} reused, "
                   f"{self.summary['seconds']:.1f} s)")
        return self.summary


class _ResultBatches:
    """The test results of ``t_e_ratio`` number ``i`` as global batches, read from the batch files on each pass.

    The ranks' batch k together are exactly the global batch k of a single-process run. Re-iterable, so the
    global AUPRC can make its two passes without holding every pixel in memory.
    """

    def __init__(self, paths: List[str], i: int):
        self.paths, self.i = paths, i

    def __iter__(self) -> Iterator[dict]:
        for _, group in itertools.groupby(self.paths, key=_batch_index):
            ds = [load_batch(p) for p in group]
            batch = {name: np.concatenate([d[src] for d in ds]) for name, src in (
                ("label", "label"), ("pred_label", "pred_label"), ("gt", "gt"), ("pred_mask", f"mask_{self.i}"),
                ("anomaly_map", f"anomaly_map_{self.i}"), ("foreground", "foreground"))}
            if all("slice_file" in d for d in ds):
                batch["slice_file"] = np.concatenate([d["slice_file"] for d in ds])
            yield batch


def _fmt(v: Any) -> str:
    return "null" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _write_json_atomic(path: str, obj: Any) -> None:
    fileio.write_json(path, obj, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _write_csv_atomic(path: str, cols: Sequence[str], rows: Sequence[dict]) -> None:
    with fileio.atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cols))
        writer.writeheader()
        for r in rows:
            writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})


def main(argv: Optional[Sequence[str]] = None, unet_ver: Optional[str] = None) -> Dict[str, Any]:
    """Command-line entry point; ``unet_ver`` fixes the variant (for the per-variant alias scripts)."""
    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
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
        try:
            return Translation(args).run()
        except (fileio.UnreadableCheckpointError, fileio.DiskFullError) as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2 if isinstance(e, ValueError) else 1) from None
    finally:
        dist_util.cleanup_dist()
