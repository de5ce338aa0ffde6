"""What the reconstruction baselines share: anomaly map, threshold, component filter, slice label.

A reconstruction method maps a slice x0 to a "healthy" reconstruction x̂ (AnoDDPM: noise and denoise;
classifier-guided DDIM; DDIB). As upstream (``obtain_hyperpara.get_mask_batch`` and ``evaluate``):

* anomaly map = 5×5 median (reflect padding) of the mean over the ``--modality`` channels of (x0 − x̂)²;
* mask = map ≥ threshold, then 8-connected components of at most ``--cc_filter_size`` pixels are removed
  (the test pass of every upstream baseline filters; ``postprocess.remove_small_components``);
* predicted slice label = 1 if the mask has any pixel *before* the component filter (upstream's ``pred_lab``);
  there is no classification gate: the mixed and unhealthy setups score the same mask (an empty mask after the
  filter on a slice labelled 1 is scored as empty either way);
* the threshold is tuned on pixel-labelled validation slices (``threshold.search_threshold``), so every output of
  these methods says ``pixel_labels_used``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, TypeVar

import numpy as np
import torch

from guided_diffusion.errors import HyperparameterError
from guided_diffusion.flags import option
from guided_diffusion.methods import threshold as thr_search
from guided_diffusion.methods.base import BatchContext, Hyper, Records, SliceMethod, SliceOutput
from guided_diffusion.methods.postprocess import median_filter2d, threshold_mask

T = TypeVar("T")

# upstream's recorded thresholds for --num_batches_val 0 (they belong to upstream's checkpoints and settings)
UPSTREAM_THRESHOLDS = {
    "anoddpm": "0.08 (BraTS, DDPM, S=200, simplex; upstream used it for ATLAS too; 0.27 for ATLAS is commented out)",
    "clf_guided": "0.24 (BraTS, S=200, s=1000); 0.63 for ATLAS (S=200, s=500)",
    "ddib": "0.22 (BraTS, S=450, w=1.1, model 210000); 0.52 (ATLAS, S=300, w=1.3, model 290000)",
}


def reconstruction_map(x0: torch.Tensor, x_hat: torch.Tensor, modality: Sequence[int],
                       median_kernel: int = 5) -> torch.Tensor:
    """Median-filtered mean over ``modality`` of (x0 − x̂)²: ``[B, C, H, W]`` x2 -> float32 ``[B, 1, H, W]``."""
    mod = list(modality)
    err = ((x0[:, mod].float() - x_hat[:, mod].float()) ** 2).mean(1, keepdim=True)
    return median_filter2d(err, median_kernel)


def run_counted(steps: Iterable[T], ctx: Optional[BatchContext]) -> T:
    """Run a sampling (or encoding) loop to its end, one progress step of ``ctx`` per item; its last item."""
    last = None
    for last in steps:
        if ctx is not None:
            ctx.step()
    return last


def parse_grid(text: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--threshold_grid must be 'start,stop,step' (upstream 0.01,0.7,0.01), got {text!r}") from None
    thr_search.threshold_grid(start, stop, step)  # validates
    return start, stop, step


@dataclass(frozen=True)
class ReconstructionSettings:
    """The flags every reconstruction baseline reads (upstream's names where upstream had them)."""

    sample_steps: int = option(1000, "S: noise to step S-1 and reconstruct from there (on the --timestep_respacing "
                               "grid; upstream: AnoDDPM 200, DDIM clf 200, DDIB BraTS 450 / ATLAS 300 of 1000)")
    opt_thr: float = option(-1.0, "mask threshold for a run without validation (--num_batches_val 0; -1: none)")
    threshold_grid: str = option("0.01,0.7,0.01", "start,stop,step of the threshold search on pixel-labelled "
                                 "validation slices (upstream's)")

    def __post_init__(self) -> None:
        if self.sample_steps < 1:
            raise ValueError(f"--sample_steps must be >= 1, got {self.sample_steps}")
        parse_grid(self.threshold_grid)


class ReconstructionMethod(SliceMethod):
    """A baseline that reconstructs each slice; subclasses implement ``reconstruct`` and ``settings``."""

    uses_pixel_labels = True
    caption_columns = ("threshold",)

    Settings = ReconstructionSettings

    @classmethod
    def check(cls, s) -> None:
        if s.options.sample_steps > s.grid_steps:
            raise ValueError(f"--sample_steps must lie in [1, {s.grid_steps}] (the diffusion's steps"
                             f"{', respaced' if s.source.model.timestep_respacing else ''}), got "
                             f"{s.options.sample_steps}")

    def __init__(self, *, modality: Sequence[int], median_kernel: int = 5, cc_max_size: int = 40,
                 grid: Sequence[float] = thr_search.UPSTREAM_GRID, opt_thr: float = -1.0):
        if len(modality) == 0 or len(set(modality)) != len(modality):
            raise ValueError(f"--modality must list distinct channel indices, got {list(modality)}")
        self.modality = list(modality)
        self.median_kernel = median_kernel
        self.cc_max_size = cc_max_size
        self.grid = tuple(float(g) for g in grid)
        self.opt_thr = opt_thr

    @staticmethod
    def common_kwargs(s) -> Dict[str, Any]:
        """The constructor's shared arguments from ``InferenceSettings``."""
        return dict(modality=list(s.maps.modality), median_kernel=s.maps.kernel, cc_max_size=s.component_size,
                    grid=parse_grid(s.options.threshold_grid), opt_thr=s.options.opt_thr)

    def common_settings(self) -> Dict[str, Any]:
        return {"method": self.name, "modality": self.modality, "median_kernel": self.median_kernel,
                "cc_max_size": self.cc_max_size}

    @abc.abstractmethod
    def reconstruct(self, x0: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """The healthy reconstruction x̂ ``[B, C, H, W]`` of ``x0``."""

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or any(not 0 <= m < x.shape[1] for m in self.modality):
            raise ValueError(f"{self.name}: --modality {self.modality} does not fit a batch of shape {tuple(x.shape)}")

    def anomaly_map(self, x: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        x_hat = self.reconstruct(x, ctx)
        return reconstruction_map(x, x_hat, self.modality, self.median_kernel), x_hat

    def validation_batch(self, x: torch.Tensor, ctx: BatchContext) -> Records:
        amap, _ = self.anomaly_map(x, ctx)
        return {"anomaly_map": amap.cpu().numpy()}

    def fit(self, records: Records, labels: np.ndarray, gt_masks: Optional[np.ndarray]) -> Hyper:
        if gt_masks is None:
            raise ValueError(f"{self.name} tunes its threshold on pixel labels: the validation masks are needed")
        if not np.asarray(gt_masks).any():
            raise HyperparameterError(
                f"{self.name}'s threshold cannot be tuned: the {len(gt_masks)} validation slice(s) have no lesion "
                "pixel, so the Dice search would pick a threshold that predicts nothing; --opt_thr T sets one by hand")
        grid = thr_search.threshold_grid(*self.grid)
        best, dice, curve = thr_search.search_threshold(records["anomaly_map"], gt_masks, grid, self.cc_max_size)
        labels = np.asarray(labels).reshape(-1)
        return {"threshold": best, "val_dice": dice, "n_val": int(labels.size),
                "n_val_unhealthy": int((labels == 1).sum()), "grid": list(self.grid),
                "val_dice_by_threshold": [float(d) for d in curve], "source": "validation (pixel labels)"}

    def hyperparams_without_validation(self) -> Hyper:
        if self.opt_thr >= 0:
            return {"threshold": float(self.opt_thr), "source": "--opt_thr"}
        raise ValueError(
            f"{self.name}: --num_batches_val 0 needs a threshold: pass --opt_thr T or --hyperparams_file (the "
            f"hyperparams.json of an earlier run), or run a validation pass (--num_batches_val N). Upstream's "
            f"recorded value, for its own checkpoints: {UPSTREAM_THRESHOLDS.get(self.name, 'none')}")

    def check_hyperparams(self, hyper: Hyper) -> Hyper:
        t = hyper.get("threshold")
        if not isinstance(t, (int, float)) or not np.isfinite(t):
            raise ValueError(f"{self.name} hyper-parameters need a finite 'threshold', got {t!r}")
        return hyper

    def describe(self, hyper: Hyper) -> str:
        extra = f", validation mixed Dice {hyper['val_dice']:.4f}" if "val_dice" in hyper else ""
        return f"threshold {hyper['threshold']:.4g} ({hyper.get('source', '?')}){extra}"

    def test_batch(self, x: torch.Tensor, hyper: Hyper, ctx: BatchContext) -> SliceOutput:
        self.check_hyperparams(hyper)
        amap, x_hat = self.anomaly_map(x, ctx)
        mask, pred_label = threshold_mask(amap, float(hyper["threshold"]), self.cc_max_size)
        b = x.shape[0]
        return SliceOutput(
            anomaly_map=amap,
            mask=mask,
            pred_label=pred_label,
            columns={"threshold": np.full(b, float(hyper["threshold"])),
                     "recon_error": amap.flatten(1).mean(1).cpu().numpy()},
            arrays={"reconstruction": x_hat.float().cpu().numpy()},
        )


def sample_steps_grid(diffusion) -> int:
    return int(diffusion.num_timesteps)


def check_sample_steps(sample_steps: int, diffusion, flag: str = "--sample_steps") -> None:
    grid = sample_steps_grid(diffusion)
    if not 1 <= sample_steps <= grid:
        raise ValueError(f"{flag} must lie in [1, {grid}] (the diffusion's steps, respaced if --timestep_respacing "
                         f"is set), got {sample_steps}")


def loaded_model(s, device: torch.device, *, what: str):
    """(model in eval mode, diffusion, checkpoint path) of ``s.source`` (``InferenceSettings``); errors say which of
    the method's models failed."""
    from guided_diffusion import logger

    try:
        return s.source.load(device, warn=logger.warn)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


__all__: List[str] = ["reconstruction_map", "ReconstructionMethod", "ReconstructionSettings",
                      "UPSTREAM_THRESHOLDS", "check_sample_steps", "loaded_model", "parse_grid", "run_counted"]
