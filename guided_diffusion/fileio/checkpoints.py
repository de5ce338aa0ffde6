"""Checkpoint files: guided-diffusion's names (plus this project's ``state``), finding and loading them.

    model{step:06d}.pt   ema_{rate}_{step:06d}.pt   opt{step:06d}.pt   state{step:06d}.pt

``checkpoint_name`` / ``checkpoint_paths`` make the names, ``parse_checkpoint_name`` reads them, ``find_checkpoint``
and ``latest_training_checkpoint`` pick one, skipping (with a warning naming them) files that are truncated or
unreadable (``checkpoint_problem``: a cheap look at the zip directory of torch's format); ``load_state_dict_into``
explains a checkpoint that does not fit the model (the likely flags).
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

from guided_diffusion.errors import CheckpointMismatchError, UserError

PathLike = Union[str, "os.PathLike[str]"]
Warn = Callable[[str], None]

from guided_diffusion.fileio.atomic import _default_warn, _write_error  # noqa: F401


class UnreadableCheckpointError(UserError, ValueError):
    """A checkpoint file that was asked for by name is truncated, empty or not a torch file."""


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint names

CHECKPOINT_KINDS = ("model", "ema", "opt", "state")
_CHECKPOINT_NAME = re.compile(r"^(?:(?P<kind>model|opt|state)|ema_(?P<rate>[0-9.eE+-]+)_)(?P<step>\d+)\.pt$")


class CheckpointName(NamedTuple):
    kind: str  # model | ema | opt | state
    step: int
    rate: Optional[float]  # EMA rate (ema files only)


def format_rate(rate: Union[float, str]) -> str:
    """EMA rates are written as Python prints the float: 0.9999 -> '0.9999', '0.99990' -> '0.9999'."""
    try:
        return str(float(rate))
    except (TypeError, ValueError):
        raise ValueError(f"EMA rate must be a number, got {rate!r}") from None


def checkpoint_name(kind: str, step: int, rate: Optional[Union[float, str]] = None) -> str:
    """``model000100.pt``, ``ema_0.9999_000100.pt`` (needs ``rate``), ``opt000100.pt``, ``state000100.pt``."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind must be one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if kind == "ema":
        if rate is None:
            raise ValueError("an EMA checkpoint name needs its rate")
        return f"ema_{format_rate(rate)}_{step:06d}.pt"
    return f"{kind}{step:06d}.pt"


def checkpoint_paths(folder: PathLike, step: int, ema_rates: Sequence[Union[float, str]] = ()) -> Dict[str, str]:
    """One checkpoint set: keys ``model``, ``opt``, ``state`` and ``ema_<rate>`` per rate (e.g. ``ema_0.9999``)."""
    folder = os.fspath(folder)
    paths = {kind: os.path.join(folder, checkpoint_name(kind, step)) for kind in ("model", "opt", "state")}
    for rate in ema_rates:
        paths[f"ema_{format_rate(rate)}"] = os.path.join(folder, checkpoint_name("ema", step, rate))
    return paths


def parse_checkpoint_name(name: PathLike) -> Optional[CheckpointName]:
    """``.../ema_0.9999_000100.pt`` -> CheckpointName("ema", 100, 0.9999); None for any other name."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.fspath(name)))
    if match is None:
        return None
    if match.group("rate") is not None:
        try:
            rate = float(match.group("rate"))
        except ValueError:
            return None
        return CheckpointName("ema", int(match.group("step")), rate)
    return CheckpointName(match.group("kind"), int(match.group("step")), None)


def list_checkpoints(folder: PathLike, kind: str = "model", ema_rate: Optional[Union[float, str]] = None) -> Dict[int, str]:
    """``{step: path}`` of the ``kind`` files in ``folder`` (EMA: of that rate only); {} for a missing folder."""
    folder = os.fspath(folder)
    rate = float(ema_rate) if ema_rate is not None else None
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        parsed = parse_checkpoint_name(name)
        if parsed is not None and parsed.kind == kind and (kind != "ema" or parsed.rate == rate):
            found[parsed.step] = os.path.join(folder, name)
    return found


def checkpoint_problem(path: PathLike) -> Optional[str]:
    """None when ``path`` looks like a complete torch file, else what is wrong ("is truncated ...").

    Cheap: reads only torch's zip directory, which is written last (at the end of the file), so a truncated file has
    none. Pre-1.6 torch files (plain pickles) cannot be checked this way and pass.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
        if head[:1] == b"\x80":
            return None  # legacy pickle format
        return "is truncated or not a torch checkpoint (no complete zip directory)"
    if not infos:
        return "is not a torch checkpoint (empty archive)"
    return None


