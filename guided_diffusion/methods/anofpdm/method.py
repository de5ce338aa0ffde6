"""AnoFPDM behind the evaluation driver (``methods/base.py``): the test pass of one batch (``segment_batch``:
classification, end steps, quantile threshold, map and mask), the method's flags and their forward-loop options, and
the validation fit and test pass of ``SliceMethod``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from guided_diffusion.flags import option
from guided_diffusion.methods.anofpdm.config import UGP_MODES, ForwardConfig
from guided_diffusion.methods.anofpdm.forward import ForwardProcess, ForwardResult
from guided_diffusion.methods.anofpdm.maps import (
    A_QUANTILE,
    B_QUANTILE,
    aggregate_maps,
    aggregation_weights,
    end_steps,
    quantile_levels,
    scale_end_steps,
    threshold_maps,
)
from guided_diffusion.methods.anofpdm.selection import (
    Hyperparams,
    StepStats,
    classification_similarity,
    classify,
    fit_hyperparams,
    upstream_fallback_hyperparams,
)
from guided_diffusion.methods.base import BatchContext, SliceMethod, SliceOutput, require_classifier_free
from guided_diffusion.methods.postprocess import remove_small_components


def segment_batch(
    result: ForwardResult,
    hyper: Hyperparams,
    cfg: ForwardConfig,
    *,
    t_e_ratio: float = 1.0,
    median_kernel: int = 5,
    cc_max_size: int = 40,
    a: float = A_QUANTILE,
    b: float = B_QUANTILE,
) -> dict:
    """Classification, end steps, quantile threshold, anomaly map and post-processed mask of one batch.

    Returns tensors: ``similarity [B]``, ``pred_label [B]``, ``end_step [B,M]`` (after ``t_e_ratio``),
    ``quantile [B,M]``, ``threshold [B]``, ``anomaly_map [B,1,H,W]``, ``mask bool [B,1,H,W]`` (every slice,
    i.e. the unhealthy-setup mask; the mixed setup zeroes slices with ``pred_label == 0``).
    """
    stats = result.stats
    if len(hyper.diff_max) != stats.divergence.shape[-1]:
        raise ValueError(
            f"hyper-parameters have {len(hyper.diff_max)} modalities, the batch has {stats.divergence.shape[-1]}"
        )
    sim = classification_similarity(stats)
    pred_label = classify(sim, hyper.thr_01)
    t_e = end_steps(stats.divergence)
    q = quantile_levels(stats.divergence.amax(1), hyper.diff_max, a, b)
    if t_e_ratio == 1:
        maps = result.maps
    else:
        if result.sub_anomaly_maps is None:
            raise ValueError("t_e_ratio != 1 needs the per-step maps: run the forward process with store_maps=True")
        t_e = scale_end_steps(t_e, t_e_ratio)
        w = aggregation_weights(
            t_e, stats.divergence.shape[1], last_only=cfg.last_only, interval=cfg.interval, include_end=cfg.include_end
        )
        maps = aggregate_maps(result.sub_anomaly_maps, w.cpu()).to(result.maps.device)
    amap, mask, thr = threshold_maps(maps, q.to(maps.device), median_kernel)
    mask = remove_small_components(mask, cc_max_size)
    return {
        "similarity": sim,
        "pred_label": pred_label,
        "end_step": t_e,
        "quantile": q,
        "threshold": thr,
        "anomaly_map": amap,
        "mask": mask,
    }


@dataclass(frozen=True)
class AnoFPDMSettings:
    """AnoFPDM's flags (upstream ``translation_FPDM.py``'s names, then this project's additions)."""

    w: float = option(2.0, "guidance weight of the healthy guided prediction (paper: BraTS 2, ATLAS 30)")
    forward_steps: int = option(600, "forward steps T (on the --timestep_respacing grid; paper: 600 of 1000)")
    d_reverse: bool = option(True, "DDIM encoding (deterministic, \"AnoFPDM (DDIM)\"); false: DDPM q_sample")
    null: bool = option(True, "encode with the null embedding (paper); false: healthy-conditional")
    ugp_mode: str = option("null", "unguided prediction: null embedding (paper) or upstream's healthy-conditional "
                           "one (reproduces upstream's numbers)", choices=UGP_MODES)
    legacy_ddim_encoding: bool = option(False, "upstream's off-by-one DDIM encoding (reproduces upstream's numbers)")
    last_only: bool = option(False, "aggregate only the map at t_e - 1 (the paper's S_te rows)")
    subset_interval: int = option(-1, "aggregate every k-th step before t_e, plus t_e (<= 0: every step)")
    include_t_e: bool = option(False, "include t_e in the aggregation window (paper Eq. 20; upstream excludes it)")
    t_e_ratio: List[float] = option([1.0], "scale t_e before aggregating; several values give several results, the "
                                    "first is metrics.json's", comma_list=True)
    quantile_a: float = option(A_QUANTILE, "mask quantile for the strongest anomalies (Algorithm 1's a)")
    quantile_b: float = option(B_QUANTILE, "mask quantile for the weakest anomalies (Algorithm 1's b)")
    use_gradient_sam: bool = option(False, "ablation: gradient sub-anomaly maps")
    use_gradient_para_sam: bool = option(False, "ablation: parallel-gradient sub-anomaly maps")

    def __post_init__(self) -> None:
        if self.w < 0:
            raise ValueError(f"--w {self.w}: the guidance weight must be >= 0 (paper: BraTS 2, ATLAS 30)")
        if self.forward_steps < 1:
            raise ValueError(f"--forward_steps must be >= 1, got {self.forward_steps}")
        if self.use_gradient_sam and self.use_gradient_para_sam:
            raise ValueError("--use_gradient_sam and --use_gradient_para_sam are exclusive")
        if not self.t_e_ratio or any(not r > 0 for r in self.t_e_ratio):
            raise ValueError(f"--t_e_ratio values must be > 0 (1: t_e as found), got {list(self.t_e_ratio)}")
        if not 0 <= self.quantile_a <= self.quantile_b <= 1:
            raise ValueError(f"need 0 <= --quantile_a ({self.quantile_a}) <= --quantile_b ({self.quantile_b}) <= 1")


