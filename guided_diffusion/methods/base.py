"""The interface of a slice method behind the evaluation driver, and what methods share to call their models.

A *slice method* turns a batch of 2-D slices into an anomaly map, a post-processed binary mask and a predicted
slice label, after fitting its hyper-parameters on validation slices. The evaluation driver
(``guided_diffusion/evaluation/driver.py``) owns everything else: data, sharding over processes, the per-batch cache
and its fingerprints, metrics, outputs and progress bars. A method owns its model calls.

A method is built from one settings object (``methods.settings.InferenceSettings``: the model to load, the map's
post-processing, the method's own ``Settings``), made by the command line or in code::

    from guided_diffusion.methods.registry import build_method
    method = build_method(settings, device)             # models loaded, in eval mode
    hyper = method.fit(records, labels, gt_masks)       # or json.load(...hyperparams.json) of an earlier run
    out = method.test_batch(x, hyper, BatchContext.for_seed(0))
    out.anomaly_map    # float32 [B, 1, H, W]
    out.mask           # bool    [B, 1, H, W], post-processed (median filter, threshold, component filter)
    out.pred_label     # int64   [B], 1 = unhealthy
    out.columns        # {name: array [B] or [B, k]}: per-slice table columns (e.g. the threshold used)

``x`` is float32 ``[B, C, H, W]`` in [-1, 1] (the loaders' per-slice min-max scaling) on ``device``;
``hyper`` is the JSON-able dict returned by ``fit`` (``hyperparams.json``). Outputs stay on ``device``.

The driver's protocol, per method:

1. ``method.validation_batch(x, ctx)`` for each validation batch -> per-slice records ``{name: array [B, ...]}``;
2. ``method.fit(records, labels, gt_masks)`` once, on the records of every validation slice (all batches and
   processes concatenated in order) -> hyper-parameters; ``gt_masks`` is ``None`` unless
   ``method.uses_pixel_labels``: a method that does not declare it never sees pixel labels;
3. ``method.test_batch(x, hyper, ctx)`` for each test batch -> :class:`SliceOutput`.

Results are keyed (cache fingerprints, ``metrics.json``) by ``method.settings()`` (JSON-able: every setting that
changes a result) and by the content of the files in ``method.checkpoints()``. Randomness comes only from
``ctx`` (:class:`BatchContext`), which deals the noise of a global batch out to the processes so that results do
not depend on the number of processes.

A method is registered in ``methods.registry.METHODS`` (name -> ``"module:Class"``, imported on first use) or with
``register_method``; ``build_method`` calls the class's ``build(settings, device)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence

import numpy as np
import torch

from guided_diffusion.diffusion.noise import check_noise_type, fractal_simplex, random_permutations
from guided_diffusion.flags import build
from guided_diffusion.runtime import PRECISIONS, check_precision

Records = Dict[str, np.ndarray]
Hyper = Dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# Per-batch randomness and progress
# --------------------------------------------------------------------------------------------------------


@dataclass
class BatchContext:
    """Randomness and progress of one batch.

    The noise of a *global* batch of ``rows`` slices is drawn from ``generator`` and this process keeps rows
    ``rank::world`` of it (the loaders deal the slices out the same way), so a slice gets the same noise for any
    number of processes. ``rows=None`` means the batch is the whole global batch.
    """

    generator: torch.Generator
    rows: Optional[int] = None
    rank: int = 0
    world: int = 1
    progress: Optional[Callable[[int], None]] = None

    @classmethod
    def for_seed(cls, seed: int, **kwargs: Any) -> "BatchContext":
        return cls(torch.Generator().manual_seed(int(seed)), **kwargs)

    def noise_rows(self, batch: int) -> tuple[int, int, int]:
        """``(global rows, rank, world)`` for a local batch of ``batch`` slices."""
        if self.rows is None:
            return batch, 0, 1
        if len(range(self.rank, self.rows, self.world)) < batch:
            raise ValueError(f"a local batch of {batch} slices is not rank {self.rank}'s share of a global batch of "
                             f"{self.rows} slices over {self.world} processes")
        return self.rows, self.rank, self.world

    def step(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress(n)

    def _mine(self, full: torch.Tensor, batch: int) -> torch.Tensor:
        return full[self.rank::self.world][:batch] if self.rows is not None else full[:batch]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, I) like ``x`` (this process's rows of the global batch's draw)."""
        rows, _, _ = self.noise_rows(x.shape[0])
        full = torch.randn((rows, *x.shape[1:]), generator=self.generator, dtype=torch.float32)
        return self._mine(full, x.shape[0]).to(device=x.device, dtype=x.dtype)

    def simplex_like(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """AnoDDPM simplex noise like ``x`` ``[B, C, H, W]`` (``diffusion.noise``): one fresh field per slice and
        channel; the permutation tables of the global batch are drawn, the fields of this process's rows computed.
        ``t`` (``[B]``) is the fields' z coordinate, as upstream."""
        b, c, h, w = x.shape
        rows, _, _ = self.noise_rows(b)
        perm = random_permutations(rows * c, torch.device("cpu"), self.generator).reshape(rows, c, -1)
        perm = self._mine(perm, b).reshape(b * c, -1).to(x.device)
        z = torch.zeros(b, device=x.device) if t is None else torch.as_tensor(t, device=x.device).reshape(-1).float()
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        chunk = max(1, (1 << 22) // (h * w))
        z = z.repeat_interleave(c)
        fields = [fractal_simplex(h, w, perm[i:i + chunk], z[i:i + chunk], dtype=dtype) for i in range(0, b * c, chunk)]
        return torch.cat(fields).reshape(b, c, h, w).to(x.dtype)

    def noise_like(self, x: torch.Tensor, noise_type: str = "gaussian", t: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise_type == "gaussian":
            return self.randn_like(x)
        check_noise_type(noise_type)
        return self.simplex_like(x, t)

    def noise_fn(self, noise_type: str = "gaussian") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A ``noise_fn(x, t)`` for the diffusion's sampling loops, drawing from this context."""
        return lambda x, t=None: self.noise_like(x, noise_type, t)


# --------------------------------------------------------------------------------------------------------
# What a test batch produces
# --------------------------------------------------------------------------------------------------------


@dataclass
class SliceOutput:
    """The result of ``test_batch`` for B slices (see the module docstring).

    ``columns``: per-slice scalars ``[B]`` (or ``[B, k]``, written as ``name_m0 .. name_m{k-1}``) for the
    per-slice table; ``arrays``: per-slice arrays ``[B, ...]`` worth keeping with ``--save_data`` (e.g. the
    reconstruction); ``variants``: results for ``method.variants()[1:]`` (AnoFPDM's further ``--t_e_ratio`` values).
    """

    anomaly_map: torch.Tensor
    mask: torch.Tensor
    pred_label: torch.Tensor
    columns: Dict[str, np.ndarray] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    variants: List["SliceOutput"] = field(default_factory=list)

    def check(self, batch: int, height: int, width: int, method: str = "method") -> "SliceOutput":
        """Raise a ValueError naming the method when a field has the wrong shape or type."""
        want = (batch, 1, height, width)
        for name, value, dtypes in (("anomaly_map", self.anomaly_map, (torch.float32, torch.float64, torch.float16,
                                                                        torch.bfloat16)),
                                    ("mask", self.mask, (torch.bool,))):
            if tuple(value.shape) != want or value.dtype not in dtypes:
                raise ValueError(f"{method}: {name} must be {want} {dtypes[0]}, got {tuple(value.shape)} {value.dtype}")
        if tuple(self.pred_label.shape) != (batch,):
            raise ValueError(f"{method}: pred_label must have shape ({batch},), got {tuple(self.pred_label.shape)}")
        for kind, values in (("column", self.columns), ("array", self.arrays)):
            for name, v in values.items():
                if np.shape(v)[:1] != (batch,):
                    raise ValueError(f"{method}: {kind} {name!r} must have {batch} rows, got shape {np.shape(v)}")
        for v in self.variants:
            v.check(batch, height, width, method)
        return self


# --------------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoSettings:
    """A method without flags of its own."""


@dataclass(frozen=True)
class ResolveContext:
    """What ``SliceMethod.resolve`` may use: the flags given on the command line or by a preset, and the model."""

    given: frozenset
    in_channels: int
    image_size: int


class SliceMethod(abc.ABC):
    """A segmentation method behind the evaluation driver (see the module docstring)."""

    #: registry name (``--method``)
    name: ClassVar[str] = ""
    #: whether ``fit`` tunes on pixel labels (ground-truth masks of validation slices); every output says so
    uses_pixel_labels: ClassVar[bool] = False
    #: the flag whose values ``variants()`` lists, if the method produces several results per batch
    variant_key: ClassVar[Optional[str]] = None
    #: per-slice columns shown in the panels' captions
    caption_columns: ClassVar[Sequence[str]] = ()

    #: the method's own flags (a frozen dataclass of ``flags.option`` fields; listed by --help for this method)
    Settings: ClassVar[type] = NoSettings
    #: further flag groups the method reads (e.g. the classifier's), shown for this method only
    option_groups: ClassVar[Sequence[type]] = ()
    #: defaults of shared flags that differ for this method (model flags for folders without config.json, --ema)
    shared_defaults: ClassVar[Dict[str, Any]] = {}

    @classmethod
    def read_settings(cls, values: Any) -> Any:
        """The method's ``Settings`` from parsed flag values (a Namespace or mapping)."""
        return build(cls.Settings, values)

    @classmethod
    def resolve(cls, options: Any, context: "ResolveContext") -> Any:
        """Complete the method's settings once the model is known (e.g. the classifier's folder); default: as is."""
        return options

    @classmethod
    def check(cls, s: Any) -> None:
        """Validate ``s`` (``InferenceSettings``) before any model is loaded; a ValueError names the flag."""

    @classmethod
    @abc.abstractmethod
    def build(cls, s: Any, device: torch.device) -> "SliceMethod":
        """The method with its models loaded on ``device``, from ``s`` (``InferenceSettings``)."""

    @abc.abstractmethod
    def settings(self) -> Dict[str, Any]:
        """JSON-able settings that determine the results (beyond checkpoints and data)."""

    def fit_settings(self) -> Dict[str, Any]:
        """The settings that ``fit``'s hyper-parameters depend on (default: all of ``settings()``): recorded in
        hyperparams.json, and a file fitted with other values is refused where it is read."""
        return self.settings()

    def checkpoints(self) -> List[str]:
        """Files whose content determines the results (the driver fingerprints their content)."""
        return []

    def steps_per_batch(self, split: str) -> int:
        """Model-evaluation steps per batch of ``split`` (the inner progress bar's total)."""
        return 1

    def variants(self) -> List[Any]:
        """Values of ``variant_key`` that ``test_batch`` returns results for (first: the main result)."""
        return [None]

    @abc.abstractmethod
    def validation_batch(self, x: torch.Tensor, ctx: BatchContext) -> Records:
        """Per-slice records of one validation batch: ``{name: numpy array [B, ...]}``."""

    @abc.abstractmethod
    def fit(self, records: Records, labels: np.ndarray, gt_masks: Optional[np.ndarray]) -> Hyper:
        """Hyper-parameters (a JSON-able dict) from the records of all validation slices.

        ``labels`` int64 ``[N]`` (1 = unhealthy); ``gt_masks`` bool ``[N, 1, H, W]`` when ``uses_pixel_labels``,
        else None.
        """

    def hyperparams_without_validation(self) -> Hyper:
        """Hyper-parameters for a run without validation (``--num_batches_val 0`` and no ``--hyperparams_file``)."""
        raise ValueError(f"{self.name}: --num_batches_val 0 needs --hyperparams_file (the hyperparams.json of an "
                         "earlier run with the same settings), or run a validation pass (--num_batches_val N)")

    def check_hyperparams(self, hyper: Hyper) -> Hyper:
        """Validate hyper-parameters read from a file; raise a ValueError naming what is wrong."""
        return hyper

    def describe(self, hyper: Hyper) -> str:
        """One log line about the fitted hyper-parameters."""
        return ", ".join(f"{k} {v}" for k, v in hyper.items())

    @abc.abstractmethod
    def test_batch(self, x: torch.Tensor, hyper: Hyper, ctx: BatchContext) -> SliceOutput:
        """Anomaly maps, masks and slice labels of one test batch."""


# --------------------------------------------------------------------------------------------------------
# Calling a model: the prediction a method asks for, as a model_fn(x, t) for the diffusion's loops
# --------------------------------------------------------------------------------------------------------


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``--precision`` (None for fp32)."""
    return PRECISIONS[check_precision(precision)]


def require_classifier_free(model: Any, method: str, where: str = "") -> None:
    """A ValueError naming the flags unless ``model`` (``ModelSettings``) is a classifier-free guided model."""
    if model.num_classes < 1 or not model.class_cond:
        raise ValueError(f"{method} needs the classifier-free guided model: --num_classes must be >= 1 (2 in the "
                         f"presets); got --num_classes {model.num_classes} --class_cond {model.class_cond}{where}, an "
                         "unconditional model")
    if not model.clf_free:
        raise ValueError(f"{method} needs the classifier-free guided model (with a null embedding); --clf_free false"
                         f"{where} is a plain class-conditional model")


def is_class_conditional(model: torch.nn.Module) -> bool:
    return getattr(model, "num_classes", None) is not None


def has_null_embedding(model: torch.nn.Module) -> bool:
    """Class-conditional with classifier-free conditioning (``clf_free=True``: label dropout, null prediction)."""
    return is_class_conditional(model) and bool(getattr(model, "clf_free", False))


def model_fn(
    model: torch.nn.Module,
    *,
    label: Optional[int] = None,
    null: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Callable[..., torch.Tensor]:
    """``fn(x, t, **kw)`` -> the model's output for one kind of prediction, in float32.

    * ``null=True``: the unconditional prediction: ``model(x, t)`` for an unconditional model, the null-embedding
      prediction of a classifier-free model; a class-conditional model without a null embedding is an error;
    * ``label=k``: the prediction conditioned on class k (``y=k``; ``clf_free=True`` for classifier-free models); an
      unconditional model is an error;
    * neither: ``model(x, t)`` (an unconditional model only).

    ``dtype`` runs the model under ``torch.autocast``. Extra keyword arguments of the call pass through.
    """
    conditional = is_class_conditional(model)
    if label is not None and null:
        raise ValueError("model_fn: ask for a label or for the null prediction, not both")
    if label is not None and not conditional:
        raise ValueError("a prediction conditioned on a class needs a class-conditional model; this one has no classes")
    if label is None and not null and conditional:
        raise ValueError("a class-conditional model needs a label (or the null prediction)")
    if null and conditional and not has_null_embedding(model):
        raise ValueError("this class-conditional model has no null embedding (built with clf_free False), so it has "
                         "no unconditional prediction")
    if label is not None and label >= model.num_classes:
        raise ValueError(f"label {label} out of range for a model with {model.num_classes} classes")
    run = autocast_model(model, dtype)

    def fn(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if conditional and null:
            kwargs.update(null=True, clf_free=True)
        elif conditional:
            kwargs["y"] = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
            if has_null_embedding(model):
                kwargs["clf_free"] = True
        return run(x, t, **kwargs)

    return fn


def autocast_model(model: Callable[..., torch.Tensor], dtype: Optional[torch.dtype]) -> Callable[..., torch.Tensor]:
    """``model`` called under ``torch.autocast(dtype)`` (``None``: as it is), returning float32."""
    if dtype is None:
        return lambda x, t, **kwargs: model(x, t, **kwargs).float()

    def fn(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = model(x, t, **kwargs)
        return out.float()

    return fn


__all__ = [
    "BatchContext", "SliceOutput", "SliceMethod", "NoSettings", "ResolveContext", "autocast_dtype", "autocast_model",
    "require_classifier_free", "is_class_conditional", "has_null_embedding", "model_fn",
]
