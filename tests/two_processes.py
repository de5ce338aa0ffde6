"""Helpers of the tests that run two processes on one machine (gloo, or torchrun's rendezvous)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

import torch


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT or a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, port: int, folder: str) -> Iterator[None]:
    """Rank ``rank`` of a two-process group on this machine, one thread each, the logger writing CSV from rank 0
    into ``folder``/log; the group is torn down however the body ends."""
    from guided_diffusion import dist_util, logger

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_util.setup_dist()
    try:
        logger.configure(os.path.join(folder, "log"), format_strs=["csv"] if rank == 0 else [], sync_ranks=True)
        yield
    finally:
        dist_util.cleanup_dist()
