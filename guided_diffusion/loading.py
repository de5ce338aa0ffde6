"""Checkpoint folders to models, in one place: which flags a model is built with, and loading its weights.

A folder written by training holds ``config.json`` (``fileio``), which records the model's flags: the model is built
from it, and a flag given on the command line that contradicts it is an error naming both values (only the runtime
flags of ``architecture.RUNTIME_FLAGS``, such as ``--timestep_respacing``, may differ). A folder of upstream
checkpoints has no config.json: the model is built from the flags, with ``image_size`` / ``in_channels`` from the
data when not given, and a class-conditional v1 model gets upstream's label rule (``--label_only_with_uncond``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from guided_diffusion import fileio
from guided_diffusion.architecture import RUNTIME_FLAGS, ClassifierSettings, ModelSettings
from guided_diffusion.factory import (
    classifier_and_diffusion_defaults,
    create_classifier,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_channel_mult,
)
from guided_diffusion.flags import option

Warn = Callable[[str], None]


class ConfigKind(NamedTuple):
    defaults: Callable[[], Dict]  # lists the kind's flags (config.json records every one)
    build: Callable[..., Tuple[Any, Any]]  # flags -> (model, diffusion)


# the "kind" of a config.json -> its flags and factory
CONFIG_KINDS = {
    "diffusion": ConfigKind(model_and_diffusion_defaults, create_model_and_diffusion),
    "classifier": ConfigKind(classifier_and_diffusion_defaults, create_classifier_and_diffusion),
}


# ------------------------------------------------------------------------------------------------------------------
# config.json against the flags


def _comparable(key: str, value: Any, flags: Dict[str, Any]) -> Any:
    """A value normalised for comparison: numbers as floats, lists without spaces, default channel_mult resolved."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).replace(" ", "")
    try:
        if key == "channel_mult":
            return tuple(float(m) for m in parse_channel_mult(text, int(flags.get("image_size", 0))))
        if key == "attention_resolutions":
            return tuple(sorted({int(r) for r in text.split(",") if r}))
    except ValueError:
        pass
    return text


def config_conflicts(recorded: Dict[str, Any], flags: Dict[str, Any], keys: Optional[Iterable[str]] = None) -> List[str]:
    """``--flag`` descriptions where ``flags`` contradicts ``recorded`` (runtime flags and unrecorded keys excluded)."""
    out = []
    context = {**recorded, **flags}  # e.g. the image size that resolves a default channel_mult
    for key in sorted(keys if keys is not None else flags):
        if key in RUNTIME_FLAGS or key not in recorded or key not in flags:
            continue
        if _comparable(key, flags[key], context) != _comparable(key, recorded[key], recorded):
            out.append(f"--{key} {flags[key]!r} (config.json: {recorded[key]!r})")
    return out


def read_config(model_dir: str, kind: str = "diffusion") -> Optional[Dict[str, Any]]:
    """``model_dir/config.json`` with its flags completed by today's defaults (keys added since), or None.

    Raises ``fileio.RunConfigError`` when the file holds another kind of model or is malformed.
    """
    record = fileio.read_run_config(model_dir)
    if record is None:
        return None
    path = fileio.config_path(model_dir)
    if record["kind"] != kind:
        raise fileio.RunConfigError(f"{path} describes a {record['kind']!r} model; this command needs a {kind!r} one")
    defaults = CONFIG_KINDS[kind].defaults()
    unknown = sorted(set(record["flags"]) - set(defaults))
    if unknown:
        warnings.warn(f"{path}: ignoring flags this code does not know: {', '.join(unknown)}")
    return dict(record, flags={**defaults, **{k: v for k, v in record["flags"].items() if k in defaults}})


def recorded_flags(model_dir: str, kind: str = "diffusion") -> Optional[Dict[str, Any]]:
    """The flags in ``model_dir/config.json`` (completed with today's defaults), or None without one."""
    record = read_config(model_dir, kind)
    return None if record is None else record["flags"]


def recorded_ema_rate(record: Optional[Dict[str, Any]]) -> Optional[str]:
    """The first EMA rate training recorded in config.json, or None."""
    rate = str(((record or {}).get("training") or {}).get("ema_rate") or "").split(",")[0].strip()
    return rate or None


def check_run_config(folder: str, flags: Dict[str, Any], kind: str = "diffusion") -> Optional[Dict[str, Any]]:
    """Training: a ``fileio.RunConfigError`` when ``folder/config.json`` records other model flags than ``flags``
    (the checkpoints there belong to another model); returns the recorded flags, or None without config.json."""
    recorded = recorded_flags(folder, kind)
    if recorded is None:
        return None
    conflicts = config_conflicts(recorded, flags)
    if conflicts:
        raise fileio.RunConfigError(
            f"{fileio.config_path(folder)} records the model whose checkpoints are in {folder}, and this run's flags "
            f"contradict it: {'; '.join(conflicts)}. Use another --output for another model, or drop these flags")
    return recorded


