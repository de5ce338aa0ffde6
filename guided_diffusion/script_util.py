"""Upstream's flag surface (guided-diffusion's ``script_util``): the ``*_defaults()`` dicts, ``create_*`` factories and
argparse helpers under their old names, for code written against upstream. The project's own code uses ``factory``
(models from flags), ``architecture`` (typed model settings), ``loading`` (checkpoint folders) and ``flags``.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable

from guided_diffusion.factory import (  # noqa: F401  (upstream's names)
    DEFAULT_CHANNEL_MULT,
    UNET_VERSIONS,
    check_model_flags,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    create_classifier,
    create_classifier_and_diffusion,
    create_gaussian_diffusion,
    create_model,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    out_channels_for,
    parse_attention_resolutions,
    parse_channel_mult,
)
from guided_diffusion.flags import explicit_flags  # noqa: F401
from guided_diffusion.flags import parse_bool as str2bool  # noqa: F401
from guided_diffusion.loading import config_conflicts, load_model_from_dir, recorded_flags  # noqa: F401


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict) -> None:
    """Upstream's helper: one ``--key`` per entry, typed by its default (booleans take true/false)."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args: Any, keys: Iterable[str]) -> Dict:
    return {k: getattr(args, k) for k in keys}
