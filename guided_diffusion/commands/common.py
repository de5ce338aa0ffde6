"""What the commands share: presets on the command line, the flag groups of a slice method, given flags, the run
frame (process group, user errors) and the run folder's settings record."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Set, TypeVar

from guided_diffusion import dist_util, fileio
from guided_diffusion.architecture import RUNTIME_FLAGS, ClassifierSettings, ModelSettings
from guided_diffusion.flags import ArgumentParser, HelpFormatter, add_options, explicit_flags, parse_bool
from guided_diffusion.loading import CheckpointSettings
from guided_diffusion.methods.registry import METHODS, method_class
from guided_diffusion.methods.settings import ComputeSettings, MapSettings

T = TypeVar("T")
SETTINGS_FILE = "settings.json"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def pre_parse(argv: Optional[Sequence[str]], **defaults: Any) -> argparse.Namespace:
    """The flags that shape a command's parser (``--preset``, ``--method``), read before it is built."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="")
    for name, default in defaults.items():
        pre.add_argument(f"--{name}", default=default)
    return pre.parse_known_args(argv)[0]


def preset_values(name: str, command: str) -> Dict[str, Any]:
    """The values of preset ``name`` for ``command`` ({} without a preset); a ValueError listing the presets."""
    if not name:
        return {}
    from guided_diffusion import presets

    return presets.values_for(name, command)


def add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="", metavar="NAME",
                   help="start from a named preset (the paper's settings per data set, method and model; the "
                        "quickstart's): `anofpdm presets` lists them; explicit flags override it")


def apply_defaults(p: argparse.ArgumentParser, values: Dict[str, Any]) -> Set[str]:
    """Make ``values`` the parser's defaults for the flags it has; returns the names applied."""
    dests = {a.dest for a in p._actions}
    applied = {k: v for k, v in values.items() if k in dests}
    p.set_defaults(**applied)
    return set(applied)


def given_flags(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], preset: Iterable[str] = ()) -> Set[str]:
    """The flags set on the command line, and the preset's except its model-architecture flags: a checkpoint's
    config.json is held against these. (A preset's architecture is only the default for a folder without
    config.json; its runtime flags, such as --timestep_respacing, apply to every folder.)"""
    architecture = {f.name for cls in (ModelSettings, ClassifierSettings) for f in dataclasses.fields(cls)}
    return explicit_flags(p, argv) | (set(preset) - (architecture - RUNTIME_FLAGS))


def add_inference_options(p: argparse.ArgumentParser, method: str, known: Set[str]) -> None:
    """The flags of a slice method: its checkpoint, the model (for folders without config.json), the map's
    post-processing, how model calls run, and the method's own (only this method's)."""
    cls = method_class(method)
    add_options(p.add_argument_group("checkpoint"), CheckpointSettings, known=known)
    add_options(p.add_argument_group(f"the {method} method"), cls.Settings, known=known)
    for extra in cls.option_groups:
        add_options(p.add_argument_group(f"the {method} method: {extra.__doc__.splitlines()[0].rstrip('.')}"), extra,
                    known=known)
    add_options(p.add_argument_group("anomaly map"), MapSettings, known=known)
    add_options(p.add_argument_group("computation"), ComputeSettings, known=known)
    add_options(p.add_argument_group("model (read from the checkpoint folder's config.json when it has one)"),
                ModelSettings, known=known)
    p.set_defaults(**cls.shared_defaults)


def method_choice(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--method", default=default, choices=list(METHODS),
                   help="segmentation method (its own flags are listed when it is chosen: --method NAME --help)")


def add_output_flag(p: Any, what: str) -> None:
    p.add_argument("--output", default="", metavar="FOLDER", help=f"output folder: {what}")


def add_resumable_output(group: Any, what: str, resume: str, known: Set[str]) -> None:
    """--output, --resume and --progress of a command that continues an earlier run in its output folder."""
    add_output_flag(group, f"{what}; a rerun into it continues")
    group.add_argument("--resume", type=parse_bool, default=True, metavar="BOOL", help=resume)
    group.add_argument("--progress", type=parse_bool, default=True, metavar="BOOL", help="progress bars")
    known |= {"output", "resume", "progress"}


def global_batch(values: Dict[str, Any], given: Set[str], world: int) -> int:
    """``--batch_size`` (global), or ``--batch_per_process`` times the processes when that is set and
    ``--batch_size`` was not given."""
    if values.get("batch_per_process", 0) > 0 and "batch_size" not in given:
        return int(values["batch_per_process"]) * world
    return int(values["batch_size"])


def fp16_precision(precision: str, use_fp16: bool, flag: str) -> str:
    """The precision in effect with upstream's fp16 switch (``--use_fp16 true``: fp16 through autocast)."""
    if not use_fp16:
        return precision
    if precision == "bf16":
        raise ValueError(f"{flag} true asks for fp16 but --precision is bf16: pass one of them")
    return "fp16"


def prepare_output(folder: str, settings: Any, command: str, preset: str = "") -> None:
    """Rank 0 records the settings in ``folder/settings.json`` (the console shows where); every rank waits."""
    if dist_util.get_rank() == 0:
        print(f"anofpdm {command}: settings in {record_settings(folder, settings, command, preset)}", flush=True)
    dist_util.barrier()


def run_in_process_group(check: Callable[[], T], run: Callable[[T], Any]) -> Any:
    """The commands' frame: process group up, ``check()`` (settings; a user error is reported by
    ``errors.entry_point``), ``run(settings)``, process group down."""
    dist_util.setup_dist()
    try:
        return run(check())
    finally:
        dist_util.cleanup_dist()


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def settings_json(settings: Any) -> Dict[str, Any]:
    """A settings object (nested dataclasses) as a JSON-able dict."""
    return _jsonable(settings)


def record_settings(folder: str, settings: Any, command: str, preset: str = "") -> str:
    """Write ``folder/settings.json``: the command, its preset and every setting (the console shows only where it
    went); returns its path."""
    path = os.path.join(folder, SETTINGS_FILE)
    fileio.write_json(path, {"command": command, "preset": preset or None, "settings": settings_json(settings)})
    return path


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
