"""Content fingerprints for the evaluation cache: what a cached batch depends on, by content, not by name or time.

A cached result is reused only when the *content* it was computed from is the same: the checkpoints' bytes
(SHA-256 of each file) and a manifest of the data split (every slice file's relative path, size and SHA-256, in the
loader's order). Regenerating the data in place under the same names, or replacing a checkpoint by another of the
same size and modification time, therefore changes the fingerprint.

Hashing is cheap on reruns: a :class:`DigestCache` (a JSON file in the log folder) remembers each file's digest
together with its size, modification time, status-change time (ctime, which ``os.utime`` cannot set back and
every write or rename updates) and inode; a file whose four values are unchanged is not read again. A changed or
new file is read once (about 0.7 GB/s). As git does for its index ("racy" files), a digest is remembered only for a
file whose ctime is at least ``RACY_SECONDS`` old when it is hashed, so a rewrite within the clock's resolution of
the hashing can never keep all four values.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

CHUNK = 1 << 20
CACHE_VERSION = 1
RACY_SECONDS = 2.0
DIGESTS_FILE = "file_digests.json"  # the DigestCache of an output folder


def json_digest(obj: Any) -> str:
    """SHA-1 of ``obj`` as sorted JSON: the key of a cached result from the settings it depends on."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> List[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestCache:
    """File digests remembered by (size, mtime, ctime, inode); ``path=None`` keeps them in memory only."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.read = 0  # files hashed by this object (for tests and logs)
        self._dirty = False
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
                if record.get("version") == CACHE_VERSION and isinstance(record.get("files"), dict):
                    self.entries = record["files"]
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # an unreadable cache is only slower: everything is hashed again

    def digest(self, path: str) -> str:
        path = os.path.abspath(path)
        st = os.stat(path)
        key = _stat_key(st)
        entry = self.entries.get(path)
        if entry is not None and entry.get("stat") == key:
            return entry["sha256"]
        value = file_digest(path)
        self.read += 1
        settled = time.time_ns() - st.st_ctime_ns >= RACY_SECONDS * 1e9
        if settled and _stat_key(os.stat(path)) == key:  # and not rewritten while we read it
            self.entries[path] = {"stat": key, "sha256": value}
            self._dirty = True
        return value

    def save(self) -> None:
        if not self.path or not self._dirty:
            return
        from guided_diffusion import fileio

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fileio.write_json(self.path, {"version": CACHE_VERSION, "files": self.entries})
        self._dirty = False


def files_fingerprint(paths: Sequence[str], root: Optional[str] = None, cache: Optional[DigestCache] = None) -> Dict[str, Any]:
    """``{"files": n, "sha256": ...}`` over ``(path relative to root, size, content digest)`` of each file, in order."""
    cache = cache or DigestCache()
    h = hashlib.sha256()
    for p in paths:
        rel = os.path.relpath(p, root) if root else os.path.basename(p)
        h.update(f"{rel}\0{os.path.getsize(p)}\0{cache.digest(p)}\n".encode())
    return {"files": len(paths), "sha256": h.hexdigest()}


def split_fingerprint(data_dir: str, split: str, cache: Optional[DigestCache] = None) -> Dict[str, Any]:
    """The manifest fingerprint of the slices the evaluation loader reads from ``data_dir/npy_{split}``."""
    from guided_diffusion.data.loaders import BrainDataset

    dataset = BrainDataset(data_dir, split, mixed=True)
    return files_fingerprint([str(p) for p in dataset.items], root=str(Path(data_dir)), cache=cache)


def checkpoints_fingerprint(paths: Iterable[str], cache: Optional[DigestCache] = None) -> List[str]:
    """The content digest of each checkpoint (where it lies and what it is called do not matter)."""
    cache = cache or DigestCache()
    return [cache.digest(p) for p in paths]
