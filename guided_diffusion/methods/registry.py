"""The registry of slice methods: ``--method`` name -> class, imported on first use."""

from __future__ import annotations

import importlib
from typing import Any, Dict, Type, Union

#: name -> "module:Class" (imported on first use) or the class itself
METHODS: Dict[str, Union[str, type]] = {
    "anofpdm": "guided_diffusion.methods.anofpdm:AnoFPDM",
    "anoddpm": "guided_diffusion.methods.anoddpm:AnoDDPM",
    "clf_guided": "guided_diffusion.methods.clf_guided:ClassifierGuided",
    "ddib": "guided_diffusion.methods.ddib:DDIB",
}


def register_method(name: str, cls: Union[str, type]) -> None:
    """Add a method to the registry (a ``SliceMethod`` subclass, or ``"module:Class"``)."""
    METHODS[name] = cls


def method_class(name: str) -> Type[Any]:
    """The ``SliceMethod`` subclass registered as ``name``; a ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is not known; use one of {', '.join(METHODS)}")
    entry = METHODS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        METHODS[name] = entry
    return entry


def build_method(settings: Any, device: Any) -> Any:
    """The method of ``settings`` (``methods.settings.InferenceSettings``) with its models loaded on ``device``."""
    import torch

    return method_class(settings.method).build(settings, torch.device(device))
