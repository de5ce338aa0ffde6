"""Records of what made an output folder: a training run's ``config.json`` and the settings record of a preprocessed
or synthetic data folder.

**config.json** (``write_run_config`` / ``read_run_config``): what a training run was built with, next to its
checkpoints. Building a model from it lives in ``guided_diffusion.loading``::

    {"format": "guided_diffusion run config", "format_version": 1, "kind": "diffusion",
     "flags": {every key of factory.model_and_diffusion_defaults(): its value},
     "training": {"ema_rate": "0.9999", ...}, "created": "<ISO time>", "torch": "<version>"}
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable, Dict, Optional, Union

from guided_diffusion.errors import SettingsMismatchError, UserError

PathLike = Union[str, "os.PathLike[str]"]
Warn = Callable[[str], None]

from guided_diffusion.fileio.atomic import write_json


class RunConfigError(UserError, ValueError):
    """config.json is malformed, of another kind, or contradicts the flags of this run."""


# ------------------------------------------------------------------------------------------------------------------
# The run configuration (config.json)

CONFIG_NAME = "config.json"
CONFIG_FORMAT = "guided_diffusion run config"
CONFIG_FORMAT_VERSION = 1


def config_path(folder: PathLike) -> str:
    return os.path.join(os.fspath(folder), CONFIG_NAME)


def write_run_config(folder: PathLike, kind: str, flags: Dict[str, Any],
                     training: Optional[Dict[str, Any]] = None) -> str:
    """Write ``folder/config.json`` atomically (format in the module docstring); returns its path."""
    import torch

    record = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_FORMAT_VERSION,
        "kind": kind,
        "flags": {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()},
        "training": dict(training or {}),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    path = config_path(folder)
    write_json(path, record, default=str)
    return path


def read_run_config(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The parsed ``folder/config.json``, or None when there is none (an upstream checkpoint folder).

    Raises ``RunConfigError`` naming the file when it is not valid JSON, not this format, or newer than this code.
    """
    path = config_path(folder)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunConfigError(f"{path} cannot be read ({exc}); restore it, or delete it and pass the model flags "
                             "on the command line") from None
    if not isinstance(record, dict) or record.get("format") != CONFIG_FORMAT or not isinstance(record.get("flags"), dict):
        raise RunConfigError(f"{path} is not a guided_diffusion run configuration (needs \"format\": "
                             f"\"{CONFIG_FORMAT}\" and a \"flags\" object)")
    version = record.get("format_version")
    if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
        raise RunConfigError(f"{path} has format_version {version!r}; this code reads up to "
                             f"{CONFIG_FORMAT_VERSION} (update the code)")
    if not isinstance(record.get("kind"), str):
        raise RunConfigError(f"{path} has no \"kind\" (e.g. \"diffusion\")")
    record.setdefault("training", {})
    return record


# ------------------------------------------------------------------------------------------------------------------
# Settings records: what determined an output folder (preprocessed data, synthetic subjects)


def _shown(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else repr(value)


def check_settings_record(path: PathLike, settings: Dict[str, Any], *, what: str, remedy: str,
                          labels: Optional[Dict[str, str]] = None,
                          on_missing: Optional[Callable[[], None]] = None) -> None:
    """Refuse to add to an output folder made with other settings than ``settings`` (what determines the output).

    ``path`` holds a JSON object (``write_settings_record``); every key of ``settings`` must equal the recorded
    value, else ``SettingsMismatchError`` lists each difference as ``<label> <recorded> (now <value>)`` (``labels``
    maps keys to flags, default ``--<key>``), then ``remedy``. Without a record, ``on_missing()`` may check the
    folder's existing content (and raise). Nothing is written: record the settings once the run has checked the
    rest (``write_settings_record``).
    """
    labels = labels or {}
    path = os.fspath(path)
    if not os.path.exists(path):
        if on_missing is not None:
            on_missing()
        return
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise SettingsMismatchError(f"{path}, the record of the settings {what} was made with, is unreadable "
                                    f"({exc}); {remedy}") from None
    diffs = [f"{labels.get(k, '--' + k)} {_shown(recorded.get(k))} (now {_shown(v)})"
             for k, v in settings.items() if recorded.get(k) != v]
    if diffs:
        raise SettingsMismatchError(f"{what} was made with other settings ({path}): {'; '.join(diffs)}. Adding "
                                    f"to it would mix both. {remedy}")


def write_settings_record(path: PathLike, settings: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> None:
    """Record ``settings`` (compared on reruns) and ``extra`` (information, e.g. the source folder) atomically."""
    write_json(path, {**settings, **(extra or {})})

