"""Training runs from their settings: a diffusion UNet (``train``) or the noisy-image classifier
(``train_classifier``), on 1..N processes (torchrun: NCCL on GPUs, gloo on CPU; mpiexec with mpi4py).

The run folder (``settings.output``) gets the checkpoints (``model{step:06d}.pt``, ``ema_{rate}_{step:06d}.pt``,
``opt{step:06d}.pt``), ``config.json`` (the model's flags, from which evaluation rebuilds it), ``log.txt``,
``progress.csv`` and the preview grids. ``--resume_checkpoint auto`` continues from the newest checkpoint there.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.diffusion.noise import make_noise_fn
from guided_diffusion.diffusion.resample import create_named_schedule_sampler
from guided_diffusion.factory import create_classifier_and_diffusion, create_model_and_diffusion
from guided_diffusion.errors import DataError
from guided_diffusion.loading import check_run_config, read_config
from guided_diffusion.training.objectives import ClassifierObjective, DiffusionObjective
from guided_diffusion.training.settings import ClassifierTrainSettings, LoopSettings, TrainSettings
from guided_diffusion.training.train_util import TrainLoop, parse_ema_rates


#: the training settings recorded in config.json ("training") that make a run: a folder holding checkpoints made with
#: other values holds another run's (the data's path, the precision and the step budget may change on a resume)
RUN_DEFINING = ("name", "batch_size", "lr", "weight_decay", "ema_rate", "threshold", "noise_type", "noised", "seed")


def _same_value(key: str, a: Any, b: Any) -> bool:
    if key == "ema_rate":
        return parse_ema_rates(str(a)) == parse_ema_rates(str(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def training_differences(recorded: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """The run-defining settings in which ``now`` differs from config.json's ``training`` record."""
    return [f"--{k} {now[k]!r} (config.json: {recorded[k]!r})" for k in RUN_DEFINING
            if k in recorded and k in now and not _same_value(k, recorded[k], now[k])]


def check_run_folder(output: str, loop: LoopSettings, flags: Dict[str, Any], kind: str,
                     recorded: Dict[str, Any]) -> str:
    """The checkpoint to resume from ("" for none), once ``output`` is known to take this run without losing another's.

    The folder's config.json must describe this model (``loading.check_run_config``). A folder holding checkpoints is
    refused unless this run continues them: a fresh start (``--resume_checkpoint ""``) or one from another folder's
    checkpoint would overwrite them, and ``--resume_checkpoint auto`` with other run-defining training settings
    (``RUN_DEFINING``: --lr, --batch_size, ...) than config.json records would mix two runs in one. Naming the
    checkpoint (``--resume_checkpoint <path>``) continues it with the new values on purpose (e.g. a lower --lr after a
    divergence); config.json then records them. Reads only: safe before anything is written."""
    check_run_config(output, flags, kind=kind)
    resume = loop.resume_checkpoint
    explicit = resume != "auto"
    existing = fileio.list_checkpoints(output, "model")
    if not explicit:
        resume = fileio.latest_training_checkpoint(output, loop.ema_rates, warn=logger.warn) or ""
        if not resume:
            return ""  # nothing there, or nothing readable (garbage is overwritten, with the warning above)
    continues = bool(resume) and os.path.realpath(os.path.dirname(resume)) == os.path.realpath(output)
    if existing and not continues:
        newest = fileio.checkpoint_name("model", max(existing))
        start = f"--resume_checkpoint {resume}" if resume else '--resume_checkpoint "" (a fresh start)'
        raise fileio.RunConfigError(
            f"--output {output} holds the checkpoints of another run (up to {newest}), and {start} does not "
            "continue it: training here would overwrite them. Use another --output, or --resume_checkpoint auto to "
            "continue that run")
    if existing:
        record = read_config(output, kind) or {}
        diffs = training_differences(record.get("training") or {}, recorded)
        if diffs and not explicit:
            raise fileio.RunConfigError(
                f"{fileio.config_path(output)} records how the checkpoints in {output} were trained, and this run "
                f"differs: {'; '.join(diffs)}. Continuing would make one run of two. Use another --output for a new "
                "run, or drop these flags to continue that one; to continue it with the new values on purpose (e.g. a "
                f"lower --lr after a divergence), name the checkpoint: --resume_checkpoint {resume}")
        if diffs:
            logger.warn(f"WARNING: continuing {resume} with other training settings than config.json records "
                        f"({'; '.join(diffs)}); config.json now records this run's")
    return resume