def find_checkpoint(folder: PathLike, step: Union[int, str, None] = None, ema_rate: Optional[Union[float, str]] = None,
                    warn: Optional[Warn] = None, flag: str = "--model_num") -> str:
    """Path of ``model{step}.pt`` (or ``ema_{rate}_{step}.pt`` with ``ema_rate``) in ``folder``.

    ``step`` None, "" or "latest": the newest readable one; files that are truncated or unreadable are skipped
    with a warning naming them. A given step (int, or a string with or without zero padding) must exist and be
    readable. Errors name ``flag`` and list the available steps.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist or is not a folder")
    kind = "ema" if ema_rate is not None else "model"
    found = list_checkpoints(folder, kind, ema_rate)
    what = (f"EMA (rate {format_rate(ema_rate)}) checkpoints ema_{format_rate(ema_rate)}_NNNNNN.pt"
            if ema_rate is not None else "checkpoints modelNNNNNN.pt")
    if not found:
        raise FileNotFoundError(f"no {what} in {folder}")
    if step in (None, "", "None", "latest"):
        skipped = []
        for s in sorted(found, reverse=True):
            problem = checkpoint_problem(found[s])
            if problem is None:
                if skipped:
                    (warn or _default_warn)(f"skipped unreadable checkpoint(s) {', '.join(skipped)}; using "
                                            f"{found[s]}")
                return found[s]
            skipped.append(f"{found[s]} ({problem})")
        raise UnreadableCheckpointError(f"every one of the {what} in {folder} is unreadable: {'; '.join(skipped)}")
    try:
        number = int(step)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a step number, got {step!r}") from None
    if number not in found:
        raise FileNotFoundError(f"{flag} {step}: no such {what} in {folder}; available steps: {sorted(found)}")
    problem = checkpoint_problem(found[number])
    if problem is not None:
        raise UnreadableCheckpointError(f"checkpoint {found[number]} {problem}; pick another {flag} "
                                        f"(available steps: {sorted(found)}) or delete it")
    return found[number]


def latest_training_checkpoint(folder: PathLike, ema_rates: Sequence[Union[float, str]] = (),
                               warn: Optional[Warn] = None) -> Optional[str]:
    """The ``model{step}.pt`` of the newest checkpoint set in ``folder`` whose files are all readable (None: none).

    A set is its model file plus those of its EMA (for ``ema_rates``), optimizer and state files that exist;
    sets with a truncated or unreadable file are skipped with a warning naming it (``--resume_checkpoint auto``).
    """
    models = list_checkpoints(folder, "model")
    skipped = []
    for step in sorted(models, reverse=True):
        paths = checkpoint_paths(folder, step, ema_rates)
        problems = [f"{p} ({problem})" for key, p in paths.items()
                    if (key == "model" or os.path.exists(p)) and (problem := checkpoint_problem(p)) is not None]
        if not problems:
            if skipped:
                (warn or _default_warn)(f"skipped unreadable checkpoint(s) {'; '.join(skipped)}; resuming from "
                                        f"{paths['model']}")
            return paths["model"]
        skipped.extend(problems)
    if skipped:
        (warn or _default_warn)(f"no readable checkpoint set in {folder} (skipped {'; '.join(skipped)}): "
                                "starting from scratch")
    return None


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` (weights only) with an error naming the file when it is truncated or not a torch file."""
    from guided_diffusion import dist_util

    path = os.fspath(path)
    try:
        return dist_util.load_state_dict(path, map_location=map_location)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        problem = checkpoint_problem(path) if os.path.exists(path) else None
        detail = problem or f"is unreadable ({type(exc).__name__}: {_shorten(str(exc).splitlines()[0] if str(exc) else '', 300)})"
        raise UnreadableCheckpointError(f"cannot load checkpoint {path}: it {detail}; pick another checkpoint, or "
                                        "delete it (--resume_checkpoint auto and --model_num '' skip unreadable ones)"
                                        ) from None


