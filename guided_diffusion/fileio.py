"""Checkpoint names, atomic writes, leftover sweeping and the run configuration file: every file the package writes.

**Atomic writes.** Every writer goes through ``atomic_write(path)`` (or ``atomic_dir(path)`` for a whole folder):
the data goes to a temp file in the same folder, is flushed and fsynced, then renamed over ``path``. A killed or
failing writer therefore never leaves a partial file under the final name, and the old file (if any) stays intact
until the new one is complete. Temp names have one recognisable scheme, ``.<name>.partial-<pid>-<8 hex>``
(hidden, and not ending in the final suffix, so no ``*.pt`` / ``*.npz`` glob ever matches them). On any exception
the temp file is removed; an ``OSError`` is re-raised naming the file, and a full disk (also when torch or numpy
hide it inside their own error) as ``DiskFullError``. ``sweep_temp_files(folder)`` removes what a killed process
left behind (the entry points call it at start).

**Checkpoint names** (guided-diffusion's, plus this project's ``state``)::

    model{step:06d}.pt   ema_{rate}_{step:06d}.pt   opt{step:06d}.pt   state{step:06d}.pt

``checkpoint_name`` / ``checkpoint_paths`` make them, ``parse_checkpoint_name`` reads them, ``find_checkpoint`` and
``latest_training_checkpoint`` pick one, skipping (with a warning naming them) files that are truncated or unreadable
(``checkpoint_problem``: a cheap look at the zip directory of torch's format).

**config.json** (``write_run_config`` / ``read_run_config``): what a training run was built with, next to its
checkpoints (format below). Building a model from it lives in ``script_util`` (``apply_run_config``,
``load_model_from_dir``)::

    {"format": "guided_diffusion run config", "format_version": 1, "kind": "diffusion",
     "flags": {every key of script_util.model_and_diffusion_defaults(): its value},
     "training": {"ema_rate": "0.9999", ...}, "created": "<ISO time>", "torch": "<version>"}
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import secrets
import shutil
import sys
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

from guided_diffusion.errors import CheckpointMismatchError, SettingsMismatchError, UserError

PathLike = Union[str, "os.PathLike[str]"]
Warn = Callable[[str], None]

# ------------------------------------------------------------------------------------------------------------------
# Errors


class DiskFullError(OSError, UserError):
    """A write failed because the disk (or the user's quota) is full; the partial file was removed."""


class UnreadableCheckpointError(UserError, ValueError):
    """A checkpoint file that was asked for by name is truncated, empty or not a torch file."""


class RunConfigError(UserError, ValueError):
    """config.json is malformed, of another kind, or contradicts the flags of this run."""


def _default_warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _disk_full_cause(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT ``OSError`` in an exception's chain (torch wraps it in a RuntimeError), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(path: str, exc: BaseException, recorded: Optional[OSError] = None) -> Optional[OSError]:
    """The error to raise for a failed write of ``path`` (None: re-raise ``exc`` unchanged)."""
    if isinstance(exc, DiskFullError):
        return None  # already names its file
    full = recorded if recorded is not None and recorded.errno in (errno.ENOSPC, errno.EDQUOT) else None
    full = full or _disk_full_cause(exc)
    if full is not None:
        what = "the disk quota is exceeded" if full.errno == errno.EDQUOT else "the disk is full (no space left on device)"
        return DiskFullError(full.errno, f"cannot write {path}: {what}; the partial file was removed. Free some "
                                         "space and rerun: finished work is kept")
    if isinstance(exc, OSError):
        if exc.errno is None:
            return OSError(f"cannot write {path}: {exc}")
        return OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")  # OSError picks the subclass
    return None


# ------------------------------------------------------------------------------------------------------------------
# Atomic writes

TEMP_TAG = ".partial-"
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.partial-(?P<pid>\d+)-[0-9a-f]{8}$")
# names of the temp files of earlier versions of this package (swept too, so upgraded folders get cleaned)
_LEGACY_TEMP_NAMES = (
    re.compile(r"^.+\.tmp(?P<pid>\d+)(\.png)?$"),  # model000100.pt.tmp1234, metrics.json.tmp1234, panels.png.tmp12.png
    re.compile(r"^progress.*\.csv\.tmp$"),  # the logger's csv rewrite
    re.compile(r"^\.tmp-.+$"),  # preprocessing / synthetic subject folders
    re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$"),  # preprocessing splits and summary
)


def temp_path(path: PathLike) -> str:
    """A fresh temp name for ``path`` in the same folder: ``<folder>/.<name>.partial-<pid>-<8 hex>``."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """True for names made by ``temp_path`` (and by the older schemes ``sweep_temp_files`` also removes)."""
    return bool(_TEMP_NAME.match(name)) or any(p.match(name) for p in _LEGACY_TEMP_NAMES)


class _RecordingFile:
    """A file object that remembers the first OSError its ``write`` raised (torch hides ENOSPC in its own error)."""

    def __init__(self, file: IO):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __iter__(self):
        return iter(self._file)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open(path: str, mode: str, **kwargs: Any) -> IO:
    """Opens temp files for writing (a seam for tests that simulate a full disk)."""
    return open(path, mode, **kwargs)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: Optional[str] = None,
                 newline: Optional[str] = None) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: temp file, flush, fsync, rename over ``path``.

    ``mode`` is "wb" or "w" (text: ``encoding`` defaults to UTF-8). On any exception the temp file is removed and
    the exception re-raised; an ``OSError`` names ``path``, a full disk is a ``DiskFullError``. The folder is created.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    kwargs = {} if mode == "wb" else {"encoding": encoding or "utf-8", "newline": newline}
    try:
        os.makedirs(folder, exist_ok=True)
        raw = _open(tmp, mode, **kwargs)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    file = _RecordingFile(raw)
    try:
        yield file
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(exc, Exception):
            error = _write_error(path, exc, file.error)
            if error is not None:
                raise error from exc
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(path: PathLike, fsync: bool = True) -> Iterator[Path]:
    """``with atomic_dir(final) as tmp: write files into tmp``; then ``tmp`` is renamed to ``final`` (must not exist).

    For outputs that are a whole folder (a preprocessed subject, a synthetic subject, the data splits): a killed or
    failing writer leaves no half-written folder under the final name. Files are fsynced before the rename.
    """
    final = Path(path)
    tmp = Path(temp_path(final))
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(str(final), exc) from exc
    try:
        yield tmp
        if fsync:
            for root, _dirs, files in os.walk(tmp):
                for name in files:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            error = _write_error(str(final), exc)
            if error is not None:
                raise error from exc
        raise
    _fsync_dir(str(final.parent))


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def json_default(o: Any) -> Any:
    """JSON for numpy scalars and arrays (results often hold them); anything else as its string."""
    if hasattr(o, "tolist") and hasattr(o, "dtype"):  # numpy scalar or array, without importing numpy here
        return o.tolist()
    return str(o)


def write_json(path: PathLike, obj: Any, default: Optional[Callable[[Any], Any]] = json_default) -> None:
    """``obj`` as indented JSON with a final newline (numpy values converted)."""
    write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def write_csv(path: PathLike, columns: Sequence[str], rows: Sequence[Dict[str, Any]]) -> None:
    """A CSV table with a header; a missing or None cell is empty."""
    import csv

    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


def torch_save(obj: Any, path: PathLike) -> None:
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def save_npz(path: PathLike, arrays: Dict[str, Any], compressed: bool = True) -> None:
    import numpy as np

    with atomic_write(path) as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process may be writing it right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def sweep_temp_files(folder: PathLike, recursive: bool = False, warn: Optional[Warn] = None) -> List[str]:
    """Remove the temp files and folders that killed writers left in ``folder``; returns what was removed.

    Names made by ``temp_path`` whose writer process is still alive on this machine are kept (a concurrent run).
    ``recursive`` also looks in sub-folders (not inside the removed ones). A missing folder is fine.
    """
    removed: List[str] = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return removed
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            match = _TEMP_NAME.match(name)
            if match is None and not any(p.match(name) for p in _LEGACY_TEMP_NAMES):
                continue
            if match is not None and _pid_alive(int(match.group("pid"))):
                continue
            full = os.path.join(root, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(full)
            removed.append(full)
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in removed] if recursive else []
    if removed:
        (warn or _default_warn)(f"removed {len(removed)} partial file(s) left by an interrupted run in {folder}: "
                                + ", ".join(os.path.basename(p) for p in removed[:5])
                                + (" ..." if len(removed) > 5 else ""))
    return removed


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
