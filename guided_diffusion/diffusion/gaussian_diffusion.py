"""Gaussian diffusion (DDPM / DDIM) with classifier-free guidance, in the guided-diffusion API.

Conventions (as upstream guided-diffusion):
- Timesteps are 0-based indices t in [0, T-1] on this diffusion's grid (respaced grids see respace.py);
  alpha_bar[t] = prod_{s<=t} (1 - beta_s), so t=0 is already slightly noisy (alpha_bar[0] = 1 - beta_0).
- The "clean" level (alpha_bar = 1) is reachable as t = -1 in the explicit step functions
  (`ddim_step_from_eps(x, 0, eps)` lands on it, `ddim_reverse_step_from_eps(x, -1, eps)` leaves it).
- Models are called as `model(x, t, **model_kwargs)` and return eps (first C channels) and, when the
  variance is learned, C more channels of variance values.
- Classifier-free guidance: eps = (1 + w) * eps_cond - w * eps_null (AnoFPDM paper Eq. 6), computed in ONE
  batched forward whose second half has the per-row `null=True` flag (`guided_eps`, `cfg_model_fn`).
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch as th

from guided_diffusion.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from guided_diffusion.diffusion.noise import NoiseFn

Timesteps = Union[int, th.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Noise schedules


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64, length T) for a named schedule: "linear" or "cosine".

    linear: linspace(1e-4 * k, 0.02 * k, T) with k = 1000 / T, so any T keeps the shape of the 1000-step schedule.
    cosine: Nichol & Dhariwal, alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, betas clipped at 0.999.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise NotImplementedError(f"unknown noise_schedule {schedule_name!r} (use 'linear' or 'cosine')")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas: beta_i = 1 - abar((i+1)/T) / abar(i/T)."""
    T = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # model outputs log variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (first entry replaced by beta~_1)
    LEARNED_RANGE = enum.auto()  # model outputs v in [-1, 1] interpolating log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # eps-MSE (+ VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # same, VB term scaled by T/1000 (Improved DDPM)
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------------------------------------------------
# Small tensor helpers


def _coef_dtype(x: th.Tensor) -> th.dtype:
    # float64 stays float64 (exact tests); everything else gets float32 coefficients
    return th.float64 if x.dtype == th.float64 else th.float32


def _timesteps(t: Timesteps, x: th.Tensor) -> th.Tensor:
    """An int or a [B] tensor -> a [B] int64 tensor on x's device."""
    if isinstance(t, th.Tensor):
        t = t.to(device=x.device, dtype=th.long)
        return t.expand(x.shape[0]) if t.ndim == 0 else t
    return th.full((x.shape[0],), int(t), device=x.device, dtype=th.long)


def _extract(arr: np.ndarray, t: th.Tensor, x: th.Tensor) -> th.Tensor:
    """arr[t] as a tensor broadcastable to x ([B, 1, 1, ...])."""
    values = th.from_numpy(arr).to(device=x.device)[t].to(_coef_dtype(x))
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def _split_eps(model_output: th.Tensor, channels: int) -> tuple[th.Tensor, Optional[th.Tensor]]:
    """Split a model output into (eps, variance values or None); 2C channels means a learned variance."""
    if model_output.shape[1] == channels:
        return model_output, None
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    raise ValueError(
        f"model returned {model_output.shape[1]} channels for a {channels}-channel input "
        f"(expected {channels}, or {2 * channels} with learn_sigma)"
    )