# ------------------------------------------------------------------------------------------------------------------
# Which checkpoint, built how


@dataclass(frozen=True)
class CheckpointSettings:
    """Which checkpoint of a folder to load."""

    model_dir: str = option("", "folder of the diffusion model's checkpoints (model*.pt, ema_*.pt, config.json)")
    model_num: str = option("", "checkpoint step to load (default: the newest readable one)")
    ema: bool = option(False, "load the EMA weights (ema_<rate>_<step>.pt) instead of model<step>.pt")
    ema_rate: str = option("", "EMA rate of the file to load (default: the one training recorded, else 0.9999)")

    def __post_init__(self) -> None:
        if self.model_dir and not os.path.isdir(self.model_dir):
            raise ValueError(f"--model_dir {self.model_dir!r} is not a folder holding model*.pt / ema_*.pt checkpoints "
                             "(train first, or point it at the checkpoints)")
        if self.ema_rate:
            try:
                fileio.format_rate(self.ema_rate)
            except ValueError:
                raise ValueError(f"--ema_rate must be a number (e.g. 0.9999), got {self.ema_rate!r}") from None


@dataclass(frozen=True)
class ModelSource:
    """A diffusion model to load: a checkpoint of a folder and the flags it is built with."""

    checkpoint: CheckpointSettings
    model: ModelSettings  # complete (shape resolved)
    config_file: Optional[str] = None  # the config.json the flags come from; None: the command line's

    @property
    def flags_source(self) -> str:
        return self.config_file or "the command-line flags"

    def load(self, device: Any, warn: Optional[Warn] = None) -> Tuple[Any, Any, str]:
        """(model in eval mode on ``device``, diffusion, checkpoint path)."""
        c = self.checkpoint
        if not c.model_dir or not os.path.isdir(c.model_dir):
            raise ValueError(f"--model_dir {c.model_dir!r} is not a folder holding model*.pt / ema_*.pt checkpoints")
        return load_model_from_dir(c.model_dir, self.model.flags(), model_num=c.model_num, ema=c.ema,
                                   ema_rate=c.ema_rate or None, device=device, warn=warn)


def resolve_model(checkpoint: CheckpointSettings, model: ModelSettings, given: Set[str],
                  data_shape: Optional[Callable[[], Tuple[int, int]]] = None,
                  note: Optional[Warn] = None) -> ModelSource:
    """The model of ``checkpoint.model_dir``: config.json's flags, or ``model``'s for a folder without one.

    ``given``: the flags set on the command line (or by a preset); one that contradicts config.json is a
    ``fileio.RunConfigError``, a runtime flag among them replaces the recorded value. ``data_shape()`` gives
    ``(in_channels, image_size)`` of the data for a folder without config.json whose flags leave them open.
    ``note`` is told about choices made for the user (upstream's v1 label rule).
    """
    record = read_config(checkpoint.model_dir, "diffusion") if checkpoint.model_dir else None
    if record is not None:
        recorded = record["flags"]
        wanted = {k: v for k, v in model.flags().items() if k in given and v is not None}
        conflicts = config_conflicts(recorded, wanted)
        path = fileio.config_path(checkpoint.model_dir)
        if conflicts:
            raise fileio.RunConfigError(
                f"{path} records how the checkpoints in {checkpoint.model_dir} were built, and the command line "
                f"contradicts it: {'; '.join(conflicts)}. Drop these flags (the recorded values are used), or point "
                "--model_dir at the checkpoints you mean")
        flags = {**recorded, **{k: wanted[k] for k in RUNTIME_FLAGS if k in wanted}}
        if not checkpoint.ema_rate and recorded_ema_rate(record):
            checkpoint = CheckpointSettings(**{**checkpoint.__dict__, "ema_rate": recorded_ema_rate(record)})
        return ModelSource(checkpoint, ModelSettings(**flags), path)
    if not model.resolved:
        if data_shape is None:
            raise ValueError("--image_size and --in_channels are needed: the checkpoint folder has no config.json "
                             "and there is no data to take them from")
        channels, size = data_shape()
        model = model.replace(in_channels=model.in_channels or channels, image_size=model.image_size or size)
    if (model.unet_ver == "v1" and model.class_cond and "label_only_with_uncond" not in given
            and not model.label_only_with_uncond):
        # upstream's v1 reads the label only with uncond=True, which no upstream script passed: its class-conditional
        # v1 checkpoints were trained with the label ignored, so that is the function they compute
        model = model.replace(label_only_with_uncond=True)
        if note is not None:
            note(f"{checkpoint.model_dir} has no config.json: its class-conditional v1 model runs upstream's label "
                 "rule (--label_only_with_uncond true: the label is ignored, as upstream trained it); pass "
                 "--label_only_with_uncond false for a v1 model trained with its label")
    return ModelSource(checkpoint, model, None)


