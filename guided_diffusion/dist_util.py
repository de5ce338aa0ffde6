"""Process-group setup for one or many processes, on GPUs (NCCL) or CPUs (gloo).

Three ways to start:
- plain ``python script.py``: a single process, no process group; ``get_world_size() == 1``.
- ``torchrun --nproc-per-node N script.py``: reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
- ``mpiexec -n N python script.py`` with the optional ``mpi4py``: ranks come from MPI, rank 0's host
  and a free port (or the exported MASTER_ADDR/MASTER_PORT) are broadcast, then the same env:// init runs.

Each process uses ``cuda:<LOCAL_RANK % device_count>`` when CUDA exists, else the CPU (upstream's fork
hard-wired ``cuda:0``, which put every rank on GPU 0).
"""

from __future__ import annotations

import io
import os
import socket
from typing import Any, Iterable, List, Optional

import torch
import torch.distributed as dist

# Environment variables that MPI launchers set (Open MPI, MPICH/Hydra, PMIx, MVAPICH, Intel MPI).
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _launched_by_mpi() -> bool:
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _MPI_SIZE_VARS)


def _env_from_mpi() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from MPI so env:// init works."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        from guided_diffusion.errors import SetupError

        raise SetupError(
            "this process was started by an MPI launcher (mpiexec/mpirun) but mpi4py is not installed; "
            "install it (pip install 'guided_diffusion[mpi]') or launch with torchrun instead"
        ) from e
    comm = MPI.COMM_WORLD
    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.getfqdn())
    port = os.environ.get("MASTER_PORT") or str(_find_free_port())
    addr, port = comm.bcast((addr, port), root=0)
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(local_comm.Get_rank()),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )


def setup_dist(backend: Optional[str] = None) -> None:
    """Initialise the default process group if this process is one of several; idempotent.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ and _launched_by_mpi():
        _env_from_mpi()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Single process (plain python): nothing to initialise, everything below degrades gracefully.
        if torch.cuda.is_available():
            torch.cuda.set_device(dev())
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(dev())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def cleanup_dist() -> None:
    """Destroy the process group (if any) so the process exits cleanly."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def dev() -> torch.device:
    """The device this process should use: its own GPU by LOCAL_RANK, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[dev().index])
        else:
            dist.barrier()


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def load_state_dict(path: str, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """Load a checkpoint file (local path or anything ``blobfile`` can read) with ``torch.load``.

    Every rank reads the file itself; checkpoints are plain state_dicts, so ``weights_only`` is safe.
    """
    kwargs.setdefault("weights_only", True)
    if os.path.exists(path):
        return torch.load(path, map_location=map_location, **kwargs)
    import blobfile as bf

    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location=map_location, **kwargs)


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's parameters to every rank (guided-diffusion API; DDP also does this on wrap)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)
