"""Errors a user can cause, and how every entry point reports them: one clean message, exit code 2.

A user error names the file, flag or value and says what to do. Library code raises ``UserError`` (or one of its
subclasses below, or the ``ValueError`` / ``OSError`` the project raises for flags and files, with such a message);
``entry_point`` (the decorator on every command line's ``main``) turns it into ``<prog>: error: <message>`` on
stderr and ``SystemExit(2)``, without a traceback. ``GD_DEBUG=1`` in the environment shows the traceback too.
Anything else (a bug) keeps its traceback. Ctrl-C is reported as an interruption (exit code 130): finished work is
kept and a rerun continues.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any, Callable, Optional, TypeVar

DEBUG_ENV = "GD_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_F = TypeVar("_F", bound=Callable[..., Any])


class UserError(Exception):
    """A problem the user can fix; the message names the file, flag or value and what to do."""


class DataError(UserError, ValueError):
    """A data file that is unreadable (truncated, corrupt) or does not fit the model or the other files."""


class SettingsMismatchError(UserError, ValueError):
    """An output folder made with other settings than this run's (rerunning into it would mix both)."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint whose weights do not fit the model built from the flags (another architecture)."""


class HyperparameterError(UserError, ValueError):
    """Validation data that cannot determine a method's hyper-parameter."""


class SetupError(UserError, RuntimeError):
    """The launcher, the machine or the data cannot run the command as asked (e.g. mpiexec without mpi4py)."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss (the message says which flags to change and where to resume)."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _worker_free(message: str) -> str:
    """The original message of an exception torch's DataLoader re-raised from a worker (without its traceback)."""
    if "Original Traceback (most recent call last)" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head else last


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line report of a user error, or None when ``exc`` is not one (a bug keeps its traceback)."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return (f"out of GPU memory ({str(exc).splitlines()[0]}); use a smaller --batch_size (or --microbatch, "
                    "--use_checkpoint True, --precision bf16)")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (UserError, ValueError, OSError)):
        return _worker_free(str(exc)) or type(exc).__name__
    return None


def report(exc: BaseException, prog: Optional[str] = None) -> Optional[int]:
    """Print ``exc`` as a user error and return its exit code; None when it is not one (re-raise it)."""
    prog = prog or os.path.basename(sys.argv[0] or "guided_diffusion")
    rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    if isinstance(exc, KeyboardInterrupt):
        print(f"\n{rank}{prog}: interrupted; finished work is kept, rerun the same command to continue",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    message = user_message(exc)
    if message is None:
        return None
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{rank}{prog}: error: {message}", file=sys.stderr, flush=True)
    if not debug_enabled():
        print(f"({DEBUG_ENV}=1 shows where it happened)", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def entry_point(func: _F) -> _F:
    """Decorator for a command line's ``main``: user errors become one message and ``SystemExit(2)``."""

    @functools.wraps(func)
    def main(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:
            code = report(exc)
            if code is None:
                raise
            raise SystemExit(code) from None

    return main  # type: ignore[return-value]
