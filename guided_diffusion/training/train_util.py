"""The training loop: diffusion models and noisy-image classifiers on one or many processes, GPU or CPU.

What a step minimises is a pluggable objective (``training/objectives.py``): the diffusion loss (default, built
from ``diffusion``, ``schedule_sampler`` and ``threshold``) or the classifier's cross-entropy.

Follows guided-diffusion's ``TrainLoop`` (AdamW, EMA per rate, ``model/ema_<rate>_/opt{step:06d}.pt``
checkpoints in the log folder) driven by epochs as upstream AnoFPDM, with these additions:
- ``step`` counts completed optimizer steps; a checkpoint named ``model005000.pt`` holds the state after
  5000 steps and resuming from it continues with step 5001.
- ``state{step:06d}.pt`` stores what the guided-diffusion files cannot: epoch and position in the epoch,
  every rank's RNG states (torch, CUDA, numpy, python), the grad-scaler state. With it a resumed run
  continues exactly as the uninterrupted one would have. Without it (upstream checkpoints) the epoch
  and position are derived from the step and the RNGs are re-seeded.
- every file is written atomically (``fileio``: temp file, fsync, rename); ``model*.pt`` is written last, so
  its presence means the set is complete.
- mixed precision with ``torch.autocast`` (bf16, or fp16 with ``torch.amp.GradScaler``), optional
  gradient clipping, and a stop with a clear message on a non-finite loss (on all ranks together).
- microbatches are weighted by their size, so the gradient is the mean over the batch whatever the
  microbatch size (guided-diffusion summed microbatch means).
- preview grids at save time use the online model in eval mode (no dropout) with a few respaced DDIM steps
  and fixed noise, one PNG per guidance weight ``w`` (upstream: 1000 steps, train mode, fresh noise).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.diffusion.resample import ScheduleSampler
from guided_diffusion.errors import DivergedError, SetupError
from guided_diffusion.runtime import PRECISIONS, seed_everything  # noqa: F401  (PRECISIONS: kept importable here)
from guided_diffusion.training.objectives import DiffusionObjective, TrainingObjective


# ------------------------------------------------------------------------------------------------
# small helpers


def parse_ema_rates(ema_rate: "str | float | Sequence[float]") -> List[float]:
    """'0.9999' or '0.999,0.9999' (or numbers) -> [floats], each in [0, 1)."""
    if isinstance(ema_rate, str):
        parts = [p for p in ema_rate.split(",") if p.strip()]
        try:
            rates = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"--ema_rate must be a comma-separated list of floats, got {ema_rate!r}") from None
    elif isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    else:
        rates = [float(r) for r in ema_rate]
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"--ema_rate values must lie in [0, 1), got {r}")
    return rates


def parse_resume_step(path: str) -> int:
    """The step in a checkpoint name such as ``.../model005000.pt``."""
    parsed = fileio.parse_checkpoint_name(path)
    if parsed is None or parsed.kind != "model":
        raise ValueError(f"--resume_checkpoint must name a model file like model005000.pt, got {path!r}")
    return parsed.step


def get_rng_state(device: torch.device) -> Dict[str, Any]:
    """torch/CUDA/numpy/python RNG states, as tensors and plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without disturbing any global RNG (data-loader start-up, probes, previews)."""
    state = get_rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


class _SkipBatches:
    """A batch sampler that drops the first ``skip`` batches of another (indices only, no data loading)."""

    def __init__(self, batch_sampler: Iterable, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


def iterate_from(data: Iterable, skip: int) -> Iterator:
    """Iterate ``data`` (one epoch) starting at batch ``skip``; a DataLoader skips by indices only."""
    if skip == 0:
        return iter(data)
    if isinstance(data, torch.utils.data.DataLoader) and data.batch_sampler is not None:
        clone = torch.utils.data.DataLoader(
            data.dataset,
            batch_sampler=_SkipBatches(data.batch_sampler, skip),
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
            multiprocessing_context=data.multiprocessing_context,
            generator=data.generator,
        )
        return iter(clone)
    it = iter(data)
    for _ in range(skip):
        next(it, None)
    return it


def save_image_grid(images: torch.Tensor, path: str, ncols: Optional[int] = None, pad: int = 2) -> None:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one grey PNG, one tile per (image, channel).

    With several channels each row is one image (a tile per modality); single-channel images are laid
    out ``ncols`` (default 6) per row. Written atomically.
    """
    from PIL import Image

    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    tiles = images.reshape(n * c, h, w)
    ncols = ncols or (c if c > 1 else min(n, 6))
    nrows = math.ceil(tiles.shape[0] / ncols)
    canvas = torch.zeros(nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, ncols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = (
            (tile + 1) / 2
        )
    array = (canvas * 255).round().to(torch.uint8).numpy()
    with fileio.atomic_write(path) as f:
        Image.fromarray(array, mode="L").save(f, format="PNG")


# ------------------------------------------------------------------------------------------------
# the loop


class TrainLoop:
    """Train ``model`` on ``data`` (an epoch iterable of ``(x, cond)``) to minimise ``objective``.

    :param objective: a ``TrainingObjective``; default ``DiffusionObjective(diffusion, schedule_sampler,
        threshold)`` (then ``diffusion`` is required; with an objective, leave those three unset).

    :param data: re-iterable per epoch (e.g. a DataLoader) yielding ``(x [b, C, H, W], {"y": [b]})`` with
        ``b = batch_size // world_size`` rows per rank.
    :param data_sampler: the loader's sampler; ``set_epoch(epoch)`` is called at each epoch start.
    :param batch_size: the GLOBAL batch (all ranks together), as upstream; used for the ``samples`` counter.
    :param microbatch: rows per forward on each rank (-1 or 0: the whole per-rank batch).
    :param threshold: classifier-free label-drop probability passed to the model (``model(x, t, y=y,
        threshold=p)``); ignored for unconditional data (no ``y``).
    :param total_epochs, max_steps, lr_anneal_steps: stop at whichever comes first (0 = no limit for the
        last two); ``max_steps`` and ``lr_anneal_steps`` count global steps (a resumed run continues them).
    :param precision: "fp32", "bf16" or "fp16" (autocast; fp16 adds a grad scaler).
    :param grad_clip: clip the global gradient norm to this value (0 = off).
    :param w, sample_shape, preview_steps, image_dir: preview grids at save time, one per guidance weight
        (``sample_shape = (N, C, H, W)``; None or ``preview_steps=0`` disables them).
    :param find_unused_parameters: DDP setting; "auto" probes the model (the objective's ``probe_kwargs``,
        e.g. all-kept and all-dropped labels) for parameters that can get no gradient.
    :param val_data, eval_interval, val_batches: every ``eval_interval`` steps (0: never) the objective's
        ``evaluate`` runs on the first ``val_batches`` batches of ``val_data`` (eval mode, no gradients, the same
        slices and noise each time, training RNG streams untouched); means over all ranks are logged as ``val_*``.
    :param ddpm_previews: preview grids by ancestral DDPM sampling (with the objective's noise) instead of DDIM.
    :param compile: run the training forward and backward through ``torch.compile`` (the same function; the first
        step pays the compilation; previews and validation stay eager).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        diffusion: Any = None,
        data: Iterable,
        batch_size: int,
        lr: float,
        ema_rate: "str | float | Sequence[float]" = "0.9999",
        log_interval: int = 100,
        save_interval: int = 5000,
        resume_checkpoint: str = "",
        data_sampler: Any = None,
        microbatch: int = -1,
        schedule_sampler: Optional[ScheduleSampler] = None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        threshold: float = -1.0,
        total_epochs: int = 1,
        max_steps: int = 0,
        precision: str = "fp32",
        grad_clip: float = 0.0,
        seed: int = 0,
        w: Sequence[float] = (),
        sample_shape: Optional[Sequence[int]] = None,
        preview_steps: int = 50,
        image_dir: str = "",
        name: str = "",
        find_unused_parameters: "str | bool" = "auto",
        progress: bool = True,
        objective: Optional[TrainingObjective] = None,
        val_data: Optional[Iterable] = None,
        eval_interval: int = 0,
        val_batches: int = 1,
        ddpm_previews: bool = False,
        compile: bool = False,
    ):
        runtime.check_precision(precision)
        self.rank, self.world_size = dist_util.get_rank(), dist_util.get_world_size()
        if batch_size % self.world_size:
            raise ValueError(
                f"--batch_size {batch_size} (global) is not divisible by the number of processes {self.world_size}"
            )
        self.device = dist_util.dev()
        if self.device.type == "cuda":
            runtime.configure_cuda()  # TF32 off (fp32 is fp32), cuDNN autotuning on: runtime.py says why
        self.model = model.to(self.device)
        if self.world_size > 1:  # rank 0's initial weights everywhere, before the EMA copies are taken
            dist_util.sync_params(self.model.state_dict().values())
        if objective is None:
            if diffusion is None:
                raise ValueError("TrainLoop needs a diffusion (for the default diffusion objective) or an objective")
            objective = DiffusionObjective(diffusion, schedule_sampler, threshold)
        elif diffusion is not None or schedule_sampler is not None or threshold != -1.0:
            raise ValueError("pass diffusion/schedule_sampler/threshold to the objective, not to TrainLoop, "
                             "when an objective is given")
        self.objective = objective
        self.diffusion = objective.diffusion  # previews sample with it (None: no previews)
        self.data, self.data_sampler = data, data_sampler
        self.val_data, self.eval_interval, self.val_batches = val_data, eval_interval, val_batches
        self.ddpm_previews = ddpm_previews
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size // self.world_size
        self.lr, self.weight_decay, self.lr_anneal_steps = lr, weight_decay, lr_anneal_steps
        self.ema_rates = parse_ema_rates(ema_rate)
        self.log_interval, self.save_interval = log_interval, save_interval
        self.total_epochs, self.max_steps = total_epochs, max_steps
        self.precision, self.grad_clip, self.seed = precision, grad_clip, seed
        self.w = list(w)
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        self.preview_steps = preview_steps
        self.name = name
        self.progress = progress
        self.log_dir = logger.get_dir() or "."
        self.image_dir = image_dir or os.path.join(self.log_dir, "images")

        self.step = 0  # completed optimizer steps (global, survives resume)
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` already consumed
        self._last_saved = -1

        seed_everything(seed + 1000003 * self.rank)  # ranks must draw different noise, t and label drops
        self.param_names, self.params = map(list, zip(*[(n, p) for n, p in self.model.named_parameters()
                                                         if p.requires_grad]))
        # the fused kernel (one pass over each parameter, CPU and CUDA) instead of a loop of small ops per parameter:
        # the same AdamW update to float precision, 3.5x less optimizer time on the production model on a CPU
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=fused or None)
        self.scaler = _grad_scaler(self.device, enabled=precision == "fp16")
        self.ema_params = [[p.detach().clone().float() for p in self.params] for _ in self.ema_rates]
        if resume_checkpoint:
            self._resume(resume_checkpoint)
        self._find_unused = find_unused_parameters
        self.ddp_model: nn.Module = self.model  # wrapped in DDP at the first batch (see _wrap_ddp)
        self.compile = compile
        self._step_module: Optional[nn.Module] = None  # what a step calls (see _network)
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, torch.Tensor] = {}

    # -- resume -----------------------------------------------------------------------------------
    def _resume(self, path: str) -> None:
        step = parse_resume_step(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume_checkpoint {path} does not exist")
        paths = fileio.checkpoint_paths(os.path.dirname(path), step, self.ema_rates)
        logger.log(f"resuming from {path} (step {step})")
        fileio.load_state_dict_into(self.model, path, map_location=self.device,
                                    hint="this run's flags")
        for rate, ema in zip(self.ema_rates, self.ema_params):
            ema_path = paths[f"ema_{fileio.format_rate(rate)}"]
            if os.path.exists(ema_path):
                sd = fileio.load_checkpoint(ema_path, map_location=self.device)
                for e, n in zip(ema, self.param_names):
                    e.copy_(sd[n])
            else:
                logger.warn(f"no {ema_path}: EMA rate {rate} restarts from the model weights")
                for e, p in zip(ema, self.params):
                    e.copy_(p.detach())
        if os.path.exists(paths["opt"]):
            self.opt.load_state_dict(fileio.load_checkpoint(paths["opt"], map_location=self.device))
        else:
            logger.warn(f"no {paths['opt']}: the optimizer state starts fresh")
        self.step = self._last_saved = step
        if os.path.exists(paths["state"]):
            state = fileio.load_checkpoint(paths["state"], map_location="cpu")
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
            if state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            if len(state["rng"]) == self.world_size:
                set_rng_state(state["rng"][self.rank], self.device)
            else:
                logger.warn(
                    f"{paths['state']} was written by {len(state['rng'])} processes, this run has "
                    f"{self.world_size}: random streams are re-seeded (data position is kept)"
                )
                seed_everything(self.seed + 7919 * step + 1000003 * self.rank)
        else:
            steps_per_epoch = len(self.data) if hasattr(self.data, "__len__") else 0
            if steps_per_epoch:
                self.epoch, self.batch_in_epoch = divmod(step, steps_per_epoch)
            logger.warn(
                f"no {paths['state']} (upstream checkpoint?): continuing at epoch {self.epoch}, batch "
                f"{self.batch_in_epoch}, with re-seeded random streams"
            )
            seed_everything(self.seed + 7919 * step + 1000003 * self.rank)

    # -- DDP --------------------------------------------------------------------------------------
    def _wrap_ddp(self, x: torch.Tensor, cond: Dict[str, Any]) -> None:
        if self.world_size == 1 or isinstance(self.ddp_model, DDP):
            return
        find_unused = self._find_unused
        if isinstance(find_unused, str):
            if find_unused.lower() in ("true", "false"):
                find_unused = find_unused.lower() == "true"
            elif find_unused == "auto":
                unused = self.unused_parameters(x, cond)
                find_unused = bool(unused)
                if unused:
                    logger.log(f"DDP: {len(unused)} parameter tensors can get no gradient (e.g. {unused[0]}); "
                               "find_unused_parameters=True")
            else:
                raise ValueError(f"--find_unused_parameters must be auto, true or false, got {find_unused!r}")
        self.ddp_model = DDP(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            output_device=self.device.index if self.device.type == "cuda" else None,
            bucket_cap_mb=128,
            gradient_as_bucket_view=True,
            find_unused_parameters=find_unused,
        )

    def _network(self, x: torch.Tensor, cond: Dict[str, Any]) -> nn.Module:
        """The module a training step calls: the model, in DDP with several processes, compiled when asked."""
        if self._step_module is None:
            self._wrap_ddp(x, cond)
            self._step_module = torch.compile(self.ddp_model) if self.compile else self.ddp_model
        return self._step_module

    def unused_parameters(self, x: torch.Tensor, cond: Dict[str, Any]) -> List[str]:
        """Names of parameters that get no gradient in the objective's probe calls (one row each)."""
        x1 = x[:1].to(self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        scenarios = self.objective.probe_kwargs(self.model, {k: v[:1].to(self.device) for k, v in cond.items()})
        unused = set()
        with preserved_rng(self.device):
            for kwargs in scenarios:
                self.model.zero_grad(set_to_none=True)
                with self._autocast():
                    out = self.model(x1, t, **kwargs)
                out.float().sum().backward()
                unused |= {n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None}
        self.model.zero_grad(set_to_none=True)
        return sorted(unused)

    # -- the loop ---------------------------------------------------------------------------------
    def _autocast(self):
        return runtime.autocast(self.device, self.precision)

    def _planned_steps(self) -> Optional[int]:
        limits = [s for s in (self.max_steps, self.lr_anneal_steps) if s > 0]
        if hasattr(self.data, "__len__"):
            limits.append(self.total_epochs * len(self.data))
        return min(limits) if limits else None

    def _should_stop(self) -> bool:
        return (
            (self.max_steps > 0 and self.step >= self.max_steps)
            or (self.lr_anneal_steps > 0 and self.step >= self.lr_anneal_steps)
            or self.epoch >= self.total_epochs
        )

    def run_loop(self) -> int:
        """Train until a stop condition; returns the final step."""
        start_step = self.step
        bar = None
        if self.progress and self.rank == 0:
            bar = logger.progress_bar(self._planned_steps(), f"train {self.name}".strip(), initial=self.step)
        stop_after_save = bool(os.environ.get("DIFFUSION_TRAINING_TEST"))
        try:
            while not self._should_stop():
                if self.data_sampler is not None and hasattr(self.data_sampler, "set_epoch"):
                    self.data_sampler.set_epoch(self.epoch)
                # Starting an epoch may draw from the global RNGs (worker seeds, samplers); keep them out of
                # the training streams so a resumed run matches an uninterrupted one.
                with preserved_rng(self.device):
                    batches = iterate_from(self.data, self.batch_in_epoch)
                    first = next(batches, None)
                if first is None:
                    if self.batch_in_epoch == 0:
                        raise SetupError("the training data yielded no batch: fewer slices than the per-process "
                                         "batch? Lower --batch_size or check --data_dir")
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                if self.step == 0 and self.rank == 0 and self.sample_shape is not None:
                    save_image_grid(first[0][: self.sample_shape[0]],
                                    os.path.join(self.image_dir, f"real_{self.name or 'data'}_train.png"))
                for x, cond in _chain_first(first, batches):
                    self.run_step(x, cond)
                    self.step += 1
                    self.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    if self.val_data is not None and self.eval_interval > 0 and self.step % self.eval_interval == 0:
                        self.validate()
                    if self.step % self.log_interval == 0:
                        self.log_metrics(bar)
                    if self.step % self.save_interval == 0:
                        self.save()
                        if stop_after_save:
                            return self.step
                    if self._should_stop():
                        break
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.step != self._last_saved and self.step > start_step:
                self.save()
        finally:
            if bar is not None:
                bar.close()
        return self.step

    def run_step(self, x: torch.Tensor, cond: Dict[str, Any]) -> None:
        """One optimizer step on a per-rank batch (forward/backward per microbatch, clip, step, EMA)."""
        network = self._network(x, cond)
        lr = self._current_lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        for start in range(0, n, self.microbatch):
            micro = x[start: start + self.microbatch].to(self.device, non_blocking=True)
            micro_cond = {k: v[start: start + self.microbatch].to(self.device, non_blocking=True)
                          for k, v in cond.items()}
            last = start + self.microbatch >= n
            sync = contextlib.nullcontext() if last or not isinstance(self.ddp_model, DDP) else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    out = self.objective(network, micro, micro_cond)
                loss = out.loss.float().mean()
                self._check_finite(loss)
                # weight by the microbatch's share: the gradient is the mean over the per-rank batch
                self.scaler.scale(loss * (micro.shape[0] / n)).backward()
            self._accumulate(out.t, {k: v.detach().float() for k, v in out.metrics.items()})
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, max_norm=self.grad_clip if self.grad_clip > 0 else float("inf")
        )
        self._accumulate_value("grad_norm", grad_norm.detach().float())
        self.scaler.step(self.opt)
        self.scaler.update()
        self._update_ema()

    def _current_lr(self) -> float:
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * max(0.0, 1.0 - self.step / self.lr_anneal_steps)

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.world_size > 1:
            torch.distributed.all_reduce(bad)  # every rank stops together instead of hanging in DDP
        if bad.item() > 0:
            last = os.path.join(self.log_dir, fileio.checkpoint_name("model", max(self._last_saved, 0)))
            resume = (f"resume from the last checkpoint (--resume_checkpoint {last})" if os.path.exists(last) else
                      "start again: no checkpoint has been saved yet")
            raise DivergedError(
                f"non-finite training loss at step {self.step + 1} (epoch {self.epoch}, precision {self.precision}, "
                f"loss on this rank {loss.item()}; the slices were read finite). Lower --lr, set --grad_clip (e.g. "
                f"1.0), try --precision bf16 or fp32, and {resume}"
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        for rate, ema in zip(self.ema_rates, self.ema_params):
            torch._foreach_lerp_(ema, [p.detach().float() for p in self.params], 1.0 - rate)

    # -- logging ----------------------------------------------------------------------------------
    def _accumulate_value(self, key: str, value: torch.Tensor, count: float = 1.0) -> None:
        self._sums[key] = self._sums.get(key, 0) + value
        self._counts[key] = self._counts.get(key, 0) + count

    def _accumulate(self, t: Optional[torch.Tensor], values: Dict[str, torch.Tensor]) -> None:
        """Per-sample loss terms: their means plus (given t) means per quarter of the timestep range."""
        for key, v in values.items():
            self._accumulate_value(key, v.sum(), float(v.numel()))
        if t is None or not self.objective.num_timesteps:
            return
        quartile = (4 * t // self.objective.num_timesteps).clamp(max=3)
        ones = torch.ones_like(quartile, dtype=torch.float32)
        for key, v in values.items():
            sums = torch.zeros(4, device=v.device).index_add_(0, quartile, v)
            counts = torch.zeros(4, device=v.device).index_add_(0, quartile, ones)
            self._accumulate_value(f"{key}_quartiles", sums, counts)

    def log_metrics(self, bar: Any = None) -> None:
        """Write the means since the last dump (averaged over ranks) with step/samples/lr/norms."""
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.batch_size)
        logger.logkv("epoch", self.epoch)
        logger.logkv("lr", self._current_lr())
        for key, total in self._sums.items():
            count = self._counts[key]
            if key.endswith("_quartiles"):
                base = key[: -len("_quartiles")]
                for q, (s, c) in enumerate(zip(total.tolist(), count.tolist())):
                    if c > 0:
                        logger.logkv(f"{base}_q{q}", s / c)
            else:
                logger.logkv(key, (total / count).item())
        with torch.no_grad():
            logger.logkv("param_norm", torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in self.params])).item())
        if self.scaler.is_enabled():
            logger.logkv("lg_loss_scale", math.log2(self.scaler.get_scale()))
        self._sums.clear()
        self._counts.clear()
        values = logger.dumpkvs()
        if bar is not None and "loss" in values:
            bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """The objective's validation metrics on the first ``val_batches`` batches, averaged over all ranks and
        logged as ``val_<name>``; the same slices, timesteps and noise every time, global RNGs untouched."""
        generator = torch.Generator().manual_seed(self.seed + 1000003 * self.rank + 17)
        sums: Dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with preserved_rng(self.device), self._autocast():
                for i, batch in enumerate(self.val_data):
                    if i >= self.val_batches:
                        break
                    metrics = self.objective.evaluate(self.model, batch, generator)
                    for key, v in metrics.items():
                        sums[key] = sums.get(key, 0) + v.detach().float().sum()
                    count += next(iter(metrics.values())).numel()
        finally:
            self.model.train(was_training)
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys] + [count]) if keys else count.reshape(1)
        if self.world_size > 1:
            torch.distributed.all_reduce(totals)
        results = {f"val_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)} if totals[-1] > 0 else {}
        for key, value in results.items():
            logger.logkv(key, value)
        return results

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dicts(self) -> Dict[str, Any]:
        """The guided-diffusion files' contents: model, one EMA per rate, optimizer (plain state_dicts)."""
        out = {"model": self.model.state_dict(), "opt": self.opt.state_dict()}
        for rate, ema in zip(self.ema_rates, self.ema_params):
            sd = dict(out["model"])
            for n, e in zip(self.param_names, ema):
                sd[n] = e.to(sd[n].dtype)
            out[f"ema_{fileio.format_rate(rate)}"] = sd  # the keys of fileio.checkpoint_paths
        return out

    def save(self) -> None:
        """Write the checkpoint set for ``self.step`` (rank 0), then previews; all ranks must call it."""
        rng_states = dist_util.gather_objects(get_rng_state(self.device))  # collective
        if self.rank == 0:
            paths = fileio.checkpoint_paths(self.log_dir, self.step, self.ema_rates)
            sds = self.state_dicts()
            sds["state"] = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.world_size,
                "batch_size": self.batch_size,
                "rng": rng_states,
                "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            }
            written = []
            try:
                for key in [k for k in sds if k != "model"] + ["model"]:  # model last: it marks the set complete
                    fileio.torch_save(sds[key], paths[key])
                    written.append(paths[key])
            except BaseException:  # e.g. a full disk: the files of an incomplete set would only mislead
                for path in written:
                    with contextlib.suppress(OSError):
                        os.remove(path)
                raise
            logger.log(f"saved checkpoint {paths['model']}")
            self.save_previews()
        self._last_saved = self.step
        dist_util.barrier()

    @torch.no_grad()
    def sample_preview(self, w: Optional[float]) -> torch.Tensor:
        """``sample_shape`` DDIM (or DDPM) samples (``preview_steps`` steps, fixed noise, the objective's noise_fn)
        from the online model in eval mode; class-conditional models get rows split evenly over the classes and,
        when ``w`` is a number, classifier-free guidance with weight ``w``."""
        from guided_diffusion.diffusion.respace import SpacedDiffusion, space_timesteps

        base = self.diffusion
        steps = getattr(base, "timestep_map", None)
        if steps is not None and len(steps) != getattr(base, "original_num_steps", len(steps)):
            sampler = base  # already respaced for training: sample on its grid
        else:
            sampler = SpacedDiffusion(
                use_timesteps=space_timesteps(base.num_timesteps, str(min(self.preview_steps, base.num_timesteps))),
                betas=base.betas,
                model_mean_type=base.model_mean_type,
                model_var_type=base.model_var_type,
                loss_type=base.loss_type,
                rescale_timesteps=base.rescale_timesteps,
            )
        n = self.sample_shape[0]
        noise_fn = self.objective.noise_fn
        kwargs: Dict[str, Any] = {}
        num_classes = getattr(self.model, "num_classes", None)
        if num_classes is not None:
            kwargs["model_kwargs"] = {"y": torch.arange(n, device=self.device) * num_classes // n}
            if w is not None:
                kwargs["guidance_w"] = w
        was_training = self.model.training
        self.model.eval()
        try:
            with preserved_rng(self.device), self._autocast():
                if noise_fn is None:
                    noise = torch.randn(self.sample_shape, generator=torch.Generator().manual_seed(self.seed))
                    noise = noise.to(self.device)
                else:  # e.g. simplex: the start latent and (DDPM) the step noise from the seeded global RNG
                    torch.manual_seed(self.seed)
                    noise = noise_fn(torch.zeros(self.sample_shape, device=self.device),
                                     torch.full((n,), sampler.num_timesteps - 1, device=self.device))
                loop = sampler.p_sample_loop if self.ddpm_previews else sampler.ddim_sample_loop
                return loop(self.model, self.sample_shape, noise=noise, noise_fn=noise_fn, **kwargs).float()
        finally:
            self.model.train(was_training)

    def save_previews(self) -> List[str]:
        """One PNG per guidance weight in ``image_dir`` (``{step:06d}_{w}.png``); returns the paths."""
        if self.sample_shape is None or self.preview_steps <= 0 or not self.objective.samples_images:
            return []
        guided = getattr(self.model, "num_classes", None) is not None and self.objective.classifier_free
        # w = 0 is the plain conditional prediction; unconditional and plain class-conditional models take no weight
        weights: List[Optional[float]] = (list(self.w) or [0.0]) if guided else [None]
        paths = []
        for w in weights:
            path = os.path.join(self.image_dir, f"{self.step:06d}" + (f"_{w}" if w is not None else "") + ".png")
            save_image_grid(self.sample_preview(w), path)
            paths.append(path)
        return paths


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


def _chain_first(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest
