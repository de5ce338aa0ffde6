"""The training command line: flags, checks, and the run (``scripts/train.py`` is its entry point).

Trains a diffusion UNet (any --unet_ver) on preprocessed BraTS/ATLAS slices: classifier-free guided
(--num_classes 2, the default), plain class-conditional (--num_classes 2 --clf_free False: the model that a
noisy-image classifier guides) or unconditional (--num_classes 0, e.g. AnoDDPM on healthy slices with
--mixed False --n_unhealthy_patients 0), with Gaussian or simplex noise (--noise_type).

One process:   python scripts/train.py --data_dir ./data --unet_ver v2 ...
Several:       torchrun --nproc-per-node 2 --master-port 12356 scripts/train.py ...   (NCCL on GPUs, gloo on CPU)
               mpiexec -n 2 python scripts/train.py ...                           (needs mpi4py)
Flags follow upstream AnoFPDM (see README); --batch_size is the global batch over all processes.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.diffusion.noise import check_noise_type, make_noise_fn
from guided_diffusion.diffusion.resample import SCHEDULE_SAMPLERS, create_named_schedule_sampler
from guided_diffusion.errors import entry_point
from guided_diffusion.runtime import seed_everything
from guided_diffusion.script_util import (
    UNET_VERSIONS,
    add_dict_to_argparser,
    args_to_dict,
    check_model_flags,
    check_run_config,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.training.objectives import DiffusionObjective
from guided_diffusion.training.train_util import TrainLoop, parse_ema_rates

T = TypeVar("T")

DEFAULT_THRESHOLD = 0.1  # classifier-free label drop (upstream's default -1 crashed class-conditional training)


def train_defaults() -> dict:
    """Train-only flags (upstream names and defaults, plus this project's additions at the end)."""
    return dict(
        data_dir="",
        image_dir="",
        name="brats",
        split="train",
        training=True,
        mixed=True,
        ret_lab=True,
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=100,
        save_interval=100,
        resume_checkpoint="",
        fp16_scale_growth=1e-3,
        n_unhealthy_patients=-1,
        n_healthy_patients=-1,
        noise_type="gaussian",
        ddpm_sampling=False,
        total_epochs=1000,
        threshold=None,  # DEFAULT_THRESHOLD for classifier-free models, -1 (no label drop) otherwise
        # additions
        max_steps=0,
        precision="fp32",
        grad_clip=0.0,
        seed=0,
        num_workers=4,
        preview_steps=50,
        find_unused_parameters="auto",
    )


def parse_weights(values: Sequence[str]) -> List[float]:
    """--w 1 1.8 2 or --w 1,1.8,2 -> [1.0, 1.8, 2.0]."""
    out = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"--w takes guidance weights (floats, space or comma separated), got {value!r}") from None
    return out


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_keys = model_and_diffusion_defaults()
    defaults = {k: v for k, v in train_defaults().items() if k not in model_keys}
    threshold = defaults.pop("threshold")
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--threshold", type=float, default=threshold,
                        help=f"classifier-free label-drop probability (default {DEFAULT_THRESHOLD} for class-conditional "
                             "models with --clf_free True; -1, no drop, with --clf_free False)")
    add_dict_to_argparser(parser, model_keys)
    parser.add_argument("--sample_shape", type=int, nargs="+", default=None,
                        help="preview grid shape N C H W (default: 12 in_channels image_size image_size)")
    parser.add_argument("--w", type=str, nargs="+", default=["2"],
                        help="guidance weights for the preview grids, e.g. --w 1 1.8 2 3")
    return parser


