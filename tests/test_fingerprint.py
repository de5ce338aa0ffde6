"""Content fingerprints of data splits and checkpoints (the evaluation cache keys)."""

import hashlib
import os

import numpy as np
import pytest

from guided_diffusion.evaluation import fingerprint as fp


def _write_split(root, values, split="test"):
    for p, vals in enumerate(values):
        d = root / f"npy_{split}" / f"patient_{p}"
        d.mkdir(parents=True, exist_ok=True)
        for z, v in enumerate(vals):
            np.savez(d / f"slice_{z}.npz", x=np.full((1, 1, 4, 4), v), y=np.zeros((1, 1, 4, 4), np.float32))


def test_file_digest_is_sha256_of_the_bytes(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc" * 1000)
    assert fp.file_digest(str(f)) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_split_fingerprint_follows_content_not_names_or_times(tmp_path):
    _write_split(tmp_path, [[1.0, 2.0], [3.0]])
    first = fp.split_fingerprint(str(tmp_path), "test")
    assert first["files"] == 3
    assert fp.split_fingerprint(str(tmp_path), "test") == first
    # regenerated in place: same names, same sizes, the modification times set back
    f = tmp_path / "npy_test" / "patient_0" / "slice_1.npz"
    st = os.stat(f)
    data = f.read_bytes()
    np.savez(f, x=np.full((1, 1, 4, 4), 2.5), y=np.zeros((1, 1, 4, 4), np.float32))
    assert len(f.read_bytes()) == len(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size
    assert fp.split_fingerprint(str(tmp_path), "test") != first
    # the same content under another root gives the same fingerprint (paths are relative)
    _write_split(tmp_path / "copy", [[1.0, 2.0], [3.0]])
    assert fp.split_fingerprint(str(tmp_path / "copy"), "test") == first


def test_digest_cache_rereads_only_changed_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "RACY_SECONDS", 0.0)
    ckpt = tmp_path / "model000010.pt"
    ckpt.write_bytes(b"\x01" * 4096)
    store = tmp_path / "digests.json"
    cache = fp.DigestCache(str(store))
    d1 = fp.checkpoints_fingerprint([str(ckpt)], cache)
    cache.save()
    again = fp.DigestCache(str(store))
    assert fp.checkpoints_fingerprint([str(ckpt)], again) == d1 and again.read == 0  # remembered, not reread
    # replaced in place by one of the same size, the modification time set back: ctime still moves
    st = os.stat(ckpt)
    with open(ckpt, "r+b") as f:
        f.write(b"\x02" * 4096)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp.checkpoints_fingerprint([str(ckpt)], again) != d1 and again.read == 1
    assert d1 == [hashlib.sha256(b"\x01" * 4096).hexdigest()]


def test_recent_files_are_never_remembered(tmp_path):
    f = tmp_path / "new.bin"
    f.write_bytes(b"x")
    cache = fp.DigestCache()
    cache.digest(str(f))
    cache.digest(str(f))
    assert cache.read == 2  # written a moment ago: within the clock's resolution a rewrite could keep every stat


def test_unreadable_cache_file_is_only_slower(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "RACY_SECONDS", 0.0)
    store = tmp_path / "digests.json"
    store.write_text("{not json")
    f = tmp_path / "a"
    f.write_bytes(b"a")
    cache = fp.DigestCache(str(store))
    assert cache.digest(str(f)) == hashlib.sha256(b"a").hexdigest()
    cache.save()
    assert fp.DigestCache(str(store)).entries


def test_missing_split_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="npy_val"):
        fp.split_fingerprint(str(tmp_path), "val")