def load_state_dict_into(module: Any, path: PathLike, map_location: Any = "cpu", hint: str = "") -> None:
    """Load the state_dict file ``path`` into ``module`` strictly (a DDP ``module.`` prefix is removed).

    A mismatch is a ``CheckpointMismatchError`` naming the file, ``hint`` (e.g. the flags the model was built from),
    the counts of missing / unexpected / differently shaped keys with a few examples, and the flags that likely
    differ (``state_dict_mismatch``), instead of torch's full dump.
    """
    state = load_checkpoint(path, map_location=map_location)
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointMismatchError(f"checkpoint {os.fspath(path)} is not a plain state_dict (a dict of tensors, "
                                      f"as training writes); got a {type(state).__name__}")
    if state and all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    problem = state_dict_mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()},
                                  {k: tuple(v.shape) for k, v in state.items()})
    if problem is not None:
        raise CheckpointMismatchError(
            f"checkpoint {os.fspath(path)} does not fit the model built from {hint or 'the flags'}: {problem}. "
            "Build the model with the flags the checkpoint was trained with (its folder's config.json, or the "
            "training command), or point at the checkpoint you mean")
    module.load_state_dict(state, strict=True)


def _examples(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def state_dict_mismatch(model: Dict[str, tuple], checkpoint: Dict[str, tuple]) -> Optional[str]:
    """None when the key -> shape maps agree, else a short summary and the flags that likely differ.

    E.g. "3 keys of another shape (input_blocks.0.0.weight: checkpoint (32, 4, 3, 3), model (64, 4, 3, 3), ...);
    likely flags: --num_channels (checkpoint: 32, model: 64)".
    """
    missing = [k for k in model if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model]
    reshaped = [k for k in model if k in checkpoint and tuple(model[k]) != tuple(checkpoint[k])]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of the model missing from the checkpoint ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) in the checkpoint that the model lacks ({_examples(unexpected)})")
    if reshaped:
        shown = [f"{k}: checkpoint {tuple(checkpoint[k])}, model {tuple(model[k])}" for k in reshaped]
        parts.append(f"{len(reshaped)} key(s) of another shape ({_examples(shown, 2)})")
    flags = _likely_flags(model, checkpoint)
    return "; ".join(parts) + (f"; likely flags: {'; '.join(flags)}" if flags else "")


def _likely_flags(model: Dict[str, tuple], ckpt: Dict[str, tuple]) -> List[str]:
    """Which flags probably differ, read off the UNet / classifier key names (guided-diffusion's module tree)."""
    out = []
    first = "input_blocks.0.0.weight"  # the input conv: [num_channels, in_channels, 3, 3]
    same_input = True
    if first in model and first in ckpt:
        if model[first][0] != ckpt[first][0]:
            out.append(f"--num_channels / --classifier_width (checkpoint: {ckpt[first][0]}, model: {model[first][0]})")
        if model[first][1:2] != ckpt[first][1:2]:
            same_input = False
            out.append(f"--in_channels (checkpoint: {ckpt[first][1]}, model: {model[first][1]})")
    last = "out.2.weight"  # the UNet's output conv: [out_channels, ...]
    if last in model and last in ckpt and model[last][0] != ckpt[last][0] and same_input:
        out.append(f"--learn_sigma (the checkpoint predicts {ckpt[last][0]} channels, the model {model[last][0]})")
    if ("label_emb.weight" in model) != ("label_emb.weight" in ckpt):
        cond = "label_emb.weight" in ckpt
        out.append(f"--num_classes / --class_cond (the checkpoint is {'class-conditional' if cond else 'unconditional'})")
    elif "label_emb.weight" in model and model["label_emb.weight"][0] != ckpt["label_emb.weight"][0]:
        out.append(f"--num_classes (checkpoint: {ckpt['label_emb.weight'][0]}, model: {model['label_emb.weight'][0]})")

    def has(keys: Dict[str, tuple], word: str) -> bool:
        return any(word in k for k in keys)

    if has(model, "transformer_branch") != has(ckpt, "transformer_branch"):
        out.append(f"--use_hae / --unet_ver (the checkpoint has {'' if has(ckpt, 'transformer_branch') else 'no '}"
                   "HAE blocks)")
    elif has(model, "encoder_kv") != has(ckpt, "encoder_kv"):
        out.append(f"--unet_ver (the checkpoint is {'not ' if has(ckpt, 'encoder_kv') else ''}a v1 UNet)")
    blocks = [len({k.split(".")[1] for k in keys if k.startswith("input_blocks.")}) for keys in (ckpt, model)]
    if blocks[0] != blocks[1]:
        out.append(f"--channel_mult / --num_res_blocks / --image_size (the checkpoint has {blocks[0]} input blocks, "
                   f"the model {blocks[1]})")
    elif {k for k in model if ".qkv." in k} != {k for k in ckpt if ".qkv." in k} and not out:
        out.append("--attention_resolutions (attention layers sit at other resolutions)")
    return out


def _shorten(text: str, limit: int = 1200) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


