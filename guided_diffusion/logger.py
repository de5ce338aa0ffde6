"""Key-value and text logging in the style of OpenAI guided-diffusion.

``configure()`` picks the folder (argument, else ``$OPENAI_LOGDIR``, else a fresh ``openai-<time>``
folder in the temp dir) and the outputs (``$OPENAI_LOG_FORMAT``, default ``stdout,log,csv``):
``stdout``, ``log`` (``log.txt``), ``csv`` (``progress.csv``), ``json`` (``progress.json``) and
``tensorboard`` (``tb/``; needs the optional ``tensorboard`` package). Only rank 0 writes by default;
other ranks use ``$OPENAI_LOG_FORMAT_MPI`` (default: nothing).
Differences from upstream: files are appended to (a resumed run keeps its history), tensorboard is
optional (``configure(extra_formats=["tensorboard"])``: the training commands' ``--tensorboard true``), and
``configure(sync_ranks=True)`` averages the logged values over all ranks at ``dumpkvs`` (every rank must then call
``dumpkvs`` at the same points).

``progress_bar`` is the one progress bar of every command: tqdm on a terminal; in a redirected log (stderr not a
terminal) a plain line now and then instead, so log files hold no carriage returns or cursor escape codes.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class OutputFormat:
    def writekvs(self, kvs: Dict[str, Any]) -> None:  # key-value table
        pass

    def writeseq(self, seq: Sequence[Any]) -> None:  # free text
        pass

    def close(self) -> None:
        pass


def _fmt(value: Any) -> str:
    return f"{value:<8.3g}" if isinstance(value, float) else str(value)


class HumanOutputFormat(OutputFormat):
    """An aligned table per dump plus free text, to a stream (stdout) or a file (log.txt)."""

    def __init__(self, target: "str | TextIO"):
        self.own_file = isinstance(target, str)
        self.file: TextIO = open(target, "a") if self.own_file else target

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        rows = [(self._trunc(k), self._trunc(_fmt(v))) for k, v in sorted(kvs.items())]
        if not rows:
            return
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        dashes = "-" * (kw + vw + 7)
        lines = [dashes] + [f"| {k}{' ' * (kw - len(k))} | {v}{' ' * (vw - len(v))} |" for k, v in rows] + [dashes]
        self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        bars = sys.modules.get("tqdm") and getattr(sys.modules["tqdm"].tqdm, "_instances", None)
        if self.own_file or not bars:
            self.file.write(text)
            self.file.flush()
            return
        # On a terminal with a live bar: clear the bars, write, redraw them (no text glued to a half-drawn bar).
        with sys.modules["tqdm"].tqdm.external_write_mode(file=self.file):
            self.file.write(text)
            self.file.flush()

    @staticmethod
    def _trunc(s: str) -> str:
        return s[:27] + "..." if len(s) > 30 else s

    def writeseq(self, seq: Sequence[Any]) -> None:
        self._write(" ".join(str(x) for x in seq) + "\n")

    def close(self) -> None:
        if self.own_file:
            self.file.close()


class JSONOutputFormat(OutputFormat):
    def __init__(self, path: str):
        self.file = open(path, "a")

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in kvs.items()}
        self.file.write(json.dumps(clean, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutputFormat(OutputFormat):
    """progress.csv; a new key rewrites the file with a wider header (earlier rows get empty cells)."""

    def __init__(self, path: str):
        self.path = path
        self.keys: List[str] = []
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                self.keys = next(csv.reader(f), [])
        self.file = open(path, "a", newline="")

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys:
            self._widen(new_keys)
        csv.writer(self.file).writerow([kvs.get(k, "") for k in self.keys])
        self.file.flush()

    def _widen(self, new_keys: List[str]) -> None:
        self.file.close()
        with open(self.path, newline="") as f:
            old_rows = list(csv.reader(f))[1:]
        self.keys = self.keys + new_keys
        from guided_diffusion import fileio

        with fileio.atomic_write(self.path, "w", newline="") as f:  # a kill mid-rewrite keeps the old file
            w = csv.writer(f)
            w.writerow(self.keys)
            for row in old_rows:
                w.writerow(row + [""] * (len(self.keys) - len(row)))
        self.file = open(self.path, "a", newline="")

    def close(self) -> None:
        self.file.close()


class TensorBoardOutputFormat(OutputFormat):
    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        self.writer = SummaryWriter(folder)

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        step = int(kvs.get("step", 0))
        for k, v in kvs.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k.replace("_", "/"), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_output_format(fmt: str, folder: str, log_suffix: str = "") -> Optional[OutputFormat]:
    os.makedirs(folder, exist_ok=True)
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(folder, f"log{log_suffix}.txt"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(folder, f"progress{log_suffix}.json"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(folder, f"progress{log_suffix}.csv"))
    if fmt == "tensorboard":
        try:
            return TensorBoardOutputFormat(os.path.join(folder, f"tb{log_suffix}"))
        except ImportError:
            warnings.warn("log format 'tensorboard' skipped: the tensorboard package is not installed")
            return None
    raise ValueError(f"unknown log format {fmt!r}; valid: stdout, log, csv, json, tensorboard")


class Logger:
    def __init__(self, folder: Optional[str], output_formats: List[OutputFormat], sync_ranks: bool = False):
        self.name2val: Dict[str, Any] = defaultdict(float)
        self.name2cnt: Dict[str, int] = defaultdict(int)
        self.level = INFO
        self.dir = folder
        self.output_formats = output_formats
        self.sync_ranks = sync_ranks

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val

    def logkv_mean(self, key: str, val: Any) -> None:
        old, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old * cnt / (cnt + 1) + float(val) / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self) -> Dict[str, Any]:
        out = dict(self.name2val)
        if self.sync_ranks:
            out = self._mean_over_ranks(out)
        for fmt in self.output_formats:
            fmt.writekvs(out)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def _mean_over_ranks(self, kvs: Dict[str, Any]) -> Dict[str, Any]:
        from guided_diffusion import dist_util

        if dist_util.get_world_size() == 1:
            return kvs
        mine = {k: (v, self.name2cnt.get(k, 1) or 1) for k, v in kvs.items() if isinstance(v, (int, float))}
        totals: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
        for per_rank in dist_util.gather_objects(mine):
            for k, (v, n) in per_rank.items():
                totals[k][0] += v * n
                totals[k][1] += n
        merged = dict(kvs)
        for k, (s, n) in totals.items():
            # Counters such as step/samples are identical on every rank; the weighted mean keeps them.
            merged[k] = s / n if not isinstance(kvs.get(k), int) else kvs[k]
        return merged

    def log(self, *args: Any, level: int = INFO) -> None:
        if self.level <= level:
            for fmt in self.output_formats:
                fmt.writeseq(args)

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


_current: Optional[Logger] = None


def get_current() -> Logger:
    global _current
    if _current is None:  # before configure(): text and tables go to stdout only, nothing is written
        _current = Logger(None, [HumanOutputFormat(sys.stdout)])
    return _current


def configure(
    dir: Optional[str] = None,
    format_strs: Optional[Sequence[str]] = None,
    log_suffix: str = "",
    sync_ranks: bool = False,
    extra_formats: Sequence[str] = (),
) -> Logger:
    """Set up the current logger (closing the previous one) and return it. ``extra_formats`` are added to rank 0's
    formats (e.g. ``["tensorboard"]``)."""
    global _current
    from guided_diffusion import dist_util

    folder = dir or os.getenv("OPENAI_LOGDIR")
    if not folder:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        folder = os.path.join(tempfile.gettempdir(), stamp)
    folder = os.path.expanduser(folder)
    rank = dist_util.get_rank()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        env = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv") if rank == 0 else os.getenv("OPENAI_LOG_FORMAT_MPI", "")
        format_strs = [f for f in env.split(",") if f]
    if rank == 0:
        format_strs = list(format_strs) + [f for f in extra_formats if f not in format_strs]
    if rank == 0 or format_strs:
        os.makedirs(folder, exist_ok=True)
    formats = [f for f in (make_output_format(s, folder, log_suffix) for s in format_strs) if f is not None]
    if _current is not None:
        _current.close()
    _current = Logger(folder, formats, sync_ranks=sync_ranks)
    if formats:
        log(f"Logging to {folder}")
    return _current


def reset() -> None:
    global _current
    if _current is not None:
        _current.close()
    _current = None


@contextmanager
def scoped_configure(dir: Optional[str] = None, format_strs: Optional[Sequence[str]] = None) -> Iterator[Logger]:
    global _current
    prev = _current
    _current = None
    try:
        yield configure(dir=dir, format_strs=format_strs)
    finally:
        if _current is not None:
            _current.close()
        _current = prev


def logkv(key: str, val: Any) -> None:
    """Record a value for this iteration (the last call before ``dumpkvs`` wins)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    """Record a value; ``dumpkvs`` writes the mean of all values given since the last dump."""
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]) -> None:
    for k, v in d.items():
        logkv(k, v)