def _repeat_rows(value: Any, batch: int) -> Any:
    """Duplicate per-row tensors (first dim == batch) so they match cat([x, x])."""
    if isinstance(value, th.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return th.cat([value, value])
    return value


def _slice_rows(value: Any, batch: int, rows: slice) -> Any:
    """Rows ``rows`` of a per-row tensor (first dim == batch); anything else as it is."""
    if isinstance(value, th.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def _labels(y: Optional[th.Tensor], kwargs: dict, x: th.Tensor) -> th.Tensor:
    if y is None:
        y = kwargs.get("y")
    if y is None:
        raise ValueError("classifier-free guidance needs class labels: pass y or model_kwargs['y']")
    y = th.as_tensor(y, device=x.device)
    return y.expand(x.shape[0]) if y.ndim == 0 else y


def _sampling_kwargs(model_kwargs: Optional[dict]) -> dict:
    """model_kwargs minus what guidance sets itself (y, null, clf_free); labels are never dropped at sampling."""
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k not in ("y", "null", "clf_free")}
    if "threshold" in kwargs:
        kwargs["threshold"] = -1  # never drop labels at sampling time; nulls are explicit
    return kwargs


def _one_condition(
    model: Callable, x: th.Tensor, t: th.Tensor, y: th.Tensor, null: bool, kwargs: dict, max_rows: Optional[int]
) -> th.Tensor:
    """The model's output for every row under one condition (all conditional or all null), in calls of at most
    ``max_rows`` rows (None: one call)."""
    B = x.shape[0]
    step = B if not max_rows else max_rows
    outs = []
    for start in range(0, B, step):
        rows = slice(start, start + step)
        outs.append(model(x[rows], t[rows], y=y[rows], null=null, clf_free=True,
                          **{k: _slice_rows(v, B, rows) for k, v in kwargs.items()}))
    return outs[0] if len(outs) == 1 else th.cat(outs)


def _guided_forward(
    model: Callable,
    x: th.Tensor,
    t: th.Tensor,
    y: Optional[th.Tensor],
    w: float,
    model_kwargs: Optional[dict],
    max_rows: Optional[int] = None,
) -> Dict[str, th.Tensor]:
    """Conditional + null predictions; returns eps, eps_cond, eps_null[, var_values].

    ``max_rows`` None: ONE batched forward of the 2B rows (a per-row null mask). An int: the conditional rows and
    the null rows in separate calls of at most ``max_rows`` rows each, every call with a fixed condition (the
    model then needs no per-row mask). The same function either way; which is faster depends on the device: on
    a CPU a call's cost per row grows once its activations outgrow the caches, on a GPU larger calls are cheaper.
    """
    kwargs = dict(model_kwargs or {})
    y = _labels(y, kwargs, x)
    B = x.shape[0]
    kwargs = _sampling_kwargs(kwargs)
    if max_rows is None:
        null = th.cat([th.zeros(B, dtype=th.bool), th.ones(B, dtype=th.bool)]).to(x.device)
        kwargs = {k: _repeat_rows(v, B) for k, v in kwargs.items()}
        out = model(th.cat([x, x]), th.cat([t, t]), y=th.cat([y, y]), null=null, clf_free=True, **kwargs)
        out_cond, out_null = out[:B], out[B:]
    else:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (or None for one call), got {max_rows}")
        out_cond = _one_condition(model, x, t, y, False, kwargs, max_rows)
        out_null = _one_condition(model, x, t, y, True, kwargs, max_rows)
    eps_cond, var_cond = _split_eps(out_cond, x.shape[1])
    eps_null, _ = _split_eps(out_null, x.shape[1])
    out = {"eps": (1 + w) * eps_cond - w * eps_null, "eps_cond": eps_cond, "eps_null": eps_null}
    if var_cond is not None:
        out["var_values"] = var_cond  # the conditional rows' variance (learn_sigma only)
    return out


def cfg_model_fn(model: Callable, w: float) -> Callable:
    """Wrap a class-conditional model into a model_fn whose eps is classifier-free guided.

    `model_fn(x, t, y=..., **kw)` runs ONE batched forward (rows [cond; null], per-row `null` tensor,
    `clf_free=True`) and returns (1 + w) * eps_cond - w * eps_null, with the conditional rows' variance
    channels appended when the model learns sigma. Usable with every sampling loop, e.g.
    `diffusion.ddim_sample_loop(cfg_model_fn(model, 2.0), shape, model_kwargs={"y": y})`
    (equivalent to passing `guidance_w=2.0`).
    """

    def model_fn(x: th.Tensor, t: th.Tensor, **kwargs) -> th.Tensor:
        out = _guided_forward(model, x, t, kwargs.pop("y", None), w, kwargs)
        if "var_values" not in out:
            return out["eps"]
        return th.cat([out["eps"], out["var_values"]], dim=1)

    model_fn.guided_model = model  # for introspection / tests
    return model_fn


def _last(items: Iterator[Any]) -> Any:
    """The last item of a (sampling) iterator, after running it to the end."""
    last = None
    for last in items:
        pass
    return last


def _progress(indices: range, progress: bool) -> Iterable[int]:
    """The loop's indices, behind a tqdm bar when asked."""
    if not progress:
        return indices
    from tqdm.auto import tqdm

    return tqdm(indices)


class _RescaledTimestepModel:
    """Passes t * 1000 / T (float) to the model, as guided-diffusion's rescale_timesteps."""

    def __init__(self, model: Callable, num_timesteps: int):
        self.model, self.num_timesteps = model, num_timesteps

    def __call__(self, x, t, **kwargs):
        return self.model(x, t.float() * (1000.0 / self.num_timesteps), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Diffusion


class GaussianDiffusion:
    """DDPM/DDIM utilities for a fixed beta schedule (see module docstring for conventions).

    :param betas: 1-D float64 array of betas, one per timestep, each in (0, 1].
    :param model_mean_type: what the model output means (EPSILON for AnoFPDM).
    :param model_var_type: how the reverse-process variance is obtained.
    :param loss_type: training loss.
    :param rescale_timesteps: pass t scaled to [0, 1000) floats to the model instead of integer indices.
    """

    def __init__(
        self,
        *,
        betas: Sequence[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # alpha_bar on the extended grid t = -1 (clean, 1.0) .. T (pure noise, 0.0), indexed by t + 1
        self.alphas_cumprod_ext = np.concatenate([[1.0], self.alphas_cumprod, [0.0]])

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t=0; clip the log for the first entry
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else np.maximum(self.posterior_variance, 1e-20)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- model plumbing -----------------------------------------------------------------------------------

    def _wrap_model(self, model: Callable) -> Callable:
        """The callable the diffusion actually calls; SpacedDiffusion maps respaced t to original t here."""
        if self.rescale_timesteps:
            return _RescaledTimestepModel(model, self.num_timesteps)
        return model

    # -- forward process ----------------------------------------------------------------------------------

    def q_mean_variance(self, x_start: th.Tensor, t: Timesteps):
        """Mean, variance and log variance of q(x_t | x_0)."""
        t = _timesteps(t, x_start)
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: th.Tensor, t: Timesteps, noise: Optional[th.Tensor] = None) -> th.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        t = _timesteps(t, x_start)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: th.Tensor, x_t: th.Tensor, t: Timesteps):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        t = _timesteps(t, x_t)
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = _extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- eps <-> x0 ---------------------------------------------------------------------------------------

    def predict_xstart_from_eps(self, x_t: th.Tensor, t: Timesteps, eps: th.Tensor) -> th.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (AnoFPDM's one-step x0 map)."""
        t = _timesteps(t, x_t)
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def predict_eps_from_xstart(self, x_t: th.Tensor, t: Timesteps, pred_xstart: th.Tensor) -> th.Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
        t = _timesteps(t, x_t)
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def _predict_xstart_from_xprev(self, x_t: th.Tensor, t: th.Tensor, xprev: th.Tensor) -> th.Tensor:
        return _extract(1.0 / self.posterior_mean_coef1, t, x_t) * xprev - _extract(
            self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t
        ) * x_t

    # -- classifier-free guidance -------------------------------------------------------------------------

    def guided_eps(
        self,
        model: Callable,
        x: th.Tensor,
        t: Timesteps,
        y: Optional[th.Tensor],
        w: float,
        model_kwargs: Optional[dict] = None,
        max_rows: Optional[int] = None,
    ) -> Dict[str, th.Tensor]:
        """Classifier-free guided eps from the conditional and null predictions.

        By default ONE batched forward: the model sees x2 = cat[x, x], y2 = cat[y, y], null = cat[False * B,
        True * B] (bool tensor), clf_free=True (and threshold=-1 when model_kwargs has a threshold). Per-row
        tensors in model_kwargs are duplicated too. With ``max_rows`` the conditional rows (null=False) and the
        null rows (null=True) go through separate calls of at most ``max_rows`` rows (same results; faster on a
        CPU for large batches). Returns dict(eps=(1+w)*eps_cond - w*eps_null, eps_cond, eps_null), plus the key
        var_values (the conditional rows' variance channels) only when the model learns sigma.
        t is on this diffusion's grid (respaced grids are mapped to original steps for the model).
        """
        return _guided_forward(self._wrap_model(model), x, _timesteps(t, x), y, w, model_kwargs, max_rows)

    def condition_eps(
        self,
        model: Callable,
        x: th.Tensor,
        t: Timesteps,
        y: Optional[th.Tensor],
        null: bool,
        model_kwargs: Optional[dict] = None,
        max_rows: Optional[int] = None,
    ) -> th.Tensor:
        """eps of a classifier-free model under ONE condition for every row: the conditional prediction (label y)
        or, with ``null``, the null prediction; in calls of at most ``max_rows`` rows (None: one call).
        Half the rows of ``guided_eps`` when only one of its two predictions is needed."""
        kwargs = dict(model_kwargs or {})
        y = _labels(y, kwargs, x)
        out = _one_condition(self._wrap_model(model), x, _timesteps(t, x), y, bool(null), _sampling_kwargs(kwargs),
                             max_rows)
        return _split_eps(out, x.shape[1])[0]

    # -- reverse process ----------------------------------------------------------------------------------

    def _variance(self, x: th.Tensor, t: th.Tensor, var_values: Optional[th.Tensor]):
        """(variance, log_variance) of p(x_{t-1} | x_t) for this model_var_type."""
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if var_values is None:
                raise ValueError(f"{self.model_var_type} needs a model with 2C output channels (learn_sigma)")
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, x)
                max_log = _extract(np.log(self.betas), t, x)
                frac = (var_values + 1) / 2  # model output in [-1, 1]
                log_variance = frac * max_log + (1 - frac) * min_log
            return th.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta_t, with the first entry replaced by beta~_1 to get a better decoder log-likelihood
            var = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
            variance, log_variance = var, np.log(var)
        else:
            variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
        return _extract(variance, t, x).expand_as(x), _extract(log_variance, t, x).expand_as(x)

    def p_mean_variance(
        self,
        model: Callable,
        x: th.Tensor,
        t: Timesteps,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        guidance_w: Optional[float] = None,
    ) -> Dict[str, th.Tensor]:
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, eps).

        guidance_w=None calls model(x, t, **model_kwargs); a number w uses classifier-free guidance
        (one batched cond+null forward, see `guided_eps`). pred_xstart is clipped to [-1, 1] when
        clip_denoised, after denoised_fn; eps is re-derived from the final pred_xstart (as upstream).
        """
        t = _timesteps(t, x)
        if guidance_w is not None:
            model = cfg_model_fn(model, guidance_w)
        model_output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
        output, var_values = _split_eps(model_output, x.shape[1])
        variance, log_variance = self._variance(x, t, var_values)

        def process_xstart(x0: th.Tensor) -> th.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, output))
            mean = output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(output)
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": self.predict_eps_from_xstart(x, t, pred_xstart),
        }

    def p_sample(
        self,
        model: Callable,
        x: th.Tensor,
        t: Timesteps,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        guidance_w: Optional[float] = None,
        noise: Optional[th.Tensor] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Dict[str, th.Tensor]:
        """One ancestral DDPM step x_t -> x_{t-1}: dict(sample, pred_xstart).

        The step's noise is `noise`, else noise_fn(x, t) (e.g. simplex noise), else N(0, I).
        """
        t = _timesteps(t, x)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs, guidance_w)
        if noise is None:
            noise = noise_fn(x, t) if noise_fn is not None else th.randn_like(x)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # no noise at the last step
        sample = out["mean"] + nonzero * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model: Callable, shape: Sequence[int], **kwargs) -> th.Tensor:
        """Full DDPM sampling; keyword arguments as p_sample_loop_progressive. Returns the final sample."""
        return _last(self.p_sample_loop_progressive(model, shape, **kwargs))["sample"]

    def p_sample_loop_progressive(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[th.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[Union[str, th.device]] = None,
        progress: bool = False,
        guidance_w: Optional[float] = None,
        t_start: Optional[int] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Iterator[Dict[str, th.Tensor]]:
        """Yield dict(sample, pred_xstart) after each DDPM step from t_start (default T-1) down to 0.

        noise_fn(x, t) draws the start latent (when `noise` is None) and every step's noise instead of N(0, I).
        """
        def step(img: th.Tensor, t: th.Tensor) -> Dict[str, th.Tensor]:
            return self.p_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, guidance_w, noise_fn=noise_fn)

        yield from self._reverse_loop(step, shape, noise, device, progress, t_start, noise_fn)

    # -- DDIM ---------------------------------------------------------------------------------------------

    def _ddim_sigma(self, abar_t: th.Tensor, abar_prev: th.Tensor, eta: float) -> th.Tensor:
        return eta * th.sqrt((1 - abar_prev) / (1 - abar_t)) * th.sqrt(1 - abar_t / abar_prev)

    def ddim_step_from_eps(
        self,
        x_t: th.Tensor,
        t: Timesteps,
        eps: th.Tensor,
        eta: float = 0.0,
        *,
        clip_denoised: bool = False,
        noise: Optional[th.Tensor] = None,
    ) -> th.Tensor:
        """DDIM update x_t -> x_{t-1} on this diffusion's grid, given eps at (x_t, t).

        x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, with abar_{-1} = 1, so
        t = 0 returns the (possibly clipped) x0 prediction. clip_denoised clips x0 to [-1, 1] and re-derives
        eps from it (upstream ddim_sample behaviour).
        """
        t = _timesteps(t, x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
            eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        abar_t = _extract(self.alphas_cumprod_ext, t + 1, x_t)
        abar_prev = _extract(self.alphas_cumprod_ext, t, x_t)
        sigma = self._ddim_sigma(abar_t, abar_prev, eta)
        x_prev = th.sqrt(abar_prev) * pred_xstart + th.sqrt(1 - abar_prev - sigma**2) * eps
        if eta > 0:
            x_prev = x_prev + sigma * (th.randn_like(x_t) if noise is None else noise)
        return x_prev

    def ddim_reverse_step_from_eps(
        self, x_t: th.Tensor, t: Timesteps, eps: th.Tensor, *, clip_denoised: bool = False
    ) -> th.Tensor:
        """DDIM inversion x_t -> x_{t+1}, given eps evaluated at (x_t, t): the latent must really be at level t.

        x_{t+1} = sqrt(abar_{t+1}) x0 + sqrt(1 - abar_{t+1}) eps with x0 = predict_xstart_from_eps(x_t, t, eps).
        t = -1 means x_t is clean (abar = 1) and returns sqrt(abar_0) x + sqrt(1 - abar_0) eps;
        t = T-1 goes to abar = 0 (pure eps). clip_denoised as in ddim_step_from_eps.
        Upstream AnoFPDM's encoding labelled the latent one level off; see `ddim_encode_latents`.
        """
        if not isinstance(t, th.Tensor) and not -1 <= t < self.num_timesteps:  # (tensors: no device sync)
            raise ValueError(f"inversion timestep must lie in [-1, {self.num_timesteps - 1}], got {t}")
        t = _timesteps(t, x_t)
        abar_t = _extract(self.alphas_cumprod_ext, t + 1, x_t)
        abar_next = _extract(self.alphas_cumprod_ext, t + 2, x_t)
        pred_xstart = (x_t - th.sqrt(1 - abar_t) * eps) / th.sqrt(abar_t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
            eps = (x_t - th.sqrt(abar_t) * pred_xstart) / th.sqrt(1 - abar_t)
        return th.sqrt(abar_next) * pred_xstart + th.sqrt(1 - abar_next) * eps

    def ddim_sample(
        self,
        model: Callable,
        x: th.Tensor,
        t: Timesteps,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        guidance_w: Optional[float] = None,
        noise: Optional[th.Tensor] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Dict[str, th.Tensor]:
        """One DDIM step x_t -> x_{t-1}: dict(sample, pred_xstart, eps). guidance_w as p_mean_variance.

        With eta > 0 the step's noise is `noise`, else noise_fn(x, t), else N(0, I).
        """
        t = _timesteps(t, x)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs, guidance_w)
        if noise is None and noise_fn is not None and eta > 0:
            noise = noise_fn(x, t)
        # out["eps"] is consistent with the (clipped) pred_xstart, so no second clip is needed
        sample = self.ddim_step_from_eps(x, t, out["eps"], eta, noise=noise)
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "eps": out["eps"]}

    def ddim_reverse_sample(
        self,
        model: Callable,
        x: th.Tensor,
        t: Timesteps,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        guidance_w: Optional[float] = None,
    ) -> Dict[str, th.Tensor]:
        """One DDIM inversion step x_t (level t) -> x_{t+1}: dict(sample, pred_xstart). Deterministic only."""
        if eta != 0.0:
            raise ValueError("DDIM inversion is deterministic: eta must be 0")
        t = _timesteps(t, x)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs, guidance_w)
        sample = self.ddim_reverse_step_from_eps(x, t, out["eps"])
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model: Callable, shape: Sequence[int], **kwargs) -> th.Tensor:
        """Full DDIM sampling; keyword arguments as ddim_sample_loop_progressive. Returns the final sample.

        Training previews with guidance: `ddim_sample_loop(model, shape, model_kwargs={"y": y}, guidance_w=w)`.
        """
        return _last(self.ddim_sample_loop_progressive(model, shape, **kwargs))["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[th.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[Union[str, th.device]] = None,
        progress: bool = False,
        eta: float = 0.0,
        guidance_w: Optional[float] = None,
        t_start: Optional[int] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Iterator[Dict[str, th.Tensor]]:
        """Yield dict(sample, pred_xstart, eps) after each DDIM step from t_start (default T-1) down to 0.

        `noise` is the starting latent at level t_start (e.g. from ddim_reverse_sample_loop); without it the
        start is noise_fn(x, t) if given (e.g. simplex noise), else N(0, I). noise_fn also draws the noise of
        eta > 0 steps.
        """
        def step(img: th.Tensor, t: th.Tensor) -> Dict[str, th.Tensor]:
            return self.ddim_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, eta, guidance_w,
                                    noise_fn=noise_fn)

        yield from self._reverse_loop(step, shape, noise, device, progress, t_start, noise_fn)

    def _reverse_loop(self, step: Callable, shape, noise, device, progress, t_start, noise_fn) -> Iterator[dict]:
        """The sampling loops' skeleton: start latent, then `step(img, t)` from t_start down to 0, yielding each."""
        img = self._initial_latent(shape, noise, device, noise_fn, t_start)
        for t in self._reverse_indices(t_start, progress):
            with th.no_grad():
                out = step(img, th.full((img.shape[0],), t, device=img.device, dtype=th.long))
            yield out
            img = out["sample"]

    def _initial_latent(self, shape, noise, device, noise_fn=None, t_start=None) -> th.Tensor:
        if noise is None:
            device = device if device is not None else "cpu"
            if noise_fn is None:
                return th.randn(*shape, device=device)
            t = self.num_timesteps - 1 if t_start is None else t_start
            # upstream drew randn first and passed it only for its shape: noise_fn(x, t) replaces it
            return noise_fn(th.zeros(*shape, device=device), th.full((shape[0],), t, device=device, dtype=th.long))
        if tuple(shape) != tuple(noise.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
        return noise if device is None else noise.to(device)

    def _reverse_indices(self, t_start: Optional[int], progress: bool):
        t_start = self.num_timesteps - 1 if t_start is None else t_start
        if not 0 <= t_start < self.num_timesteps:
            raise ValueError(f"t_start must lie in [0, {self.num_timesteps - 1}], got {t_start}")
        return _progress(range(t_start, -1, -1), progress)

    def ddim_reverse_sample_loop(
        self,
        model: Callable,
        x_start: th.Tensor,
        num_steps: Optional[int] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        progress: bool = False,
    ) -> th.Tensor:
        """DDIM-encode clean images to the latent at level num_steps - 1 (default T - 1).

        The first step leaves the clean level (abar = 1) using eps(x_start, t=0); every later step uses
        eps evaluated at the latent's own level. `ddim_sample_loop(model, shape, noise=latent,
        t_start=num_steps - 1)` decodes it again. (Upstream's fork dropped the image update, bug B2.)
        """
        return _last(self.ddim_encode_latents(
            model, x_start, num_steps, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, progress=progress,
        ))

    def ddim_encode_latents(
        self,
        model: Callable,
        x_start: th.Tensor,
        num_steps: Optional[int] = None,
        *,
        legacy_ddim_inversion: bool = False,
        noise: Optional[th.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        progress: bool = False,
    ) -> Iterator[th.Tensor]:
        """Yield the DDIM-inversion latent labelled t, for t = 0 .. num_steps - 1 (one latent per step).

        Correct (default): the latent yielded for label t is at noise level t.
          t = 0: q_sample(x_start, 0, noise) if noise is given, else the deterministic step from the clean
          level with eps(x_start, 0); t >= 1: ddim_reverse_step(latent_{t-1}, t-1, eps(latent_{t-1}, t-1)).
        legacy_ddim_inversion=True (upstream AnoFPDM calc_pred_xstart_loop, commit dfda7ab): t = 0 is
          q_sample(x_start, 0, noise) (noise drawn if None); t >= 1 applies the step labelled t to the previous
          latent, i.e. eps(latent_{t-1}, t) and abar_t -> abar_{t+1}. The yielded latent is then at level t+1
          while labelled t, level 1 is skipped, and with an ideal model the noise part shrinks to
          sqrt(1-abar_0)/sqrt(1-abar_1) (about 0.675x) of nominal.
        eps comes from model(x, t, **model_kwargs) (pass {"null": True, "clf_free": True, ...} for the
        unconditional encoding AnoFPDM uses); clip_denoised clips x0 at each inversion step (upstream: True).
        """
        num_steps = self.num_timesteps if num_steps is None else num_steps
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must lie in [1, {self.num_timesteps}], got {num_steps}")
        model_kwargs = model_kwargs or {}
        latent = x_start
        for t in _progress(range(num_steps), progress):
            with th.no_grad():
                if t == 0:
                    if noise is None and legacy_ddim_inversion:
                        noise = th.randn_like(x_start)
                    if noise is not None:
                        latent = self.q_sample(x_start, 0, noise)
                    else:
                        eps = self._eps_for_inversion(model, x_start, 0, clip_denoised, denoised_fn, model_kwargs)
                        latent = self.ddim_reverse_step_from_eps(x_start, -1, eps)
                else:
                    t_model = t if legacy_ddim_inversion else t - 1
                    eps = self._eps_for_inversion(model, latent, t_model, clip_denoised, denoised_fn, model_kwargs)
                    latent = self.ddim_reverse_step_from_eps(latent, t_model, eps)
            yield latent

    def _eps_for_inversion(self, model, x, t, clip_denoised, denoised_fn, model_kwargs) -> th.Tensor:
        # p_mean_variance clips x0 (if asked) and re-derives eps from it, as upstream ddim_reverse_sample
        return self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)["eps"]

    # -- training -----------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """Variational-bound term (bits per dim): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), decoder NLL at t=0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Callable,
        x_start: th.Tensor,
        t: th.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[th.Tensor] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Dict[str, th.Tensor]:
        """Per-sample training losses: dict(loss, mse[, vb]), each of shape [B].

        noise: the eps of x_t (default N(0, I)); noise_fn(x_start, t) draws it instead (e.g. simplex noise), and
        the same draw is the eps target.

        As upstream, model_kwargs without "y" are dropped entirely (so unconditional models never see the
        label-drop `threshold`). With a learned variance the VB term is added with the mean output frozen
        (Improved DDPM's hybrid loss); RESCALED_MSE scales it by T / 1000.
        """
        model_kwargs = dict(model_kwargs or {})
        if "y" not in model_kwargs:
            model_kwargs = {}
        t = _timesteps(t, x_start)
        if noise is None:
            noise = noise_fn(x_start, t) if noise_fn is not None else th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: Dict[str, th.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise NotImplementedError(self.loss_type)

        model_output = self._wrap_model(model)(x_t, t, **model_kwargs)
        output, var_values = _split_eps(model_output, x_start.shape[1])
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if var_values is None:
                raise ValueError(f"{self.model_var_type} needs a model with 2C output channels (learn_sigma)")
            # the VB term trains only the variance: the mean part of the output is frozen
            frozen = th.cat([output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kw: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        elif var_values is not None:
            raise ValueError(f"model returned 2C channels but model_var_type is {self.model_var_type}")

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        terms["mse"] = mean_flat((target - output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
