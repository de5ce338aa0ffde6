"""The forward process of AnoFPDM: for every step, the healthy guided and the unguided prediction of x0 from
the latent x_t, their per-step statistics and the streamed sub-anomaly maps (see the package docstring).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from guided_diffusion.methods.anofpdm.config import ForwardConfig
from guided_diffusion.methods.anofpdm.maps import StreamingAggregator, end_steps
from guided_diffusion.methods.anofpdm.selection import StepStats


@dataclass
class ForwardResult:
    stats: StepStats  # [B, T, M] scalars
    maps: torch.Tensor  # [B, M, H, W] aggregated sub-anomaly maps for the argmax end step
    end_step: torch.Tensor  # [B, M] t_e
    sub_anomaly_maps: Optional[torch.Tensor] = None  # [B, T, M, H, W] on the CPU when store_maps


def _at(arr, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a per-step numpy/tensor schedule at steps ``t`` and broadcast to ``like``'s shape."""
    v = torch.as_tensor(np.asarray(arr), dtype=torch.float64)[t.cpu()].to(like.device, like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class ForwardProcess:
    """The HGP/UGP predictions along the forward process for one batch (see the module docstring).

    NFEs per step: the conditional and the null prediction of every row (2B rows). The legacy DDIM encoding adds
    one more prediction per row and step (B rows), because its inversion uses a different timestep label than the
    predictions.

    How the model runs (the same function in every case; outputs agree to float precision):

    * ``max_rows``: rows per model call. None (default): on a CPU, the conditional and the null rows in separate
      calls of at most ``cpu_call_elements`` first-level feature-map elements each (faster per row than one large
      call); on other devices one call of all 2B rows. 0: one call of all 2B rows. An int: separate conditional /
      null calls of at most that many rows.
    * ``channels_last``: convert the model's 4-D weights to ``torch.channels_last`` (in place; the model stays
      converted) and run its convolutions in that layout.
    * ``compile``: run the model through ``torch.compile`` (a fresh model compiles into one graph: HAE models build
      their masks at construction); the first call of each shape pays the compilation.
    """

    # On a CPU a call's cost per row grows once its feature maps outgrow the caches (measured: 2-8 rows of the
    # 64 px, 32-128 channel models are the fastest, 32 rows cost 15-40 % more per row; bench/results/, issue 20)
    cpu_call_elements = 1 << 21

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion,
        cfg: ForwardConfig,
        autocast_dtype: Optional[torch.dtype] = None,
        *,
        max_rows: Optional[int] = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: one call per step; None: chosen for the device), got {max_rows}")
        self.model, self.diffusion, self.cfg = model, diffusion, cfg
        self.autocast_dtype = autocast_dtype
        self.max_rows = max_rows
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.compile = compile
        self._compiled: Optional[Callable] = None

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def rows_per_call(self, x: torch.Tensor) -> Optional[int]:
        """The ``max_rows`` used for a batch like ``x`` (None: all 2B rows in one call)."""
        if self.max_rows is not None:
            return self.max_rows or None
        if x.device.type != "cpu":
            return None
        width = getattr(self.model, "model_channels", 64) * getattr(self.model, "channel_mult", (1,))[0]
        return max(1, self.cpu_call_elements // int(width * x.shape[-2] * x.shape[-1]))

    def _network(self) -> Callable:
        """The model as called: compiled at first use when asked (HAE models build their masks at construction,
        so compiled code only reads them)."""
        if not self.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _xstart(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x0 = self.diffusion.predict_xstart_from_eps(x, t, eps)
        return x0.clamp(-1, 1) if self.cfg.clip_denoised else x0

    def _guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict:
        with self._autocast(x.device):
            out = self.diffusion.guided_eps(self._network(), self._inputs(x), t, y, self.cfg.w,
                                            max_rows=self.rows_per_call(x))
        return {k: v.float().contiguous() for k, v in out.items() if v is not None}

    def _encode_eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps for the inversion: null embedding with --null True, else healthy-conditional (B rows).

        Goes through the diffusion (so respaced timesteps are mapped like every other call); only the legacy
        encoding needs this separate forward.
        """
        with self._autocast(x.device):
            eps = self.diffusion.condition_eps(self._network(), self._inputs(x), t, y, null=self.cfg.encode_null,
                                               max_rows=self.rows_per_call(x) or x.shape[0])
        return eps.float().contiguous()

    def _inversion_step(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """DDIM inversion t -> t+1 from eps at (x, t), eps re-derived from the clipped x̂0 as upstream does."""
        return self.diffusion.ddim_reverse_step_from_eps(x, t, eps, clip_denoised=self.cfg.clip_denoised)

    def _sub_anomaly(self, x0g: torch.Tensor, x0u: torch.Tensor, src: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.sub_anomaly == "input":
            return (x0g - src) ** 2
        sam = (x0g - x0u) ** 2
        if self.cfg.sub_anomaly == "gradient":
            abar = _at(self.diffusion.alphas_cumprod, t, sam)
            b_t = (1 - abar) / abar.sqrt()
            sam = sam / (b_t**2 * (1 + self.cfg.w) ** 2)
        return sam

    @torch.no_grad()
    def run(
        self,
        x0: torch.Tensor,
        *,
        with_maps: bool = True,
        generator: Optional[torch.Generator] = None,
        progress: Optional[Callable[[int], None]] = None,
        noise_rows: Optional[tuple[int, int, int]] = None,
    ) -> ForwardResult:
        """Run T forward steps on the batch ``x0`` ``[B, C, H, W]`` in [-1, 1].

        ``noise_rows=(global_batch, rank, world_size)``: draw the noise for the whole global batch and keep the
        rows ``rank::world_size`` (this rank's share of it), so every slice gets the same noise whatever the
        number of processes.
        """
        cfg = self.cfg
        cfg.validate(x0.shape[1])
        b = x0.shape[0]
        device = x0.device
        if device.type == "cuda":
            from guided_diffusion import runtime

            runtime.configure_cuda()  # TF32 off (fp32 is fp32), cuDNN autotuning on: runtime.py says why
        mod = list(cfg.modality)
        src = x0[:, mod].float()
        y = torch.full((b,), cfg.healthy_label, dtype=torch.long, device=device)
        agg = StreamingAggregator(last_only=cfg.last_only, interval=cfg.interval, include_end=cfg.include_end)
        stored = [] if cfg.store_maps else None
        stats = {k: [] for k in StepStats.__dataclass_fields__}

        def noise() -> torch.Tensor:
            if noise_rows is None:
                return torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
            rows, rank, world = noise_rows
            full = torch.randn((rows, *x0.shape[1:]), generator=generator, dtype=torch.float32)
            return full[rank::world][:b].to(device)

        x = None
        for step in range(cfg.forward_steps):
            t = torch.full((b,), step, dtype=torch.long, device=device)
            if not cfg.ddim:
                x = self.diffusion.q_sample(x0, t, noise=noise())
            elif step == 0:
                # the paper's x_1: q_sample to the first level (seeded noise at scale sqrt(1 - abar_0) = 0.01)
                x = self.diffusion.q_sample(x0, t, noise=noise())
            elif cfg.legacy_ddim_encoding:
                # upstream: invert with the model at label t from the latent of label t-1 -> level t+1, labelled t
                x = self._inversion_step(x, t, self._encode_eps(x, t, y))
            # (correct DDIM encoding: x was advanced at the end of the previous step)

            out = self._guided(x, t, y)
            eps_u = out["eps_null"] if cfg.ugp_mode == "null" else out["eps_cond"]
            x0g = self._xstart(x, t, out["eps"])[:, mod]
            x0u = self._xstart(x, t, eps_u)[:, mod]
            sam = self._sub_anomaly(x0g, x0u, src, t)
            stats["mse_guided"].append(((x0g - src) ** 2).mean((-2, -1)))
            stats["mse_unguided"].append(((x0u - src) ** 2).mean((-2, -1)))
            div = ((x0g - x0u) ** 2).mean((-2, -1))
            stats["divergence"].append(div)
            stats["sam_mean"].append(sam.mean((-2, -1)))
            if with_maps:
                agg.update(step, sam, div)
                if stored is not None:
                    stored.append(sam.cpu())

            if cfg.ddim and not cfg.legacy_ddim_encoding and step + 1 < cfg.forward_steps:
                # the inversion eps at (x_t, t) is already known from this step's batched forward
                eps_enc = out["eps_null"] if cfg.encode_null else out["eps_cond"]
                x = self._inversion_step(x, t, eps_enc)
            if progress is not None:
                progress(1)

        step_stats = StepStats(**{k: torch.stack(v, 1).float() for k, v in stats.items()})
        if with_maps:
            maps, t_e = agg.maps, agg.end_step
        else:
            maps, t_e = torch.zeros(0), end_steps(step_stats.divergence)
        return ForwardResult(
            stats=step_stats,
            maps=maps,
            end_step=t_e,
            sub_anomaly_maps=torch.stack(stored, 1) if stored else None,
        )
