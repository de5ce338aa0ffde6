"""Run-time choices shared by every entry point: numeric precision, seeding, CPU threads.

* ``PRECISIONS`` / ``check_precision`` / ``autocast``: ``--precision fp32|bf16|fp16`` through ``torch.autocast``.
* ``seed_everything``: python, numpy and torch RNGs from one seed.
* CPU threads. Two things decide whether a CPU step collapses when the machine is shared
  (``bench/cpu_threads.py``; numbers in the README): OpenMP threads that spin while waiting, and more threads
  than free cores. The wait policy must be set before torch loads OpenMP, so it is set where the process starts:
  ``guided_diffusion/__init__.py`` makes ``OMP_WAIT_POLICY=PASSIVE`` the default (importing the package first,
  as every script does, is enough) and the shell launchers export it. The thread count is set here, after
  torch is loaded: ``configure_threads()`` uses the free cores (cores this process may use minus the 1-minute
  load average, at least 1) unless ``OMP_NUM_THREADS`` is set (by the user, or by torchrun for several processes).
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import ContextManager, Optional

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
