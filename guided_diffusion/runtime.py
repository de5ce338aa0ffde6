"""Run-time choices shared by every entry point: numeric precision, seeding, CPU threads.

* ``PRECISIONS`` / ``check_precision`` / ``autocast``: ``--precision fp32|bf16|fp16`` through ``torch.autocast``.
* ``configure_cuda`` / ``cuda_backends``: the CUDA backend choices, made deliberately (TF32 off: fp32 means fp32;
  ``cudnn.benchmark`` on: training and translation repeat the same shapes), process-wide or for a block.
* ``seed_everything``: python, numpy and torch RNGs from one seed.
* CPU threads. Two things decide whether a CPU step collapses when the machine is shared
  (``bench/cpu_threads.py``; numbers in ``bench/results/cpu_threads_2026-12-01.md``): OpenMP threads that spin while
  waiting, and more threads than free cores. The wait policy must be set before torch loads OpenMP, so it is set where
  the process starts:
  ``guided_diffusion/__init__.py`` makes ``OMP_WAIT_POLICY=PASSIVE`` the default (importing the package first,
  as every script does, is enough) and the shell launchers export it. The thread count is set here, after
  torch is loaded: ``configure_threads()`` uses the free cores (cores this process may use minus the 1-minute
  load average, at least 1) unless ``OMP_NUM_THREADS`` is set (by the user, or by torchrun for several processes).
* ``worker_pool``: a process pool whose workers end with this process (killed, interrupted or failing), so no
  worker keeps running after its parent (preprocessing, synthetic data).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np
import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, flag: str = "--precision") -> str:
    """``precision`` if it is a key of PRECISIONS, else a ValueError naming ``flag``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device: "torch.device | str", precision: str) -> ContextManager:
    """``torch.autocast`` for ``precision`` on ``device``'s type (fp32: a no-op context)."""
    dtype = PRECISIONS[check_precision(precision)]
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------------
# CUDA backend choices

# Why these defaults:
# * TF32 off. PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa on Ampere and later), so "fp32"
#   would silently be less precise than on a CPU; here fp32 means fp32 and agrees with the CPU to float precision.
#   The fast GPU path is ``--precision bf16`` (autocast), whose effect on the metrics is measured (bench/results).
# * cudnn.benchmark on: every training step and every translation call of a run has the same shapes, so timing the
#   convolution algorithms once per shape pays for itself within a few calls.
CUDA_TF32 = False
CUDA_BENCHMARK = True


def cuda_settings() -> dict:
    """The current TF32 and cuDNN autotuning flags (readable without a GPU)."""
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def configure_cuda(tf32: bool = CUDA_TF32, benchmark: bool = CUDA_BENCHMARK) -> dict:
    """Set the CUDA backend choices for this process (see above); returns the previous settings."""
    previous = cuda_settings()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
    return previous


def restore_cuda(settings: dict) -> None:
    """Put back settings returned by ``configure_cuda`` / ``cuda_settings``."""
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]


@contextlib.contextmanager
def cuda_backends(tf32: bool = CUDA_TF32, benchmark: bool = CUDA_BENCHMARK) -> Iterator[None]:
    """``configure_cuda`` for the block only (tests, benchmarks): the previous settings come back afterwards."""
    previous = configure_cuda(tf32, benchmark)
    try:
        yield
    finally:
        restore_cuda(previous)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which taskset and cgroup cpusets restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """Usable cores minus the 1-minute load average (other work), rounded, at least 1."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, int(cores - load + 0.5))


def configure_threads(processes: Optional[int] = None) -> int:
    """Set torch's CPU thread count from the free cores, shared by ``processes`` processes on this machine
    (default ``$LOCAL_WORLD_SIZE`` or 1), unless ``OMP_NUM_THREADS`` is set; returns the thread count in use."""
    if not os.environ.get("OMP_NUM_THREADS"):
        processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        torch.set_num_threads(max(1, free_cores() // max(1, processes)))
    return torch.get_num_threads()


def thread_summary() -> str:
    """One line for the logs: threads, wait policy and where they came from."""
    source = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "free cores"
    return (f"CPU threads {torch.get_num_threads()} ({source}; {usable_cores()} usable cores), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


# ------------------------------------------------------------------------------------------------------------------
# Worker processes that end with their parent

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _watch_parent(parent_pid: int, ppid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != ppid or not _pid_alive(parent_pid):
            os._exit(1)  # the parent is gone (killed): nobody collects this worker's result


def _worker_start(parent_pid: int, initializer: Optional[Callable[..., Any]], initargs: Sequence[Any]) -> None:
    """Runs first in every worker: end with the parent, leave Ctrl-C to the parent, then the user's initializer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles it and ends the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited by fork)
    if sys.platform.startswith("linux"):  # the kernel sends SIGTERM when the parent dies, even by SIGKILL
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    ppid = os.getppid()
    if ppid != parent_pid and not _pid_alive(parent_pid):
        os._exit(1)  # the parent died before this worker started watching it
    # elsewhere (and as a second line of defence) poll the parent
    threading.Thread(target=_watch_parent, args=(parent_pid, ppid), daemon=True, name="watch-parent").start()
    if initializer is not None:
        initializer(*initargs)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the running workers (shutdown alone waits for running tasks)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public way to end running tasks
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(timeout=5)


class Terminated(SystemExit):
    """SIGTERM received while a worker pool ran (the workers were stopped)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


@contextlib.contextmanager
def worker_pool(workers: int, initializer: Optional[Callable[..., Any]] = None,
                initargs: Sequence[Any] = ()) -> Iterator[ProcessPoolExecutor]:
    """``with worker_pool(n) as pool: pool.submit(...)``: a ``ProcessPoolExecutor`` whose workers end with this process.

    A worker exits when its parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``, and a thread polling the
    parent everywhere); it ignores Ctrl-C, which the parent handles. In the parent, an exception (Ctrl-C included)
    or SIGTERM inside the block cancels the queued tasks and terminates the running workers before it propagates
    (SIGTERM as ``SystemExit(143)``); a normal exit waits for the workers as usual.
    """
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_start,
                               initargs=(os.getpid(), initializer, tuple(initargs)))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield pool
    except BaseException:
        _stop_workers(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(load: bool = True) -> str:
    """One line for benchmark and result files: CPU, cores, GPU, [load average,] torch and Python versions."""
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    parts = [f"{cpu_name()}, {os.cpu_count()} cores, {gpu}"]
    if load and hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f}")
    parts.append(f"torch {torch.__version__}, python {platform.python_version()}")
    return "; ".join(parts)