def forward_config(o: AnoFPDMSettings, modality: Sequence[int]) -> ForwardConfig:
    """The forward loop's options from AnoFPDM's settings and the map's channels."""
    sub = "gradient" if o.use_gradient_sam else ("gradient_para" if o.use_gradient_para_sam else "input")
    return ForwardConfig(
        w=o.w,
        forward_steps=o.forward_steps,
        modality=list(modality),
        ddim=o.d_reverse,
        ugp_mode=o.ugp_mode,
        encode_null=o.null,
        legacy_ddim_encoding=o.legacy_ddim_encoding,
        sub_anomaly=sub,
        last_only=o.last_only,
        interval=o.subset_interval if o.subset_interval > 0 else 1,
        include_end=o.include_t_e,
        store_maps=any(r != 1 for r in o.t_e_ratio),
    )


class AnoFPDM(SliceMethod):
    """AnoFPDM as a slice method: validation records are the per-step curves ``StepStats`` ``[B, T, M]``;
    ``fit`` selects ``thr_01`` and ``M_max`` from slice labels only; ``test_batch`` runs ``segment_batch`` for every
    ``--t_e_ratio`` (the first is the main result, the others are ``variants``)."""

    name = "anofpdm"
    uses_pixel_labels = False
    variant_key = "t_e_ratio"
    caption_columns = ("end_step",)
    Settings = AnoFPDMSettings

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion,
        cfg: ForwardConfig,
        *,
        checkpoint: Optional[str] = None,
        t_e_ratio: Sequence[float] = (1.0,),
        median_kernel: int = 5,
        cc_max_size: int = 40,
        a: float = A_QUANTILE,
        b: float = B_QUANTILE,
        precision: str = "fp32",
        dataset: str = "brats",
        max_rows: Optional[int] = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        from guided_diffusion.methods.base import autocast_dtype

        cfg.validate()
        if len(t_e_ratio) == 0:
            raise ValueError("--t_e_ratio needs at least one value")
        if any(r != 1 for r in t_e_ratio) and not cfg.store_maps:
            raise ValueError("t_e_ratio != 1 needs the per-step maps: build the ForwardConfig with store_maps=True")
        self.model, self.diffusion, self.cfg = model, diffusion, cfg
        self.checkpoint, self.t_e_ratio = checkpoint, [float(r) for r in t_e_ratio]
        self.median_kernel, self.cc_max_size, self.a, self.b = median_kernel, cc_max_size, a, b
        self.precision, self.dataset = precision, dataset
        self.process = ForwardProcess(model, diffusion, cfg, autocast_dtype(precision), max_rows=max_rows,
                                      channels_last=channels_last, compile=compile)

    @classmethod
    def check(cls, s) -> None:
        o = s.options
        require_classifier_free(s.source.model, "AnoFPDM", f" (from {s.source.flags_source})")
        if o.forward_steps > s.grid_steps:
            raise ValueError(f"--forward_steps must lie in [1, {s.grid_steps}] (the diffusion's steps"
                             f"{', respaced' if s.source.model.timestep_respacing else ''}), got {o.forward_steps}")
        forward_config(o, s.maps.modality).validate(s.source.model.in_channels)

    @classmethod
    def build(cls, s, device: torch.device) -> "AnoFPDM":
        from guided_diffusion import logger

        o = s.options
        model, diffusion, path = s.source.load(device, warn=logger.warn)
        return cls(model, diffusion, forward_config(o, s.maps.modality), checkpoint=path, t_e_ratio=o.t_e_ratio,
                   median_kernel=s.maps.kernel, cc_max_size=s.component_size, a=o.quantile_a, b=o.quantile_b,
                   precision=s.precision, dataset=s.dataset,
                   max_rows=None if s.compute.max_rows < 0 else s.compute.max_rows,
                   channels_last=s.compute.channels_last, compile=s.compute.compile)

    def settings(self) -> dict:
        c = self.cfg
        return {"method": self.name, "w": c.w, "forward_steps": c.forward_steps, "modality": list(c.modality),
                "d_reverse": c.ddim, "ugp_mode": c.ugp_mode, "null": c.encode_null,
                "legacy_ddim_encoding": c.legacy_ddim_encoding, "sub_anomaly": c.sub_anomaly,
                "clip_denoised": c.clip_denoised, "healthy_label": c.healthy_label, "last_only": c.last_only,
                "subset_interval": c.interval, "include_t_e": c.include_end, "t_e_ratio": self.t_e_ratio,
                "median_kernel": self.median_kernel, "cc_max_size": self.cc_max_size, "quantile_a": self.a,
                "quantile_b": self.b, "precision": self.precision}

    #: settings that act on the test maps only: thr_01 and M_max come from the validation curves, which they leave as
    #: they are (the curves of the guided and unguided MSE and the divergence M_t do not depend on S_t)
    TEST_ONLY_SETTINGS = ("t_e_ratio", "median_kernel", "cc_max_size", "quantile_a", "quantile_b", "last_only",
                          "subset_interval", "include_t_e", "sub_anomaly")

    def fit_settings(self) -> dict:
        return {k: v for k, v in self.settings().items() if k not in self.TEST_ONLY_SETTINGS}

    def checkpoints(self) -> list:
        return [self.checkpoint] if self.checkpoint else []

    def steps_per_batch(self, split: str) -> int:
        return self.cfg.forward_steps

    def variants(self) -> list:
        return list(self.t_e_ratio)

    def _run(self, x: torch.Tensor, ctx: BatchContext, with_maps: bool) -> ForwardResult:
        return self.process.run(x.float(), with_maps=with_maps, generator=ctx.generator, progress=ctx.progress,
                                noise_rows=ctx.noise_rows(x.shape[0]))

    def validation_batch(self, x: torch.Tensor, ctx: BatchContext) -> dict:
        return self._run(x, ctx, with_maps=False).stats.to_numpy()

    def fit(self, records: dict, labels: np.ndarray, gt_masks: Optional[np.ndarray]) -> dict:
        # slice labels only: the driver passes no pixel labels to a method that does not declare them
        stats = StepStats.from_numpy(records)
        return fit_hyperparams(stats, torch.as_tensor(np.asarray(labels)).long()).to_dict()

    def hyperparams_without_validation(self) -> dict:
        hyper = upstream_fallback_hyperparams(self.dataset, self.cfg.forward_steps, len(self.cfg.modality), self.cfg)
        return hyper.to_dict()

    def check_hyperparams(self, hyper: dict) -> dict:
        missing = [k for k in ("thr_01", "diff_max") if k not in hyper]
        if missing:
            raise ValueError(f"AnoFPDM hyper-parameters need {' and '.join(missing)}")
        number = (int, float)
        if not isinstance(hyper["thr_01"], number) or isinstance(hyper["thr_01"], bool):
            raise ValueError(f"thr_01 must be a number, got {hyper['thr_01']!r}")
        if not math.isfinite(hyper["thr_01"]):
            raise ValueError(f"thr_01 must be a finite number (a cosine similarity), got {hyper['thr_01']!r}")
        for key in ("diff_max", "diff_min"):
            values = hyper.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, number) and not isinstance(v, bool)
                                                       for v in values):
                raise ValueError(f"{key} must be a list of numbers (one per --modality), got {values!r}")
        # M_t is a mean squared difference: M_max > 0 (it divides M_te in the quantile schedule), M_min >= 0
        if not all(math.isfinite(v) and v > 0 for v in hyper["diff_max"]):
            raise ValueError(f"diff_max (M_max, the largest divergence of the unhealthy validation slices) must be "
                             f"positive finite numbers, got {hyper['diff_max']!r}")
        if not all(math.isfinite(v) and v >= 0 for v in hyper.get("diff_min", [])):
            raise ValueError(f"diff_min (M_min) must be finite numbers >= 0, got {hyper['diff_min']!r}")
        h = Hyperparams.from_dict(hyper)
        if len(h.diff_max) != len(self.cfg.modality):
            raise ValueError(f"{len(h.diff_max)} modalities in diff_max; --modality gives {len(self.cfg.modality)}")
        return dict(hyper, **{k: getattr(h, k) for k in ("thr_01", "diff_max", "diff_min", "source")})

    def describe(self, hyper: dict) -> str:
        h = Hyperparams.from_dict(hyper)
        return (f"thr_01 {h.thr_01:.8f}, diff_max {h.diff_max}, diff_min {h.diff_min}, val errors {h.n_errors} of "
                f"{h.n_val} ({h.n_val_unhealthy} unhealthy), val accuracy {h.val_accuracy} ({h.source})")

    def test_batch(self, x: torch.Tensor, hyper: dict, ctx: BatchContext) -> SliceOutput:
        h = Hyperparams.from_dict(hyper)
        res = self._run(x, ctx, with_maps=True)
        outputs = []
        for ratio in self.t_e_ratio:
            seg = segment_batch(res, h, self.cfg, t_e_ratio=ratio, median_kernel=self.median_kernel,
                                cc_max_size=self.cc_max_size, a=self.a, b=self.b)
            outputs.append(SliceOutput(
                anomaly_map=seg["anomaly_map"].float(),
                mask=seg["mask"].bool(),
                pred_label=seg["pred_label"].long(),
                columns={"similarity": seg["similarity"].cpu().numpy(), "threshold": seg["threshold"].cpu().numpy(),
                         "end_step": seg["end_step"].cpu().numpy(), "quantile": seg["quantile"].cpu().numpy()},
            ))
        main = outputs[0]
        main.arrays = res.stats.to_numpy()  # mse_guided, mse_unguided, divergence, sam_mean [B, T, M]
        main.variants = outputs[1:]
        return main