def check_common_args(args: argparse.Namespace, world_size: int) -> None:
    """Checks shared by the diffusion and classifier command lines (data, batch, precision, intervals)."""
    if not args.data_dir:
        raise ValueError("--data_dir is required (the folder holding npy_train/)")
    if not os.path.isdir(args.data_dir):
        raise ValueError(f"--data_dir {args.data_dir} does not exist or is not a folder")
    if args.batch_size < 1 or args.batch_size % world_size:
        raise ValueError(f"--batch_size {args.batch_size} (global) must be a positive multiple of the number of "
                         f"processes ({world_size})")
    if args.microbatch > 0 and args.microbatch > args.batch_size // world_size:
        raise ValueError(f"--microbatch {args.microbatch} exceeds the per-process batch {args.batch_size // world_size}")
    runtime.check_precision(args.precision)
    for flag in ("use_fp16", "classifier_use_fp16"):  # upstream's flags: mixed precision now goes through autocast
        if getattr(args, flag, False):
            setattr(args, flag, False)
            if args.precision == "bf16":
                raise ValueError(f"--{flag} True asks for fp16 but --precision is bf16: pass one of them")
            args.precision = "fp16"
    args.ema_rate = ",".join(str(r) for r in parse_ema_rates(args.ema_rate))
    for flag in ("log_interval", "save_interval"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.find_unused_parameters not in ("auto", "true", "false", "True", "False"):
        raise ValueError(f"--find_unused_parameters must be auto, true or false, got {args.find_unused_parameters!r}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    for flag in ("weight_decay", "grad_clip", "num_workers"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0 (0: off), got {getattr(args, flag)}")
    if args.schedule_sampler not in SCHEDULE_SAMPLERS:
        raise ValueError(f"--schedule_sampler must be one of {', '.join(SCHEDULE_SAMPLERS)}, got "
                         f"{args.schedule_sampler!r}")


def check_args(args: argparse.Namespace, world_size: int = 1) -> None:
    """Validate and normalise flags in place; raises ValueError naming the flag."""
    if args.unet_ver not in UNET_VERSIONS:
        raise ValueError(f"unknown --unet_ver {args.unet_ver!r}; valid: {', '.join(UNET_VERSIONS)}")
    check_common_args(args, world_size)
    args.w = parse_weights(args.w)
    check_noise_type(args.noise_type)
    # upstream: num_classes > 0 means a class-conditional model
    args.class_cond = args.num_classes > 0
    if not args.class_cond:
        args.ret_lab = False  # an unconditional model takes no labels
        if args.threshold not in (None, -1):
            raise ValueError(f"--threshold {args.threshold} drops class labels, but --num_classes 0 trains an "
                             "unconditional model: omit --threshold")
        args.threshold = -1.0
    if args.class_cond:
        if not args.ret_lab:
            raise ValueError("a class-conditional model (--num_classes > 0) needs labels: --ret_lab True")
        if args.clf_free:
            if args.threshold is None:
                args.threshold = DEFAULT_THRESHOLD
            if not 0 < args.threshold <= 1:
                raise ValueError(f"--threshold {args.threshold}: classifier-free training (--clf_free True) drops "
                                 "labels with this probability and needs 0 < threshold <= 1 (the configs use 0.1)")
        else:  # plain class-conditional (the classifier-guided DM): the label is always seen
            if args.unet_ver != "v1":
                raise ValueError(f"--clf_free False (a plain class-conditional model, the classifier-guided DM) "
                                 f"exists for --unet_ver v1 only, not {args.unet_ver}")
            if args.threshold not in (None, -1):
                raise ValueError(f"--threshold {args.threshold} drops labels for classifier-free training, but "
                                 "--clf_free False trains a plain class-conditional model (the one a classifier "
                                 "guides): omit --threshold, or pass --clf_free True")
            args.threshold = -1.0
    if args.sample_shape is None:
        args.sample_shape = [12, args.in_channels, args.image_size, args.image_size]
    if len(args.sample_shape) != 4 or min(args.sample_shape) < 1:
        raise ValueError(f"--sample_shape must be four positive ints N C H W, got {args.sample_shape}")
    if tuple(args.sample_shape[1:]) != (args.in_channels, args.image_size, args.image_size):
        raise ValueError(f"--sample_shape {args.sample_shape} must match --in_channels {args.in_channels} and "
                         f"--image_size {args.image_size} (N {args.in_channels} {args.image_size} {args.image_size})")
    if args.total_epochs < 1:
        raise ValueError(f"--total_epochs must be >= 1, got {args.total_epochs}")
    for flag in ("max_steps", "lr_anneal_steps", "preview_steps"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0 (0: off), got {getattr(args, flag)}")
    check_model_flags(args_to_dict(args, model_and_diffusion_defaults().keys()))


def run_checked(parser: argparse.ArgumentParser, check: Callable[[], T], train: Callable[[T], int]) -> int:
    """The training commands' frame: process group up, ``check()`` (a ValueError is a usage error naming the flag),
    ``train(what check returned)`` (user errors: one message and exit code 2, ``errors.entry_point``), group down."""
    dist_util.setup_dist()
    try:
        try:
            checked = check()
        except ValueError as e:
            parser.error(str(e))
        return train(checked)
    finally:
        dist_util.cleanup_dist()


def open_run_folder(args: argparse.Namespace, flags: Dict[str, Any], kind: str) -> str:
    """The log folder of a training run, ready for it: leftovers of a killed run swept, its ``config.json`` checked
    against ``flags`` (the checkpoints there belong to the model it describes), ``--resume_checkpoint auto``
    resolved, threads configured, the flags logged."""
    logger.configure(sync_ranks=True)
    log_dir = logger.get_dir()
    if dist_util.get_rank() == 0:  # partial files of a killed run (only rank 0 writes here)
        for folder in {log_dir, args.image_dir or os.path.join(log_dir, "images")}:
            fileio.sweep_temp_files(folder, warn=logger.warn)
    check_run_config(log_dir, flags, kind=kind)
    if args.resume_checkpoint == "auto":
        args.resume_checkpoint = fileio.latest_training_checkpoint(log_dir, parse_ema_rates(args.ema_rate),
                                                                   warn=logger.warn) or ""
    runtime.configure_threads()
    logger.log(f"args: {vars(args)}")
    logger.log(runtime.thread_summary())
    return log_dir


# TrainLoop arguments that both training commands take from the flag of the same name
_LOOP_FLAGS = ("batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval", "resume_checkpoint",
               "weight_decay", "precision", "grad_clip", "seed", "image_dir", "find_unused_parameters")


def run_train_loop(args: argparse.Namespace, log_dir: str, kind: str, flags: Dict[str, Any],
                   recorded: Sequence[str], **loop_kwargs: Any) -> int:
    """Build the ``TrainLoop`` (the shared flags from ``args``, the rest from ``loop_kwargs``), write ``config.json``
    (model ``flags`` and the training flags named in ``recorded``) if the folder has none, run; the final step."""
    loop = TrainLoop(**{k: getattr(args, k) for k in _LOOP_FLAGS}, **loop_kwargs)
    if dist_util.get_rank() == 0 and not os.path.exists(fileio.config_path(log_dir)):
        # after a resume has loaded (the flags fit the weights), before the first step
        fileio.write_run_config(log_dir, kind, flags, training={k: getattr(args, k) for k in recorded})
    return loop.run_loop()


@entry_point
def main(argv: Optional[Sequence[str]] = None, unet_ver: Optional[str] = None) -> int:
    parser = create_argparser()
    args = parser.parse_args(argv)
    if unet_ver is not None:  # train_<ver>.py aliases fix the variant, as upstream's copies did, HAE blocks included
        args.unet_ver = unet_ver
        args.use_hae = unet_ver.startswith("hae")
    return run_checked(parser, lambda: check_args(args, dist_util.get_world_size()), lambda _: train(args))


def train(args: argparse.Namespace) -> int:
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    log_dir = open_run_folder(args, flags, kind="diffusion")
    seed_everything(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"Model params: {n_params / 1024 ** 2:.2f} M ({args.unet_ver}); device {dist_util.dev()}, "
               f"{dist_util.get_world_size()} process(es), precision {args.precision}")
    if dist_util.is_distributed():
        import torch.distributed as dist

        logger.log(f"process group: {dist.get_backend()}, rendezvous {os.environ.get('MASTER_ADDR')}:"
                   f"{os.environ.get('MASTER_PORT')}")

    from guided_diffusion.data.loaders import get_data_iter

    loader, sampler = get_data_iter(
        args.name,
        args.data_dir,
        args.batch_size,
        split=args.split,
        ret_lab=args.ret_lab,
        n_healthy_patients=args.n_healthy_patients,
        n_unhealthy_patients=args.n_unhealthy_patients,
        mixed=args.mixed,
        seed=args.seed,
        num_workers=args.num_workers,
        image_size=args.image_size,  # the data must fit the model
        in_channels=args.in_channels,
        flags_source="the command-line flags",
    )
    noise_fn = None if args.noise_type == "gaussian" else make_noise_fn(args.noise_type)
    objective = DiffusionObjective(diffusion, create_named_schedule_sampler(args.schedule_sampler, diffusion),
                                   threshold=args.threshold, noise_fn=noise_fn)
    step = run_train_loop(
        args, log_dir, "diffusion", flags,
        recorded=("ema_rate", "name", "data_dir", "batch_size", "lr", "threshold", "noise_type", "precision", "seed"),
        model=model,
        objective=objective,
        data=loader,
        data_sampler=sampler,
        lr_anneal_steps=args.lr_anneal_steps,
        total_epochs=args.total_epochs,
        max_steps=args.max_steps,
        w=args.w,
        sample_shape=args.sample_shape,
        preview_steps=args.preview_steps,
        name=args.name,
        ddpm_previews=args.ddpm_sampling,
    )
    logger.log(f"training finished at step {step}")
    return step
