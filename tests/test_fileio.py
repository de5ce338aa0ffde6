"""fileio: checkpoint names, the atomic writer (killed, failing, disk full), leftover sweeping, readable checkpoints."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import fileio

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- names ------------------------------------------------------------------------------------------------------


def test_checkpoint_names_are_guided_diffusions():
    assert fileio.checkpoint_name("model", 5000) == "model005000.pt"
    assert fileio.checkpoint_name("opt", 12) == "opt000012.pt"
    assert fileio.checkpoint_name("state", 1234567) == "state1234567.pt"  # more than 6 digits: not cut
    assert fileio.checkpoint_name("ema", 210000, "0.9999") == "ema_0.9999_210000.pt"
    assert fileio.checkpoint_name("ema", 3, 0.99990) == "ema_0.9999_000003.pt"
    assert fileio.checkpoint_paths("/r", 7, [0.99, "0.9999"]) == {
        "model": "/r/model000007.pt", "opt": "/r/opt000007.pt", "state": "/r/state000007.pt",
        "ema_0.99": "/r/ema_0.99_000007.pt", "ema_0.9999": "/r/ema_0.9999_000007.pt"}
    with pytest.raises(ValueError, match="rate"):
        fileio.checkpoint_name("ema", 1)
    with pytest.raises(ValueError, match="kind"):
        fileio.checkpoint_name("weights", 1)


@pytest.mark.parametrize("name, expected", [
    ("model005000.pt", ("model", 5000, None)),
    ("/some/dir/model000000.pt", ("model", 0, None)),
    ("ema_0.9999_210000.pt", ("ema", 210000, 0.9999)),
    ("ema_0.995_001000.pt", ("ema", 1000, 0.995)),
    ("opt065000.pt", ("opt", 65000, None)),
    ("state000003.pt", ("state", 3, None)),
    ("model005000.pt.tmp123", None),
    (".model005000.pt.partial-12-deadbeef", None),
    ("modelA.pt", None),
    ("ema_fast_000001.pt", None),
    ("progress.csv", None),
])
def test_parse_checkpoint_name(name, expected):
    parsed = fileio.parse_checkpoint_name(name)
    assert (tuple(parsed) if parsed else None) == expected


def test_list_checkpoints_by_kind_and_rate(tmp_path):
    for n in ("model000010.pt", "model000002.pt", "ema_0.99_000010.pt", "ema_0.9999_000002.pt", "opt000010.pt",
              "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert sorted(fileio.list_checkpoints(tmp_path)) == [2, 10]
    assert list(fileio.list_checkpoints(tmp_path, "ema", "0.99")) == [10]
    assert list(fileio.list_checkpoints(tmp_path, "ema", 0.9999)) == [2]
    assert fileio.list_checkpoints(tmp_path / "missing") == {}


# -- the atomic writer ------------------------------------------------------------------------------------------


def test_temp_names_are_hidden_in_the_same_folder(tmp_path):
    tmp = fileio.temp_path(tmp_path / "model000001.pt")
    assert os.path.dirname(tmp) == str(tmp_path)
    name = os.path.basename(tmp)
    assert name.startswith(".model000001.pt.partial-") and not name.endswith(".pt")
    assert f".partial-{os.getpid()}-" in name and fileio.is_temp_name(name)
    assert not fileio.is_temp_name("model000001.pt") and not fileio.is_temp_name(".hidden_config")


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    fileio.write_json(target, {"dice": 0.5})
    assert target.read_text() == '{\n  "dice": 0.5\n}\n'
    with pytest.raises(KeyError):
        with fileio.atomic_write(target, "w") as f:
            f.write('{"dice": 0.7')  # half of the new content, then the writer fails
            raise KeyError("injected failure mid-write")
    assert target.read_text() == '{\n  "dice": 0.5\n}\n'  # old file intact
    assert os.listdir(target.parent) == ["metrics.json"]  # and no temp file left


def test_writer_killed_mid_write_leaves_old_file_and_a_swept_temp(tmp_path):
    target = tmp_path / "model000005.pt"
    torch.save({"w": torch.ones(3)}, target)
    old = target.read_bytes()
    writer = textwrap.dedent(f"""
        import sys, time
        from guided_diffusion import fileio
        with fileio.atomic_write({str(target)!r}) as f:
            f.write(b"PK" + b"x" * 100000)
            f.flush()
            print("writing", flush=True)
            time.sleep(120)
    """)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old  # the final name still holds the complete old checkpoint
    leftovers = hidden(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".model000005.pt.partial-{proc.pid}-")
    assert fileio.list_checkpoints(tmp_path) == {5: str(target)}  # the partial file is no checkpoint
    removed = fileio.sweep_temp_files(tmp_path, warn=lambda m: None)
    assert [os.path.basename(p) for p in removed] == leftovers
    assert os.listdir(tmp_path) == ["model000005.pt"]


class _FullDisk(io.RawIOBase):
    """A file that accepts ``capacity`` bytes, then fails as a full disk does."""

    def __init__(self, path: str, capacity: int):
        self.real = open(path, "wb")
        self.left = capacity

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.left:
            self.real.write(bytes(data[: self.left]))
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.real.write(data)

    def flush(self):
        self.real.flush()

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()


@pytest.mark.parametrize("writer", ["torch", "npz", "text"])
def test_disk_full_is_named_and_leaves_no_temp(tmp_path, monkeypatch, writer):
    target = tmp_path / {"torch": "ema_0.9999_000100.pt", "npz": "b00001.npz", "text": "per_slice.csv"}[writer]
    target.write_bytes(b"previous")
    monkeypatch.setattr(fileio.atomic, "_open", lambda path, mode, **kw: _FullDisk(path, 4096))
    with pytest.raises(fileio.DiskFullError) as info:
        if writer == "torch":  # torch turns the OSError into its own "enforce fail" RuntimeError
            fileio.torch_save({"w": torch.zeros(10000)}, target)
        elif writer == "npz":
            fileio.save_npz(target, {"a": np.random.default_rng(0).random(10000)})
        else:
            with fileio.atomic_write(target, "wb") as f:
                for _ in range(100):
                    f.write(b"slice,dice\n" * 10)
    message = str(info.value)
    assert str(target) in message and "disk is full" in message and "removed" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_bytes() == b"previous"
    assert hidden(tmp_path) == []


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(fileio.DiskFullError, match="cannot write .*model000001.pt: the disk is full"):
            fileio.torch_save({"w": torch.zeros(200_000)}, mount / "model000001.pt")
        assert os.listdir(mount) == []  # the partial temp file does not keep the disk full
        fileio.torch_save({"w": torch.zeros(1000)}, mount / "model000001.pt")  # space is back
        assert torch.load(mount / "model000001.pt")["w"].shape == (1000,)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_other_os_errors_name_the_file(tmp_path, monkeypatch):
    def denied(path, mode, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.atomic, "_open", denied)
    with pytest.raises(PermissionError, match=f"cannot write {tmp_path / 'x.json'}: Permission denied"):
        fileio.write_json(tmp_path / "x.json", {})


def test_atomic_dir(tmp_path):
    final = tmp_path / "patient_7"
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_dir(final) as tmp:
            (tmp / "slice_1.npz").write_bytes(b"1")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with fileio.atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".patient_7.partial-")
        (tmp / "slice_1.npz").write_bytes(b"1")
        assert not final.exists()
    assert os.listdir(final) == ["slice_1.npz"] and os.listdir(tmp_path) == ["patient_7"]


def test_sweep_keeps_live_writers_and_other_files(tmp_path):
    dead, live = dead_pid(), os.getppid()
    names = {
        f".model000002.pt.partial-{dead}-0123abcd": True,  # killed writer: removed
        f".model000003.pt.partial-{live}-0123abcd": False,  # a running process's write: kept
        "model000002.pt.tmp4242": True,  # older schemes
        ".tmp-patient_3-deadbeef": True,
        "progress.csv.tmp": True,
        "model000002.pt": False,
        ".hidden": False,
        "notes.tmp": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "batches").mkdir()
    (tmp_path / "batches" / f".val_b00001.npz.partial-{dead}-89abcdef").write_bytes(b"x")
    (tmp_path / f".patient_9.partial-{dead}-00000000").mkdir()  # an unfinished folder
    messages = []
    removed = fileio.sweep_temp_files(tmp_path, warn=messages.append)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [n for n, gone in names.items() if gone] + [f".patient_9.partial-{dead}-00000000"])
    assert sorted(os.listdir(tmp_path)) == sorted([n for n, gone in names.items() if not gone] + ["batches"])
    assert len(messages) == 1 and "removed 5 partial file(s)" in messages[0]
    assert len(os.listdir(tmp_path / "batches")) == 1  # not recursive by default
    fileio.sweep_temp_files(tmp_path, recursive=True, warn=messages.append)
    assert os.listdir(tmp_path / "batches") == []


# -- readable checkpoints -----------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_checkpoint_problem(tmp_path):
    good = tmp_path / "model000001.pt"
    torch.save({"w": torch.randn(1000)}, good)
    assert fileio.checkpoint_problem(good) is None
    bad = tmp_path / "model000002.pt"
    bad.write_bytes(good.read_bytes())
    _truncate(bad)
    assert "truncated" in fileio.checkpoint_problem(bad)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert fileio.checkpoint_problem(tmp_path / "empty.pt") == "is empty"
    assert "cannot be read" in fileio.checkpoint_problem(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert "not a torch checkpoint" in fileio.checkpoint_problem(tmp_path / "text.pt")
    with pytest.raises(fileio.UnreadableCheckpointError, match="model000002.pt"):
        fileio.load_checkpoint(bad)


def test_find_checkpoint_skips_a_truncated_newest(tmp_path):
    for step in (100, 200, 300):
        torch.save({"step": torch.tensor(step)}, tmp_path / fileio.checkpoint_name("ema", step, 0.99))
    _truncate(tmp_path / "ema_0.99_000300.pt")
    warnings = []
    path = fileio.find_checkpoint(tmp_path, ema_rate="0.99", warn=warnings.append)
    assert path.endswith("ema_0.99_000200.pt")
    assert len(warnings) == 1 and "ema_0.99_000300.pt" in warnings[0] and "truncated" in warnings[0]
    with pytest.raises(fileio.UnreadableCheckpointError, match="ema_0.99_000300.pt is truncated.*available steps"):
        fileio.find_checkpoint(tmp_path, "300", ema_rate="0.99")


def test_latest_training_checkpoint_needs_the_whole_set_readable(tmp_path):
    for step in (1, 2, 3):
        for key, path in fileio.checkpoint_paths(tmp_path, step, [0.9999]).items():
            torch.save({"k": torch.tensor(step)}, path)
    _truncate(tmp_path / "model000003.pt")  # newest model truncated
    _truncate(tmp_path / "opt000002.pt")  # next one's optimizer truncated
    (tmp_path / "state000001.pt").unlink()  # a missing companion is fine (upstream sets have none)
    warnings = []
    assert fileio.latest_training_checkpoint(tmp_path, [0.9999], warn=warnings.append) == str(tmp_path / "model000001.pt")
    assert "model000003.pt" in warnings[0] and "opt000002.pt" in warnings[0]
    assert fileio.latest_training_checkpoint(tmp_path / "none", [0.9999]) is None


# -- config.json ------------------------------------------------------------------------------------------------


def test_run_config_round_trip_and_bad_files(tmp_path):
    path = fileio.write_run_config(tmp_path, "diffusion", {"image_size": 32, "channel_mult": (1, 2)},
                                   training={"ema_rate": "0.99"})
    assert path == str(tmp_path / "config.json") and hidden(tmp_path) == []
    record = fileio.read_run_config(tmp_path)
    assert record["format_version"] == fileio.CONFIG_FORMAT_VERSION == 1 and record["kind"] == "diffusion"
    assert record["flags"] == {"image_size": 32, "channel_mult": [1, 2]} and record["training"] == {"ema_rate": "0.99"}
    assert fileio.read_run_config(tmp_path / "nothing") is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(fileio.RunConfigError, match="config.json cannot be read"):
        fileio.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "guided_diffusion run config", "format_version": 7, '
                                          '"kind": "diffusion", "flags": {}}')
    with pytest.raises(fileio.RunConfigError, match="format_version 7"):
        fileio.read_run_config(tmp_path)