def open_run_folder(output: str, loop: LoopSettings, image_dir: str, flags: Dict[str, Any], kind: str,
                    recorded: Dict[str, Any]) -> str:
    """The run folder, ready: leftovers of a killed run swept and ``check_run_folder`` passed; returns the checkpoint
    to resume from ("" for none)."""
    logger.configure(dir=output, sync_ranks=True, extra_formats=["tensorboard"] if loop.tensorboard else ())
    if loop.tensorboard and dist_util.get_rank() == 0:
        logger.log(f"TensorBoard event files in {os.path.join(output, 'tb')} (tensorboard --logdir {output})")
    if dist_util.get_rank() == 0:  # partial files of a killed run (only rank 0 writes here)
        for folder in {output, image_dir}:
            fileio.sweep_temp_files(folder, warn=logger.warn)
    resume = check_run_folder(output, loop, flags, kind, recorded)
    runtime.configure_threads()
    logger.log(runtime.thread_summary())
    return resume


def check_training_data(loader: Any, batch_size: int, class_cond: bool, data_dir: str, what: str) -> None:
    """What the training data make of the settings: a class-conditional model (or the classifier) on slices without
    a single lesion is refused (class 1 would never be seen); a --batch_size above the slices is said."""
    from guided_diffusion.data.loaders import known_unhealthy_slices

    dataset = loader.dataset
    if class_cond and known_unhealthy_slices(dataset) == 0:
        raise DataError(
            f"{what} learns to tell healthy from unhealthy slices (class-conditional), but the {len(dataset)} training "
            f"slices of {data_dir} hold no slice with a lesion: class 1 would never be seen, and guidance compares "
            "the two classes. Train on data with lesion subjects (--mixed true; preprocess subjects with lesions), "
            "or train an unconditional model (--num_classes 0, as AnoDDPM)")
    if batch_size > len(dataset):
        logger.warn(f"WARNING: --batch_size {batch_size} is larger than the {len(dataset)} training slices: each step "
                    f"takes all of them once, so a batch holds {len(dataset)} slices, not {batch_size} (one step per "
                    "epoch)")


def run_train_loop(s: Any, loop: LoopSettings, kind: str, flags: Dict[str, Any], resume: str, image_dir: str,
                   recorded: Dict[str, Any], **loop_kwargs: Any) -> int:
    """Build the ``TrainLoop`` from the loop settings and ``loop_kwargs``, write ``config.json`` (model ``flags``
    and the ``recorded`` training settings) where it is missing or records other training settings (a run continued
    on purpose with new values, or a folder without checkpoints), run; the final step."""
    train_loop = TrainLoop(batch_size=loop.batch_size, microbatch=loop.microbatch, lr=loop.lr, ema_rate=loop.ema_rate,
                           log_interval=loop.log_interval, save_interval=loop.save_interval, resume_checkpoint=resume,
                           weight_decay=loop.weight_decay, precision=loop.precision, grad_clip=loop.grad_clip,
                           seed=loop.seed, image_dir=image_dir, find_unused_parameters=loop.find_unused_parameters,
                           compile=loop.compile, **loop_kwargs)
    if dist_util.get_rank() == 0:  # after a resume has loaded (the flags fit the weights), before the first step
        record = read_config(s.output, kind)
        if record is None or training_differences(record.get("training") or {}, recorded):
            fileio.write_run_config(s.output, kind, flags, training=recorded)
    return train_loop.run_loop()


def _describe_processes() -> str:
    text = f"device {dist_util.dev()}, {dist_util.get_world_size()} process(es)"
    if dist_util.is_distributed():
        import torch.distributed as dist

        text += (f", process group {dist.get_backend()} at {os.environ.get('MASTER_ADDR')}:"
                 f"{os.environ.get('MASTER_PORT')}")
    return text


def train(s: TrainSettings, record: Optional[Callable[[], None]] = None) -> int:
    """Train the diffusion UNet of ``s``; returns the final step. ``record()`` runs once the run folder is known to
    take this run (the command records its settings there)."""
    flags = s.model.flags()
    d, t = s.data, s.training
    recorded = {"ema_rate": s.loop.ema_rate, "name": d.name, "data_dir": d.data_dir, "batch_size": s.loop.batch_size,
                "lr": s.loop.lr, "weight_decay": s.loop.weight_decay, "threshold": s.label_drop,
                "noise_type": t.noise_type, "precision": s.loop.precision, "seed": s.loop.seed}
    resume = open_run_folder(s.output, s.loop, s.image_dir, flags, "diffusion", recorded)
    if record is not None:
        record()
    runtime.seed_everything(s.loop.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model, diffusion = create_model_and_diffusion(**flags)
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"training {s.model.unet_ver} ({n_params / 1024 ** 2:.2f} M parameters) on {s.data.data_dir}: "
               f"{_describe_processes()}, precision {s.loop.precision} -> {s.output}")

    from guided_diffusion.data.loaders import get_data_iter

    loader, sampler = get_data_iter(
        d.name, d.data_dir, s.loop.batch_size, split=d.split, ret_lab=s.ret_lab,
        n_healthy_patients=d.n_healthy_patients, n_unhealthy_patients=d.n_unhealthy_patients, mixed=d.mixed,
        seed=s.loop.seed, num_workers=d.num_workers, image_size=s.model.image_size,  # the data must fit the model
        in_channels=s.model.in_channels, flags_source="the model's flags")
    check_training_data(loader, s.loop.batch_size, bool(s.model.class_cond), d.data_dir,
                        f"--num_classes {s.model.num_classes} (a class-conditional model)")
    noise_fn = None if t.noise_type == "gaussian" else make_noise_fn(t.noise_type)
    objective = DiffusionObjective(diffusion, create_named_schedule_sampler(s.loop.schedule_sampler, diffusion),
                                   threshold=s.label_drop, noise_fn=noise_fn)
    step = run_train_loop(
        s, s.loop, "diffusion", flags, resume, s.image_dir, recorded,
        model=model, objective=objective, data=loader, data_sampler=sampler,
        lr_anneal_steps=s.loop.lr_anneal_steps, total_epochs=t.total_epochs, max_steps=s.loop.max_steps,
        w=list(t.w), sample_shape=s.sample_shape, preview_steps=t.preview_steps, name=d.name,
        ddpm_previews=t.ddpm_sampling,
    )
    logger.log(f"training finished at step {step}; checkpoints in {s.output}")
    return step


def train_classifier(s: ClassifierTrainSettings, record: Optional[Callable[[], None]] = None) -> int:
    """Train the noisy-image classifier of ``s``; returns the final step (``record``: as ``train``'s)."""
    flags = s.flags()
    d, c, t = s.data, s.classifier, s.training
    recorded = {"ema_rate": s.loop.ema_rate, "name": d.name, "data_dir": d.data_dir, "batch_size": s.loop.batch_size,
                "lr": s.loop.lr, "weight_decay": s.loop.weight_decay, "noised": t.noised,
                "precision": s.loop.precision, "seed": s.loop.seed}
    resume = open_run_folder(s.output, s.loop, s.image_dir, flags, "classifier", recorded)
    if record is not None:
        record()
    runtime.seed_everything(s.loop.seed)
    classifier, diffusion = create_classifier_and_diffusion(**flags)
    n_params = sum(p.numel() for p in classifier.parameters())
    logger.log(f"training the classifier ({n_params / 1024 ** 2:.2f} M parameters) on {s.data.data_dir}: "
               f"{_describe_processes()}, precision {s.loop.precision} -> {s.output}")

    from guided_diffusion.data.loaders import get_data_iter

    world = dist_util.get_world_size()
    shape = dict(image_size=c.image_size, in_channels=c.in_channels, flags_source="the classifier's flags")
    loader, sampler = get_data_iter(d.name, d.data_dir, s.loop.batch_size, split="train", ret_lab=True, mixed=True,
                                    seed=s.loop.seed, num_workers=d.num_workers, **shape)
    check_training_data(loader, s.loop.batch_size, True, d.data_dir, "the noisy-image classifier")
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


__all__: Sequence[str] = ["train", "train_classifier", "check_run_folder", "open_run_folder", "run_train_loop",
                           "check_training_data"]
