"""The noisy-image classifier's command line (``scripts/train_classifier.py`` is its entry point).

Trains upstream's classifier for classifier-guided sampling (``unet_v1.EncoderUNetModel``, built by
``script_util.create_classifier``) on preprocessed BraTS/ATLAS slices with their slice labels (healthy 0 /
unhealthy 1): x_t = q_sample(x0, t) with t uniform (``--noised True``), cross-entropy, AdamW, on the shared
``TrainLoop`` (checkpoints, exact resume, DDP or CPU, autocast, progress bar, logs).

One process:   python scripts/train_classifier.py --data_dir ./data --image_size 128 --in_channels 4 ...
Several:       torchrun --nproc-per-node 2 --master-port 12370 scripts/train_classifier.py ...
Flags follow upstream's train_classifier.py (see README); --batch_size is the global batch over all processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence, Tuple

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.diffusion.resample import create_named_schedule_sampler
from guided_diffusion.errors import entry_point
from guided_diffusion.runtime import seed_everything
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    check_model_flags,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.training.objectives import ClassifierObjective
from guided_diffusion.training.train_cli import check_common_args, open_run_folder, run_checked, run_train_loop


def classifier_train_defaults() -> dict:
    """Upstream's train_classifier.py flags and defaults, then this project's additions."""
    return dict(
        name="brats",
        data_dir="",
        val_data_dir="",  # upstream: unused; here the folder with npy_val/ (default --data_dir)
        image_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=100,
        eval_interval=5000,
        save_interval=5000,
        mixed=True,
        num_mix=10,  # accepted for upstream command lines; unused, as upstream (all patients are used)
        # additions
        val_batches=1,
        ema_rate="",  # upstream keeps no EMA of the classifier
        precision="fp32",
        grad_clip=0.0,
        seed=0,
        num_workers=4,
        find_unused_parameters="auto",
    )


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, {**classifier_train_defaults(), **classifier_and_diffusion_defaults()})
    return parser


def check_args(args: argparse.Namespace, world_size: int = 1) -> None:
    """Validate and normalise flags in place; raises ValueError naming the flag."""
    check_common_args(args, world_size)
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    if args.eval_interval < 0 or args.val_batches < 1:
        raise ValueError(f"--eval_interval must be >= 0 (0: no validation) and --val_batches >= 1, got "
                         f"{args.eval_interval} and {args.val_batches}")
    if not args.mixed:
        raise ValueError("--mixed False selects healthy slices only; the classifier needs both classes: --mixed True")
    if not args.noised and args.schedule_sampler != "uniform":
        raise ValueError(f"--schedule_sampler {args.schedule_sampler} draws timesteps, but --noised False trains "
                         "on clean inputs at t = 0")
    if args.val_data_dir and not os.path.isdir(args.val_data_dir):
        raise ValueError(f"--val_data_dir {args.val_data_dir} does not exist or is not a folder")
    check_model_flags(args_to_dict(args, classifier_and_diffusion_defaults().keys()))


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = create_argparser()
    args = parser.parse_args(argv)

    def check_and_build() -> Tuple[Any, Any]:
        check_args(args, dist_util.get_world_size())
        seed_everything(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        return create_classifier_and_diffusion(**args_to_dict(args, classifier_and_diffusion_defaults().keys()))

    return run_checked(parser, check_and_build, lambda built: train(args, *built))


def train(args: argparse.Namespace, classifier: torch.nn.Module, diffusion: GaussianDiffusion) -> int:
    flags = args_to_dict(args, classifier_and_diffusion_defaults().keys())
    log_dir = open_run_folder(args, flags, kind="classifier")
    n_params = sum(p.numel() for p in classifier.parameters())
    logger.log(f"Classifier params: {n_params / 1024 ** 2:.2f} M; device {dist_util.dev()}, "
               f"{dist_util.get_world_size()} process(es), precision {args.precision}")

    from guided_diffusion.data.loaders import get_data_iter

    world = dist_util.get_world_size()
    data_shape = dict(image_size=args.image_size, in_channels=args.in_channels, flags_source="the command-line flags")
    loader, sampler = get_data_iter(args.name, args.data_dir, args.batch_size, split="train", ret_lab=True,
                                    mixed=True, seed=args.seed, num_workers=args.num_workers, **data_shape)
    val_loader = None
    val_dir = args.val_data_dir or args.data_dir
    if args.eval_interval > 0:
        if os.path.isdir(os.path.join(val_dir, "npy_val")):
            val_loader = get_data_iter(args.name, val_dir, max(1, args.batch_size // world), split="val",
                                       mixed=True, seed=args.seed, num_workers=0, **data_shape)
        else:
            logger.warn(f"no {os.path.join(val_dir, 'npy_val')}: training without validation")
    objective = ClassifierObjective(diffusion, create_named_schedule_sampler(args.schedule_sampler, diffusion),
                                    noised=args.noised)
    step = run_train_loop(
        args, log_dir, "classifier", flags,
        recorded=("ema_rate", "name", "data_dir", "batch_size", "lr", "noised", "precision", "seed"),
        model=classifier,
        objective=objective,
        data=loader,
        data_sampler=sampler,
        lr_anneal_steps=args.iterations if args.anneal_lr else 0,
        total_epochs=sys.maxsize,  # --iterations is the budget
        max_steps=args.iterations,
        sample_shape=(min(12, args.batch_size // world), args.in_channels, args.image_size, args.image_size),
        preview_steps=0,  # a grid of real training slices only
        name=f"{args.name}_clf",
        val_data=val_loader,
        eval_interval=args.eval_interval,
        val_batches=args.val_batches,
    )
    logger.log(f"classifier training finished at step {step}")
    return step
