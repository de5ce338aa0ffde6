"""Training runs from their settings: a diffusion UNet (``train``) or the noisy-image classifier
(``train_classifier``), on 1..N processes (torchrun: NCCL on GPUs, gloo on CPU; mpiexec with mpi4py).

The run folder (``settings.output``) gets the checkpoints (``model{step:06d}.pt``, ``ema_{rate}_{step:06d}.pt``,
``opt{step:06d}.pt``), ``config.json`` (the model's flags, from which evaluation rebuilds it), ``log.txt``,
``progress.csv`` and the preview grids. ``--resume_checkpoint auto`` continues from the newest checkpoint there.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Sequence

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.diffusion.noise import make_noise_fn
from guided_diffusion.diffusion.resample import create_named_schedule_sampler
from guided_diffusion.factory import create_classifier_and_diffusion, create_model_and_diffusion
from guided_diffusion.loading import check_run_config
from guided_diffusion.training.objectives import ClassifierObjective, DiffusionObjective
from guided_diffusion.training.settings import ClassifierTrainSettings, LoopSettings, TrainSettings
from guided_diffusion.training.train_util import TrainLoop


def open_run_folder(output: str, loop: LoopSettings, image_dir: str, flags: Dict[str, Any], kind: str) -> str:
    """The run folder, ready: leftovers of a killed run swept, its ``config.json`` checked against ``flags`` (the
    checkpoints there belong to the model it describes); returns the checkpoint to resume from ("" for none)."""
    logger.configure(dir=output, sync_ranks=True, extra_formats=["tensorboard"] if loop.tensorboard else ())
    if loop.tensorboard and dist_util.get_rank() == 0:
        logger.log(f"TensorBoard event files in {os.path.join(output, 'tb')} (tensorboard --logdir {output})")
    if dist_util.get_rank() == 0:  # partial files of a killed run (only rank 0 writes here)
        for folder in {output, image_dir}:
            fileio.sweep_temp_files(folder, warn=logger.warn)
    check_run_config(output, flags, kind=kind)
    resume = loop.resume_checkpoint
    if resume == "auto":
        resume = fileio.latest_training_checkpoint(output, loop.ema_rates, warn=logger.warn) or ""
    runtime.configure_threads()
    logger.log(runtime.thread_summary())
    return resume


def run_train_loop(s: Any, loop: LoopSettings, kind: str, flags: Dict[str, Any], resume: str, image_dir: str,
                   recorded: Dict[str, Any], **loop_kwargs: Any) -> int:
    """Build the ``TrainLoop`` from the loop settings and ``loop_kwargs``, write ``config.json`` (model ``flags``
    and the ``recorded`` training settings) if the folder has none, run; the final step."""
    train_loop = TrainLoop(batch_size=loop.batch_size, microbatch=loop.microbatch, lr=loop.lr, ema_rate=loop.ema_rate,
                           log_interval=loop.log_interval, save_interval=loop.save_interval, resume_checkpoint=resume,
                           weight_decay=loop.weight_decay, precision=loop.precision, grad_clip=loop.grad_clip,
                           seed=loop.seed, image_dir=image_dir, find_unused_parameters=loop.find_unused_parameters,
                           **loop_kwargs)
    if dist_util.get_rank() == 0 and not os.path.exists(fileio.config_path(s.output)):
        # after a resume has loaded (the flags fit the weights), before the first step
        fileio.write_run_config(s.output, kind, flags, training=recorded)
    return train_loop.run_loop()


def _describe_processes() -> str:
    text = f"device {dist_util.dev()}, {dist_util.get_world_size()} process(es)"
    if dist_util.is_distributed():
        import torch.distributed as dist

        text += (f", process group {dist.get_backend()} at {os.environ.get('MASTER_ADDR')}:"
                 f"{os.environ.get('MASTER_PORT')}")
    return text


def train(s: TrainSettings) -> int:
    """Train the diffusion UNet of ``s``; returns the final step."""
    flags = s.model.flags()
    resume = open_run_folder(s.output, s.loop, s.image_dir, flags, "diffusion")
    runtime.seed_everything(s.loop.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model, diffusion = create_model_and_diffusion(**flags)
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"training {s.model.unet_ver} ({n_params / 1024 ** 2:.2f} M parameters) on {s.data.data_dir}: "
               f"{_describe_processes()}, precision {s.loop.precision} -> {s.output}")

    from guided_diffusion.data.loaders import get_data_iter

    d = s.data
    loader, sampler = get_data_iter(
        d.name, d.data_dir, s.loop.batch_size, split=d.split, ret_lab=s.ret_lab,
        n_healthy_patients=d.n_healthy_patients, n_unhealthy_patients=d.n_unhealthy_patients, mixed=d.mixed,
        seed=s.loop.seed, num_workers=d.num_workers, image_size=s.model.image_size,  # the data must fit the model
        in_channels=s.model.in_channels, flags_source="the model's flags")
    t = s.training
    noise_fn = None if t.noise_type == "gaussian" else make_noise_fn(t.noise_type)
    objective = DiffusionObjective(diffusion, create_named_schedule_sampler(s.loop.schedule_sampler, diffusion),
                                   threshold=s.label_drop, noise_fn=noise_fn)
    recorded = {"ema_rate": s.loop.ema_rate, "name": d.name, "data_dir": d.data_dir, "batch_size": s.loop.batch_size,
                "lr": s.loop.lr, "threshold": s.label_drop, "noise_type": t.noise_type,
                "precision": s.loop.precision, "seed": s.loop.seed}
    step = run_train_loop(
        s, s.loop, "diffusion", flags, resume, s.image_dir, recorded,
        model=model, objective=objective, data=loader, data_sampler=sampler,
        lr_anneal_steps=s.loop.lr_anneal_steps, total_epochs=t.total_epochs, max_steps=s.loop.max_steps,
        w=list(t.w), sample_shape=s.sample_shape, preview_steps=t.preview_steps, name=d.name,
        ddpm_previews=t.ddpm_sampling,
    )
    logger.log(f"training finished at step {step}; checkpoints in {s.output}")
    return step


def train_classifier(s: ClassifierTrainSettings) -> int:
    """Train the noisy-image classifier of ``s``; returns the final step."""
    flags = s.flags()
    resume = open_run_folder(s.output, s.loop, s.image_dir, flags, "classifier")
    runtime.seed_everything(s.loop.seed)
    classifier, diffusion = create_classifier_and_diffusion(**flags)
    n_params = sum(p.numel() for p in classifier.parameters())
    logger.log(f"training the classifier ({n_params / 1024 ** 2:.2f} M parameters) on {s.data.data_dir}: "
               f"{_describe_processes()}, precision {s.loop.precision} -> {s.output}")

    from guided_diffusion.data.loaders import get_data_iter

    d, c, t = s.data, s.classifier, s.training
    world = dist_util.get_world_size()
    shape = dict(image_size=c.image_size, in_channels=c.in_channels, flags_source="the classifier's flags")
    loader, sampler = get_data_iter(d.name, d.data_dir, s.loop.batch_size, split="train", ret_lab=True, mixed=True,
                                    seed=s.loop.seed, num_workers=d.num_workers, **shape)
    val_loader = None
    val_dir = t.val_data_dir or d.data_dir
    if t.eval_interval > 0:
        if os.path.isdir(os.path.join(val_dir, "npy_val")):
            val_loader = get_data_iter(d.name, val_dir, max(1, s.loop.batch_size // world), split="val", mixed=True,
                                       seed=s.loop.seed, num_workers=0, **shape)
        else:
            logger.warn(f"no {os.path.join(val_dir, 'npy_val')}: training without validation")
    objective = ClassifierObjective(diffusion, create_named_schedule_sampler(s.loop.schedule_sampler, diffusion),
                                    noised=t.noised)
    recorded = {"ema_rate": s.loop.ema_rate, "name": d.name, "data_dir": d.data_dir, "batch_size": s.loop.batch_size,
                "lr": s.loop.lr, "noised": t.noised, "precision": s.loop.precision, "seed": s.loop.seed}
    step = run_train_loop(
        s, s.loop, "classifier", flags, resume, s.image_dir, recorded,
        model=classifier, objective=objective, data=loader, data_sampler=sampler,
        lr_anneal_steps=t.iterations if t.anneal_lr else 0,
        total_epochs=sys.maxsize,  # --iterations is the budget
        max_steps=t.iterations,
        sample_shape=(min(12, s.loop.batch_size // world), c.in_channels, c.image_size, c.image_size),
        preview_steps=0,  # a grid of real training slices only
        name=f"{d.name}_clf", val_data=val_loader, eval_interval=t.eval_interval, val_batches=t.val_batches,
    )
    logger.log(f"classifier training finished at step {step}; checkpoints in {s.output}")
    return step


__all__: Sequence[str] = ["train", "train_classifier", "open_run_folder", "run_train_loop"]