def dumpkvs() -> Dict[str, Any]:
    """Write all recorded values to every output and clear them."""
    return get_current().dumpkvs()


def getkvs() -> Dict[str, Any]:
    return get_current().name2val


def log(*args: Any, level: int = INFO) -> None:
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    log(*args, level=WARN)


def error(*args: Any) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    get_current().level = level


def get_dir() -> Optional[str]:
    """The log folder (None before ``configure``)."""
    return get_current().dir


record_tabular = logkv
dump_tabular = dumpkvs


# -- progress -------------------------------------------------------------------------------------------------------

PROGRESS_INTERVAL = 30.0  # seconds between two plain progress lines in a redirected log


class LineProgress:
    """A progress bar for logs that are not a terminal: the tqdm calls the package makes (``update``, ``reset``,
    ``set_description``, ``set_postfix``, ``set_postfix_str``, ``close``), shown as one plain line at most every
    ``interval`` seconds and a last line at ``close``; a transient bar (``leave=False``) and a disabled one print
    nothing."""

    def __init__(self, total: Optional[float] = None, desc: str = "", *, leave: bool = True, initial: int = 0,
                 stream: Optional[TextIO] = None, interval: float = PROGRESS_INTERVAL, quiet: bool = False):
        self.total, self.desc, self.n = total, desc, initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.quiet = quiet or not leave
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.quiet and now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = now - self.start
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        text = f"{self.desc}: {count}" if self.desc else count
        if self.total and not done:
            text += f" ({100.0 * self.n / self.total:.0f} %)"
        text += f", {_duration(elapsed)}"
        if self.total and self.n > 0 and not done and self.n < self.total:
            text += f", about {_duration(elapsed * (self.total - self.n) / self.n)} left"
        if self.postfix:
            text += f" [{self.postfix}]"
        self.stream.write(text + "\n")
        self.stream.flush()

    def reset(self, total: Optional[float] = None) -> None:
        self.n = 0
        if total is not None:
            self.total = total
        self.start = self.last = time.monotonic()

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix(self, ordered_dict: Optional[Dict[str, Any]] = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed and not self.quiet and self.n > 0:
            self._line(time.monotonic(), done=True)
        self.closed = True

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_bar(total: Optional[float] = None, desc: str = "", *, enabled: bool = True, leave: bool = True,
                 initial: int = 0, stream: Optional[TextIO] = None, interval: float = PROGRESS_INTERVAL) -> Any:
    """The package's progress bar (the tqdm calls above): a tqdm bar on ``stream`` (default stderr) when it is a
    terminal; otherwise a ``LineProgress`` (a plain line every ``interval`` s and one at the end), so a redirected
    log gets no carriage returns or escape codes. ``enabled=False`` (``--progress false``, ranks other than 0)
    shows nothing."""
    stream = stream if stream is not None else sys.stderr
    if enabled and _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=leave, initial=initial, file=stream, dynamic_ncols=True)
    return LineProgress(total, desc, leave=leave, initial=initial, stream=stream, interval=interval,
                        quiet=not enabled)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
