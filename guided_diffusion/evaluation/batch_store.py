"""The evaluation's per-batch result files: one ``.npz`` per batch and process under ``<output>/batches/``.

A file holds the batch's arrays and the fingerprint of everything that determined it (``fingerprint.py``); a
rerun reuses a file whose fingerprint matches. The ranks' batch k together are exactly the global batch k of a
one-process run: rank r holds rows r, r + N, r + 2N, ... (``interleave_ranks`` puts them back in order).
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

BATCH_DIR = "batches"
COLUMN = "col{}__{}"  # per-slice column of variant i in a test batch file
RECORD = "rec__{}"  # validation record
ARRAY = "arr__{}"  # per-slice array kept with --save_data


def batch_path(log_dir: str, split: str, world_size: int, rank: int, index: int) -> str:
    return os.path.join(log_dir, BATCH_DIR, f"{split}_ws{world_size}_r{rank}_b{index:05d}.npz")


def batch_index(path: str) -> int:
    """The batch number k of a result file name (``..._b{k:05d}.npz``)."""
    return int(re.search(r"_b(\d+)\.npz$", path).group(1))


def batch_rank(path: str) -> int:
    return int(re.search(r"_r(\d+)_b\d+\.npz$", path).group(1))


def load_batch(path: str, fingerprint: Optional[str] = None) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a finished batch, or None if missing, unreadable or computed with other settings."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception:  # truncated or corrupt: recompute
        return None
    if fingerprint is not None and str(data.get("fingerprint", "")) != fingerprint:
        return None
    return data


def interleave_ranks(parts: Sequence[Dict[str, np.ndarray]], keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """The rows of one global batch in a one-process run's order from the ranks' shares (rank r holds rows
    r, r + N, r + 2N, ...), for the arrays ``keys`` (first axis = slices)."""
    world = len(parts)
    position = np.concatenate([np.arange(len(p[keys[0]])) * world + r for r, p in enumerate(parts)])
    order = np.argsort(position, kind="stable")
    return {k: np.concatenate([p[k] for p in parts])[order] for k in keys}


def columns(d: Dict[str, np.ndarray], i: int = 0) -> Dict[str, np.ndarray]:
    """The per-slice columns of variant ``i`` in a test batch file's arrays."""
    prefix = COLUMN.format(i, "")
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def prefixed(d: Dict[str, np.ndarray], pattern: str) -> Dict[str, np.ndarray]:
    """The arrays named ``pattern.format(name)``, by name (e.g. the validation records, ``RECORD``)."""
    prefix = pattern.format("")
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


class ResultBatches:
    """The test results of variant ``i`` as global batches, read from the batch files on each pass.

    Re-iterable, so the global AUPRC can make its two passes without holding every pixel in memory.
    """

    def __init__(self, paths: List[str], i: int):
        self.paths, self.i = paths, i

    def __iter__(self) -> Iterator[dict]:
        for _, group in itertools.groupby(self.paths, key=batch_index):
            ds = [load_batch(p) for p in group]
            batch = {name: np.concatenate([d[src] for d in ds]) for name, src in (
                ("label", "label"), ("pred_label", f"pred_label_{self.i}"), ("gt", "gt"),
                ("pred_mask", f"mask_{self.i}"), ("anomaly_map", f"anomaly_map_{self.i}"),
                ("foreground", "foreground"))}
            if all("slice_file" in d for d in ds):
                batch["slice_file"] = np.concatenate([d["slice_file"] for d in ds])
            yield batch
