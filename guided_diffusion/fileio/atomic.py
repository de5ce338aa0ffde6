"""Atomic writes and leftover sweeping: every file the package writes goes through ``atomic_write`` / ``atomic_dir``.

The data goes to a temp file in the same folder, is flushed and fsynced, then renamed over the final name. A killed
or failing writer therefore never leaves a partial file under the final name, and the old file (if any) stays intact
until the new one is complete. Temp names have one recognisable scheme, ``.<name>.partial-<pid>-<8 hex>`` (hidden,
and not ending in the final suffix, so no ``*.pt`` / ``*.npz`` glob ever matches them). On any exception the temp
file is removed; an ``OSError`` is re-raised naming the file, and a full disk (also when torch or numpy hide it inside
their own error) as ``DiskFullError``. ``sweep_temp_files(folder)`` removes what a killed process left behind (the
entry points call it at start).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from guided_diffusion.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
Warn = Callable[[str], None]

# ------------------------------------------------------------------------------------------------------------------
# Errors


class DiskFullError(OSError, UserError):
    """A write failed because the disk (or the user's quota) is full; the partial file was removed."""


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