def load_model_from_dir(
    model_dir: str,
    flags: Optional[Dict[str, Any]] = None,
    *,
    model_num: Any = None,
    ema: bool = False,
    ema_rate: Optional[str] = None,
    device: Any = "cpu",
    warn: Any = None,
    kind: str = "diffusion",
):
    """(model in eval mode on ``device``, diffusion, checkpoint path) from a checkpoint folder.

    ``flags`` are complete flags of ``kind`` (``ModelSettings.flags()``); None: those recorded in
    ``model_dir/config.json`` (an error without one). ``model_num`` picks the step (None/"": the newest readable
    checkpoint); ``ema`` loads ``ema_{ema_rate}_{step}.pt`` (``ema_rate`` default: the one recorded by training,
    else 0.9999). ``kind="classifier"`` builds a noisy-image classifier (``create_classifier_and_diffusion``).
    """
    record = read_config(model_dir, kind)
    if flags is None:
        if record is None:
            raise fileio.RunConfigError(f"{model_dir} has no {fileio.CONFIG_NAME}: pass the model flags (an upstream "
                                        "checkpoint folder)")
        flags = record["flags"]
    if ema and ema_rate is None:
        ema_rate = recorded_ema_rate(record) or "0.9999"
    path = fileio.find_checkpoint(model_dir, model_num, ema_rate=ema_rate if ema else None, warn=warn)
    defaults = CONFIG_KINDS[kind].defaults()
    flags = {k: v for k, v in flags.items() if k in defaults}
    model, diffusion = CONFIG_KINDS[kind].build(**flags)
    shown = ["unet_ver", "image_size", "in_channels"] + [k for k in defaults if k not in ("unet_ver", "image_size",
                                                         "in_channels") and flags.get(k) != defaults[k]]
    source = fileio.CONFIG_NAME if record is not None else "the flags"
    hint = f"{source} ({', '.join(f'--{k} {flags[k]!r}' for k in shown[:12] if k in flags)})"
    fileio.load_state_dict_into(model, path, hint=hint)
    model.to(device).eval()
    return model, diffusion, path


# ------------------------------------------------------------------------------------------------------------------
# The noisy-image classifier


@dataclass(frozen=True)
class ClassifierSource:
    """A classifier to load: a checkpoint of ``clf_dir`` and the flags it is built with."""

    clf_dir: str
    clf_num: str
    settings: ClassifierSettings  # complete
    config_file: Optional[str] = None

    def load(self, device: Any) -> Tuple[Any, str]:
        """(classifier in eval mode on ``device``, checkpoint path)."""
        if not self.clf_dir or not os.path.isdir(self.clf_dir):
            raise ValueError(f"--clf_dir {self.clf_dir!r} is not a folder holding the classifier's model*.pt "
                             "checkpoints (the train-classifier command writes them)")
        flags = self.settings.flags()
        path = fileio.find_checkpoint(self.clf_dir, self.clf_num, flag="--clf_num")
        classifier = create_classifier(**flags)
        shown = " ".join(f"--{k} {v}" for k, v in flags.items())
        fileio.load_state_dict_into(classifier, path, hint=f"the classifier flags ({shown})")
        return classifier.to(device).eval(), path


def resolve_classifier(clf_dir: str, clf_num: str, settings: ClassifierSettings, given: Set[str],
                       shape: Tuple[int, int]) -> ClassifierSource:
    """The classifier of ``clf_dir``: its config.json's flags (kind ``classifier``; given flags that contradict them
    are an error), else ``settings`` with the diffusion model's ``shape`` ``(in_channels, image_size)``; the
    classifier must take the model's shape."""
    if not clf_dir or not os.path.isdir(clf_dir):
        raise ValueError(f"--clf_dir {clf_dir!r} is not a folder holding the classifier's model*.pt checkpoints "
                         "(the train-classifier command writes them)")
    channels, size = shape
    recorded = recorded_flags(clf_dir, "classifier")  # a RunConfigError for a folder of another kind
    config_file = None
    if recorded is not None:
        keys = [k for k in settings.flags() if k != "unet_ver"]
        recorded = {k: recorded[k] for k in keys}
        wanted = {k: v for k, v in settings.flags().items() if k in given and k in recorded and v is not None}
        conflicts = config_conflicts(recorded, wanted)
        config_file = fileio.config_path(clf_dir)
        if conflicts:
            raise fileio.RunConfigError(f"{config_file} records how the classifier in {clf_dir} was built, and the "
                                        f"command line contradicts it: {'; '.join(conflicts)}. Drop these flags")
        settings = ClassifierSettings(**recorded)
    else:
        settings = settings.replace(in_channels=settings.in_channels or channels,
                                    image_size=settings.image_size or size)
    for key, value in (("image_size", size), ("in_channels", channels)):
        if getattr(settings, key) != value:
            raise ValueError(f"the classifier in --clf_dir {clf_dir} was built for --{key} {getattr(settings, key)}, "
                             f"the diffusion model and data use {value}")
    return ClassifierSource(clf_dir, clf_num, settings, config_file)
