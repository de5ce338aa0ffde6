"""The fault suite: each class of fault a user meets, injected, and the behaviour asserted (message, what is kept,
what is recomputed). Kills at random moments (training, preprocessing, synthetic data), truncated and garbage
files, a full disk, stray folders, reruns with other settings, data that does not fit the model, bad flag values,
and the one user-error mechanism (``errors.entry_point``). Tiny volumes and models; a few seconds each.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion import errors, fileio, logger
from guided_diffusion.data import preprocess as pp
from guided_diffusion.data.loaders import get_data_iter
from guided_diffusion.commands import train as train_cli
from guided_diffusion.commands import train_classifier as classifier_cli
from test_preprocess import _brats_subject
from test_segment import TINY as SEG_TINY
from test_segment import _argv as _seg_argv
from test_segment import _hyper_file, _save, _subject_arrays, _write_subject
from test_train import TINY_FLAGS, write_npz_dataset

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)  # printed on failure
RNG = random.Random(SEED)




def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", errors.DEBUG_ENV):
        env.pop(var, None)
    return env


PROC_CHILDREN = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()  # Linux with CONFIG_PROC_CHILDREN
needs_proc_children = pytest.mark.skipif(not PROC_CHILDREN, reason="needs /proc/<pid>/task/<tid>/children")


def _children(pid: int) -> list:
    """The pids of a process's children (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended


def _wait_until(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what} (FAULT_SEED={SEED})")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------------------------
# Kills at random moments: the rerun ends where an uninterrupted run ends, and workers die with their parent


def _train_cmd(data: Path, steps: int, *extra: str) -> list:
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--data_dir", str(data), "--in_channels", "4",
            "--batch_size", "2", "--ema_rate", "0.99", "--max_steps", str(steps), *TINY_FLAGS, "--save_interval",
            "1", "--preview_steps", "0", "--resume_checkpoint", "auto", *extra]


def test_training_killed_at_a_random_moment_resumes_to_the_same_weights(tmp_path, monkeypatch):
    data = write_npz_dataset(tmp_path / "data")  # 6 slices: 3 steps per epoch
    steps = 7
    run = tmp_path / "run"
    victim = subprocess.Popen(_train_cmd(data, steps), env=_env(OPENAI_LOGDIR=str(run)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = RNG.randint(1, 4)  # a random moment: some time after the checkpoint of a random step
    _wait_until(lambda: (run / f"model{kill_after:06d}.pt").exists() or victim.poll() is not None, 120,
                f"step {kill_after}")
    time.sleep(RNG.uniform(0.0, 0.3))
    assert victim.poll() is None, f"training finished before the kill (FAULT_SEED={SEED})"
    victim.kill()
    victim.wait()
    killed_at = max(fileio.list_checkpoints(run, "model"))
    assert killed_at < steps, f"FAULT_SEED={SEED}"
    # the uninterrupted reference and the resumed run here, with the victim's one CPU thread (bit-identical kernels)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _train(tmp_path / "ref", data, monkeypatch, "--resume_checkpoint", "auto", steps=steps) == steps
        assert _train(run, data, monkeypatch, "--resume_checkpoint", "auto", steps=steps) == steps
    finally:
        torch.set_num_threads(threads)
    assert "resuming from" in (run / "log.txt").read_text()
    assert not [p for p in os.listdir(run) if fileio.is_temp_name(p)]  # partial files of the kill were swept
    for name in (f"model{steps:06d}.pt", f"ema_0.99_{steps:06d}.pt", f"opt{steps:06d}.pt"):
        ref, got = (torch.load(d / name, weights_only=True) for d in (tmp_path / "ref", run))
        flat_ref, flat_got = _flatten(ref), _flatten(got)
        assert flat_ref.keys() == flat_got.keys()
        for key in flat_ref:
            assert torch.equal(flat_ref[key], flat_got[key]), f"{name}: {key} (killed after step {killed_at}, " \
                                                              f"FAULT_SEED={SEED})"
    ref_state, got_state = (torch.load(d / f"state{steps:06d}.pt", weights_only=True) for d in (tmp_path / "ref", run))
    assert (got_state["epoch"], got_state["batch_in_epoch"]) == (ref_state["epoch"], ref_state["batch_in_epoch"]) == (2, 1)


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _flatten(value, f"{prefix}/{i}").items()}
    return {prefix: torch.tensor(float(obj)) if isinstance(obj, (int, float)) else torch.tensor(0.0)}


SLOW_PREPROCESS = """
import runpy, sys, time
from guided_diffusion.data import preprocess as pp
real = pp.process_subject
def slow(*args, **kwargs):  # each subject takes a while, so a kill finds the workers busy
    time.sleep(0.4)
    return real(*args, **kwargs)
pp.process_subject = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SLOW_SYNTHETIC = """
import runpy, sys, time
from guided_diffusion.data import synthetic
real = synthetic.render_subject
def slow(*args, **kwargs):  # each subject takes a while, so SIGTERM finds the pool running (not its teardown)
    time.sleep(1.0)
    return real(*args, **kwargs)
synthetic.render_subject = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _outputs(root: Path) -> dict:
    """Everything preprocessing determines: the split files and every slice's arrays."""
    out = {f"split/{s}": (root / "data_splits" / s / "scans.csv").read_text() for s in pp.SPLITS}
    for f in sorted(root.glob("npy_*/patient_*/slice_*.npz")):
        with np.load(f) as d:
            out[str(f.relative_to(root))] = (d["x"].copy(), d["y"].copy())
    return out


@needs_proc_children
def test_preprocessing_killed_twice_at_random_moments_resumes_to_the_same_result_and_leaves_no_worker(tmp_path):
    src = tmp_path / "raw"
    for i in range(10):
        _brats_subject(src, f"BraTS2021_{i:05d}", i, lesion=i % 3 != 0)
    reference = pp.preprocess(src, image_size=8, output=tmp_path / "ref", progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", SLOW_PREPROCESS, str(REPO / "scripts" / "preprocess.py"), "--source", str(src),
           "--image_size", "8", "--output", str(out), "--workers", "2"]
    for attempt in range(2):
        before = len(list(out.glob("npy_*/patient_*")))
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(lambda: len(list(out.glob("npy_*/patient_*"))) > before or proc.poll() is not None, 120,
                    "a finished subject")
        time.sleep(RNG.uniform(0.0, 0.6))
        workers = _children(proc.pid)
        assert proc.poll() is None and workers, f"attempt {attempt}: finished before the kill (FAULT_SEED={SEED})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the workers end with their parent (they used to keep running)
        _wait_until(lambda: not any(_running(w) for w in workers), 10, f"workers {workers} to end")
        assert len(list(out.glob("npy_*/patient_*"))) < 10
    again = pp.preprocess(src, image_size=8, output=out, workers=2, progress=False)
    assert again["errors"] == [] and not list(out.glob("npy_*/.*")) and not list(out.glob(".*"))
    assert sum(s["skipped"] for s in again["splits"].values()) > 0  # finished subjects were kept, not redone
    for split in pp.SPLITS:
        for key in ("patients", "healthy_slices", "unhealthy_slices"):
            assert again["splits"][split][key] == reference["splits"][split][key]
    ref, got = _outputs(tmp_path / "ref"), _outputs(out)
    assert ref.keys() == got.keys()
    for key in ref:
        if key.startswith("split/"):
            assert ref[key] == got[key], key
        else:
            np.testing.assert_array_equal(ref[key][0], got[key][0], err_msg=key)
            np.testing.assert_array_equal(ref[key][1], got[key][1], err_msg=key)


@needs_proc_children
def test_synthetic_generation_terminated_stops_its_workers_and_resumes(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "synth"
    cmd = [sys.executable, "-c", SLOW_SYNTHETIC, str(REPO / "scripts" / "make_synthetic_brats.py"), "--output", str(out),
           "--num_subjects",
           "6", "--workers", "2", "--shape", "40", "40", "30", "--healthy_fraction", "0.5"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: len(_children(proc.pid)) >= 2 or proc.poll() is not None, 120, "the workers to start")
    time.sleep(RNG.uniform(0.0, 0.5))
    workers = _children(proc.pid)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)  # e.g. a batch system's time limit
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    _wait_until(lambda: not any(_running(w) for w in workers), 10, f"workers {workers} to end")
    from guided_diffusion.data import synthetic

    synthetic.make_synthetic_brats(out, num_subjects=6, workers=1, shape=(40, 40, 30), healthy_fraction=0.5,
                                   progress=False)  # the rerun (the same settings) completes the folder
    subjects = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert subjects == [f"BraTS2021_{i:05d}" for i in range(6)]
    assert all(len(list((out / s).iterdir())) == 5 for s in subjects)  # four modalities and seg, each complete


# ------------------------------------------------------------------------------------------------------------------
# Truncated and garbage files


def _train(run: Path, data: Path, monkeypatch, *extra: str, steps: int = 2):
    monkeypatch.setenv("OPENAI_LOGDIR", str(run))
    argv = ["--data_dir", str(data), "--in_channels", "4", "--batch_size", "2", "--ema_rate", "0.99", "--max_steps",
            str(steps), *TINY_FLAGS, "--save_interval", "1", "--preview_steps", "0", *extra]
    try:
        return train_cli.main(argv)
    finally:
        logger.reset()


def _user_error(capsys, call, *args, **kwargs) -> str:
    """Run ``call``; it must stop with exit code 2 and one message on stderr, without a traceback."""
    with pytest.raises(SystemExit) as exc:
        call(*args, **kwargs)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no y"])
def test_a_damaged_slice_is_named_in_one_message_with_what_to_do(tmp_path, monkeypatch, capsys, damage):
    data = write_npz_dataset(tmp_path / "data")
    bad = data / "npy_train" / "patient_001" / "slice_2.npz"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(2000))
    else:
        np.savez(bad, x=np.zeros((1, 4, 32, 32)))
    err = _user_error(capsys, _train, tmp_path / "run", data, monkeypatch, steps=3)
    assert str(bad) in err and f"delete {bad.parent}" in err and "scripts/preprocess.py" in err
    assert ("no y array" in err) if damage == "no y" else ("truncated or corrupt" in err)
    if damage == "truncated":  # met mid-run or at start (the header check): either way nothing is half-written
        assert not [p for p in os.listdir(tmp_path / "run") if fileio.is_temp_name(p)]
        monkeypatch.setenv(errors.DEBUG_ENV, "1")  # the debug switch shows where it happened
        with pytest.raises(SystemExit):
            _train(tmp_path / "run2", data, monkeypatch, steps=3)
        err = capsys.readouterr().err
        assert "Traceback" in err and "read_slice" in err and str(bad) in err


def test_a_damaged_slice_in_a_loader_worker_keeps_its_one_line_message(tmp_path):
    data = write_npz_dataset(tmp_path / "data", patients=1, slices=2)
    bad = data / "npy_train" / "patient_000" / "slice_1.npz"
    loader, _ = get_data_iter("brats", data, 2, "train", mixed=True, num_workers=1)  # met in the worker
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 50)
    with pytest.raises(errors.DataError) as exc:
        next(iter(loader))
    assert "Original Traceback" in str(exc.value)  # torch wraps the worker's traceback into the message ...
    message = errors.user_message(exc.value)  # ... which the report strips to the original message
    assert message.startswith(f"cannot read slice file {bad}") and "\n" not in message


def test_garbage_checkpoint_and_another_architecture_are_summarised(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    assert _train(tmp_path / "a", data, monkeypatch, steps=1) == 1
    garbage = tmp_path / "g" / "model000001.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint at all")
    err = _user_error(capsys, _train, tmp_path / "b", data, monkeypatch, "--resume_checkpoint", str(garbage))
    assert f"cannot load checkpoint {garbage}: it is truncated or not a torch checkpoint" in err
    assert "UnpicklingError" not in err  # the cause is named, torch's advice about weights_only is not dumped
    # another architecture: counts of differing keys, a few examples and the likely flag, not torch's dump
    ckpt = tmp_path / "a" / "model000001.pt"
    err = _user_error(capsys, _train, tmp_path / "c", data, monkeypatch, "--resume_checkpoint", str(ckpt),
                      "--num_channels", "64")
    n_tensors = len(torch.load(ckpt, weights_only=True))
    assert f"checkpoint {ckpt} does not fit the model" in err
    assert "likely flags: --num_channels / --classifier_width (checkpoint: 32, model: 64)" in err
    line = next(line for line in err.splitlines() if "does not fit" in line)
    assert "key(s) of another shape (" in line and len(line) < 1200, line
    err = _user_error(capsys, _train, tmp_path / "d", data, monkeypatch, "--resume_checkpoint", str(ckpt),
                      "--unet_ver", "hae_v2", "--use_hae", "True")
    assert "key(s) of the model missing from the checkpoint" in err and "the checkpoint has no HAE blocks" in err
    err = _user_error(capsys, _train, tmp_path / "e", data, monkeypatch, "--resume_checkpoint", str(ckpt),
                      "--num_classes", "0")
    assert "key(s) in the checkpoint that the model lacks (label_emb.weight" in err
    assert "--num_classes / --class_cond (the checkpoint is class-conditional)" in err
    assert n_tensors > 100  # the dump this replaces listed every one of them


def test_garbage_config_json_stops_training_and_is_kept(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"format": "guided_diffusion run config", "flags": {"image_')  # truncated
    err = _user_error(capsys, _train, run, data, monkeypatch, "--resume_checkpoint", "auto")
    assert f"{run / 'config.json'} cannot be read" in err and "restore it, or delete it" in err
    assert (run / "config.json").read_text().endswith('"image_')  # not overwritten ...
    assert not fileio.list_checkpoints(run)  # ... and nothing trained into a folder whose model is unknown


def test_corrupt_nifti_through_the_script_names_subject_and_file(tmp_path):
    src = tmp_path / "raw"
    for i in range(4):
        _brats_subject(src, f"S{i}", i)
    flair = src / "S2" / "S2_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:100])  # truncated download
    cmd = [sys.executable, str(REPO / "scripts" / "preprocess.py"), "--source", str(src), "--image_size", "8",
           "--output", str(tmp_path / "out")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr  # 1: some subjects failed, the rest is done
    assert f"subject S2: cannot read flair file {flair}" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("npy_*/patient_*")) == ["patient_S0", "patient_S1",
                                                                                   "patient_S3"]
    # a damaged settings record is refused, naming it
    (tmp_path / "out" / pp.SETTINGS_FILE).write_text("{")
    with pytest.raises(errors.SettingsMismatchError, match="the record of the settings .* is unreadable"):
        pp.preprocess(src, image_size=8, output=tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------------------------
# A full disk


def test_full_disk_during_a_training_save_keeps_the_last_set_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    run = tmp_path / "run"
    real_open = fileio.atomic._open

    def full_at_step_2(path, mode, **kwargs):
        if "opt000002.pt" in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(fileio.atomic, "_open", full_at_step_2)
    err = _user_error(capsys, _train, run, data, monkeypatch, steps=3)
    assert f"cannot write {run / 'opt000002.pt'}: the disk is full" in err and "finished work is kept" in err
    assert not [p for p in os.listdir(run) if fileio.is_temp_name(p)]
    assert sorted(fileio.list_checkpoints(run)) == [1]  # the set of step 2 is incomplete, so no model000002.pt
    assert fileio.latest_training_checkpoint(run, [0.99]) == str(run / "model000001.pt")
    monkeypatch.setattr(fileio.atomic, "_open", real_open)  # space freed
    assert _train(run, data, monkeypatch, "--resume_checkpoint", "auto", steps=3) == 3
    assert "resuming from" in (run / "log.txt").read_text() and sorted(fileio.list_checkpoints(run)) == [1, 2, 3]


def test_real_full_disk_while_preprocessing_leaves_no_partial_subject(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = tmp_path / "raw"
        for i in range(12):
            _brats_subject(src, f"S{i:02d}", i)
        with pytest.raises(fileio.DiskFullError, match=r"cannot write .*/npy_\w+/patient_S\d+: the disk is full"):
            pp.preprocess(src, image_size=24, output=mount / "out", progress=False)
        done = list((mount / "out").glob("npy_*/patient_*"))
        assert 0 < len(done) < 12 and all(len(list(d.iterdir())) == 5 for d in done)  # whole subjects only
        assert not list((mount / "out").glob("npy_*/.*"))  # the partial folder does not keep the disk full
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------------------------------------------------------
# Stray folders


def _upstream_split(names):
    """Upstream's split written out: random.seed(10); random.shuffle(sorted listing); int(75 %) / int(5 %) / rest."""
    names = sorted(names)
    state = random.getstate()
    random.seed(10)
    random.shuffle(names)
    random.setstate(state)
    n_train, n_val = int(len(names) * 0.75), int(len(names) * 0.05)
    return {"train": names[:n_train], "val": names[n_train:n_train + n_val], "test": names[n_train + n_val:]}


def _written_split(root: Path) -> dict:
    return {s: (root / "data_splits" / s / "scans.csv").read_text().split("\n") for s in pp.SPLITS}


def test_a_stray_folder_takes_no_part_in_the_split(tmp_path):
    src = tmp_path / "raw"
    names = [f"BraTS2021_{i:05d}" for i in range(20)]
    for i, name in enumerate(names):
        _brats_subject(src, name, i)
    (src / "BraTS2021_00007_notes").mkdir()  # sorts among the subjects: it used to shift the seeded split
    (src / "BraTS2021_00007_notes" / "todo.txt").write_text("re-check")
    assert _upstream_split(names) != {s: [n for n in v if "notes" not in n]
                                      for s, v in _upstream_split(names + ["BraTS2021_00007_notes"]).items()}
    summary = pp.preprocess(src, image_size=8, output=tmp_path / "out", progress=False)
    assert _written_split(tmp_path / "out") == _upstream_split(names)  # as if the folder were not there
    assert summary["errors"] == [] and sum(s["patients"] for s in summary["splits"].values()) == 20
    warning = next(w for w in summary["warnings"] if "BraTS2021_00007_notes" in w)
    assert "not a subject" in warning and "BraTS2021_00007_notes_flair.nii.gz" in warning


def test_an_older_split_shifted_by_a_stray_folder_is_refused_with_both_ways_out(tmp_path):
    src = tmp_path / "raw"
    names = [f"BraTS2021_{i:05d}" for i in range(20)]
    for i, name in enumerate(names):
        _brats_subject(src, name, i)
    out = tmp_path / "out"
    old = _upstream_split(names + ["BraTS2021_00007_notes"])  # what earlier versions wrote (the folder is gone now)
    for split, listed in old.items():
        (out / "data_splits" / split).mkdir(parents=True)
        (out / "data_splits" / split / "scans.csv").write_text("\n".join(listed))
    moved = sum(n not in _upstream_split(names)[s] for s in pp.SPLITS for n in old[s] if n in names)
    assert moved > 0
    with pytest.raises(errors.SettingsMismatchError) as exc:
        pp.preprocess(src, image_size=8, output=out, progress=False)
    message = str(exc.value)
    assert "BraTS2021_00007_notes" in message and f"assigns {moved} of the 20 subjects differently" in message
    assert f"delete {out / 'data_splits'}" in message and "delete that name from" in message
    assert not list(out.glob("npy_*/patient_*")) and not (out / pp.SETTINGS_FILE).exists()  # nothing done
    # the user keeps the old assignment (models were trained on it) by deleting the name
    where = next(s for s in pp.SPLITS if "BraTS2021_00007_notes" in old[s])
    csv = out / "data_splits" / where / "scans.csv"
    csv.write_text("\n".join(n for n in old[where] if "notes" not in n))
    pp.preprocess(src, image_size=8, output=out, progress=False)
    assert _written_split(out) == {s: [n for n in v if "notes" not in n] for s, v in old.items()}
    assert len(list(out.glob("npy_*/patient_*"))) == 20


# ------------------------------------------------------------------------------------------------------------------
# Reruns with other settings, data that does not fit the model


def test_preprocessing_rerun_with_another_image_size_is_refused_and_changes_nothing(tmp_path):
    src = tmp_path / "raw"
    for i in range(4):
        _brats_subject(src, f"S{i}", i)
    out = tmp_path / "out"
    pp.preprocess(src, image_size=8, output=out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    record = json.loads((out / pp.SETTINGS_FILE).read_text())
    assert {k: record[k] for k in ("name", "mod", "first", "last", "image_size", "min_val_lesion_subjects",
                                   "format_version")} == dict(name="brats", mod="all", first=0, last=0, image_size=8,
                                                              min_val_lesion_subjects=0, format_version=1)
    with pytest.raises(errors.SettingsMismatchError) as exc:
        pp.preprocess(src, image_size=16, mod="flair", output=out, progress=False)
    message = str(exc.value)
    assert "--image_size 8 (now 16)" in message and "--mod 'all' (now 'flair')" in message
    assert f"delete {out} to start over" in message and "another --output" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # not a file touched
    # an output of an older version (no record) is checked by what its slices show
    (out / pp.SETTINGS_FILE).unlink()
    with pytest.raises(errors.SettingsMismatchError, match=r"holds slices of 4 channel\(s\) at 8x8 px .* 16x16 px"):
        pp.preprocess(src, image_size=16, output=out, progress=False)
    again = pp.preprocess(src, image_size=8, output=out, progress=False)  # the same settings: a resume
    assert sum(s["skipped"] for s in again["splits"].values()) == 4 and (out / pp.SETTINGS_FILE).exists()
    assert any("no preprocess_settings.json" in w for w in again["warnings"])


@pytest.mark.parametrize("flags, shown", [(["--image_size", "16", "--sample_shape", "2", "4", "16", "16"],
                                           "takes --in_channels 4 --image_size 16"),
                                          (["--in_channels", "1", "--sample_shape", "2", "1", "32", "32"],
                                           "takes --in_channels 1 --image_size 32")])
def test_training_on_data_that_does_not_fit_the_model_flags_is_refused(tmp_path, monkeypatch, capsys, flags, shown):
    data = write_npz_dataset(tmp_path / "data")
    err = _user_error(capsys, _train, tmp_path / "run", data, monkeypatch, *flags)
    assert "holds 4 channel(s) at 32x32 px" in err and shown in err and "--in_channels 4 --image_size 32" in err
    assert not fileio.list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "config.json").exists()


def test_data_of_mixed_sizes_is_refused_naming_the_odd_file(tmp_path, monkeypatch, capsys):
    """What the old preprocessing rerun with another --image_size left behind."""
    data = write_npz_dataset(tmp_path / "data")
    odd = write_npz_dataset(tmp_path / "odd", patients=1, size=16) / "npy_train" / "patient_000"
    odd.rename(data / "npy_train" / "patient_009")
    err = _user_error(capsys, _train, tmp_path / "run", data, monkeypatch)
    assert f"{data / 'npy_train' / 'patient_009'}/slice_0.npz holds 4 channel(s) at 16x16 px" in err
    # the classifier's command line checks its data the same way
    err = _user_error(capsys, classifier_cli.main, ["--data_dir", str(data), "--image_size", "32", "--in_channels",
                                                    "4", "--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "8",
                                                    "--num_workers", "0", "--batch_size", "2", "--iterations", "1"])
    assert "patient_009" in err and "16x16 px" in err


# ------------------------------------------------------------------------------------------------------------------
# Flag values, and the one mechanism


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--max_steps", "-3"], "--max_steps must be >= 0"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--num_channels", "0"], "--num_channels must be >= 1, got 0"),
    (["--num_heads", "0"], "--num_heads must be >= 1, got 0"),
    (["--attention_resolutions", "16,x"], "--attention_resolutions must be comma-separated feature-map sizes"),
    (["--channel_mult", "1,two"], "--channel_mult must be comma-separated integers"),
    (["--noise_schedule", "quadratic"], "--noise_schedule: invalid choice: 'quadratic' (choose from 'linear', 'cosine')"),
    (["--timestep_respacing", "ddimx"], "--timestep_respacing 'ddimx' with --diffusion_steps 1000: malformed"),
    (["--schedule_sampler", "fancy"], "--schedule_sampler: invalid choice: 'fancy' (choose from 'uniform', 'loss-second-moment')"),
    (["--num_classes", "-1"], "--num_classes must be >= 0, got -1"),
    (["--bottleneck_ratio", "0"], "--bottleneck_ratio must be in (0, 1]"),
])
def test_out_of_range_training_flags_name_the_flag(tmp_path, monkeypatch, capsys, extra, message):
    data = write_npz_dataset(tmp_path / "data", patients=1, slices=2)
    err = _user_error(capsys, _train, tmp_path / "run", data, monkeypatch, *extra)
    assert message in err, err
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--min_val_lesion_subjects", "-1"], "--min_val_lesion_subjects must be >= 0"),
    (["--image_size", "0"], "--image_size must be positive"),
])
def test_out_of_range_preprocessing_flags_name_the_flag(tmp_path, argv, message):
    src = tmp_path / "raw"
    _brats_subject(src, "S0", 0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pp.preprocess(src, output=tmp_path / "out", progress=False, **{
            {"--workers": "workers", "--min_val_lesion_subjects": "min_val_lesion", "--image_size": "image_size"}[
                argv[0]]: int(argv[1])})
    assert not (tmp_path / "out").exists()


def test_entry_point_reports_user_errors_once_and_lets_bugs_through(monkeypatch, capsys):
    @errors.entry_point
    def main(exc):
        raise exc

    for exc in (errors.DataError("slice file /d/s.npz is truncated; preprocess it again"),
                ValueError("--w must be a number"), FileNotFoundError(2, "No such file", "/d/x")):
        with pytest.raises(SystemExit) as info:
            main(exc)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err
        assert str(exc) in err and f"{errors.DEBUG_ENV}=1 shows where it happened" in err
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(SystemExit):
        main(errors.UserError("named cause"))
    err = capsys.readouterr().err
    assert "Traceback" in err and "named cause" in err
    with pytest.raises(TypeError):  # a bug is not a user error: its traceback is kept
        main(TypeError("unsupported operand"))
    monkeypatch.delenv(errors.DEBUG_ENV)
    with pytest.raises(SystemExit) as info:
        main(KeyboardInterrupt())
    assert info.value.code == 130 and "interrupted; finished work is kept" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        main(ValueError("bad"))
    assert "[rank 1] " in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# Through the evaluation driver: data regenerated in place, checkpoints replaced in place, damaged cache and
# hyper-parameter files, a validation split that cannot determine a hyper-parameter, data that does not fit


@pytest.fixture()
def evaluation(tmp_path, monkeypatch):
    """A tiny random v2 checkpoint (no config.json: the flags describe it) and val/test splits of 8 slices each."""
    from test_translation import _tiny_flags, _write_checkpoint, _write_dataset

    _write_dataset(tmp_path / "data")
    _write_checkpoint(tmp_path / "model", "v2")
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "logs"))
    argv = (f"--data_dir {tmp_path / 'data'} --model_dir {tmp_path / 'model'} --w 2 --forward_steps 2 --null True "
            "--batch_size 4 --num_batches -1 --batch_size_val 4 --num_batches_val -1 --modality 0 3 --num_panels 0 "
            "--progress False").split() + _tiny_flags("v2")
    return tmp_path, argv


def _translate(argv):
    from guided_diffusion.commands import evaluate

    try:
        return evaluate.main(argv)
    finally:
        logger.reset()


def _rewrite_in_place(path: Path, change) -> None:
    """New content under the same name, size and modification time (what a regenerated data set looks like)."""
    st = path.stat()
    if path.suffix == ".npz":
        with np.load(path) as z:
            arrays = {k: z[k].copy() for k in z.files}
        change(arrays)
        np.savez(path, **arrays)
    else:
        state = torch.load(path, weights_only=True)
        torch.save(change(state), path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_driver_cache_follows_content_through_faults(evaluation):
    root, argv = evaluation
    for f in (root / "data").glob("npy_*/*/slice_*.npz"):  # uncompressed, so in-place rewrites keep the size
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez(f, **arrays)
    ckpt = root / "model" / "model000010.pt"
    torch.save(dict(torch.load(ckpt, weights_only=True)), ckpt)  # saved as the replacement below will be
    first = _translate(argv)
    assert first["computed"] == {"val": 2, "test": 2}
    batches = root / "logs" / "batches"
    # a truncated cached batch and a garbage digest cache: that batch alone is recomputed, the result is the same
    cached = batches / "test_ws1_r0_b00001.npz"
    cached.write_bytes(cached.read_bytes()[:200])
    (root / "logs" / "file_digests.json").write_text("{garbage")
    again = _translate(argv)
    assert again["computed"] == {"val": 0, "test": 1} and again["reused"] == {"val": 2, "test": 1}
    assert again["metrics"]["mixed"] == first["metrics"]["mixed"]
    # a validation slice regenerated in place: validation is recomputed (its manifest changed), and the test
    # batches too exactly when the fitted hyper-parameters changed
    val_slice = sorted((root / "data" / "npy_val").glob("*/slice_*.npz"))[1]

    def brighter(arrays):
        arrays["x"][..., 4:12, 4:12] += 0.7

    _rewrite_in_place(val_slice, brighter)
    regenerated = _translate(argv)
    assert regenerated["computed"]["val"] == 2
    changed_hyper = regenerated["hyperparams"] != first["hyperparams"]
    assert regenerated["computed"]["test"] == (2 if changed_hyper else 0)
    # the checkpoint replaced in place by other weights of the same size and modification time: all recomputed
    _rewrite_in_place(ckpt, lambda sd: {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()})
    replaced = _translate(argv)
    assert replaced["computed"] == {"val": 2, "test": 2}
    assert replaced["metrics"]["mixed"] != regenerated["metrics"]["mixed"]


def test_a_validation_split_without_unhealthy_slices_says_why_and_what_to_do(evaluation, capsys):
    root, argv = evaluation
    for f in (root / "data" / "npy_val").glob("*/slice_*.npz"):  # every validation subject healthy
        with np.load(f) as z:
            np.savez_compressed(f, x=z["x"], y=np.zeros_like(z["y"]))
    err = _user_error(capsys, _translate, argv)
    assert "M_max (diff_max) cannot be estimated" in err and "every test mask would come out empty" in err
    assert f"Validation had 8 slice(s), 0 unhealthy, in 2 batch(es) from {root / 'data' / 'npy_val'}" in err
    for remedy in ("--num_batches_val -1", "--hyperparams_file", "--min_val_lesion_subjects 1"):
        assert remedy in err
    logs = root / "logs"
    assert not (logs / "hyperparams.json").exists() and not (logs / "metrics.json").exists()  # nothing taken for done
    assert len(list((logs / "batches").glob("val_*.npz"))) == 2  # the validation work is kept
    # with hyper-parameters from a file (e.g. another run's) the same folder completes, reusing nothing stale
    hp = root / "hp.json"
    hp.write_text(json.dumps({"thr_01": 0.9, "diff_max": [0.01, 0.02]}))
    out = _translate(argv + ["--num_batches_val", "0", "--hyperparams_file", str(hp)])
    assert out["computed"]["test"] == 2 and out["hyperparams"]["thr_01"] == 0.9


@pytest.mark.parametrize("content, message", [
    ("{\"thr_01\": 0.9, ", "cannot be read as JSON"),
    ("[0.9, 0.1]", "must hold a JSON object"),
    ('{"thr_01": "high", "diff_max": [0.1, 0.1]}', "thr_01 must be a number, got 'high'"),
    ('{"thr_01": 0.9, "diff_max": 0.1}', "diff_max must be a list of numbers"),
    ('{"thr_01": NaN, "diff_max": [0.1, 0.1]}', "thr_01 must be a finite number (a cosine similarity), got nan"),
    ('{"thr_01": 0.9, "diff_max": [-0.1, 0.1]}', "diff_max (M_max, the largest divergence of the unhealthy validation "
                                                 "slices) must be positive finite numbers, got [-0.1, 0.1]"),
])
def test_a_damaged_hyperparams_file_is_named(evaluation, capsys, content, message):
    root, argv = evaluation
    hp = root / "hyperparams.json"
    hp.write_text(content)
    err = _user_error(capsys, _translate, argv + ["--num_batches_val", "0", "--hyperparams_file", str(hp)])
    assert str(hp) in err and message in err, err
    assert not (root / "logs" / "batches").exists()  # refused before any forward step


def test_evaluation_data_that_does_not_fit_the_recorded_model_is_refused(evaluation, capsys):
    root, argv = evaluation
    from test_translation import TINY

    flags = dict(__import__("guided_diffusion.script_util", fromlist=["x"]).model_and_diffusion_defaults(), **TINY)
    fileio.write_run_config(root / "model", "diffusion", flags, {"ema_rate": "0.9999"})
    for f in (root / "data").glob("npy_*/*/slice_*.npz"):  # the data preprocessed at 16 px instead
        with np.load(f) as z:
            np.savez_compressed(f, x=z["x"][..., ::2, ::2], y=z["y"][..., ::2, ::2])
    model_flags = {"--image_size", "--num_channels", "--num_res_blocks", "--channel_mult", "--attention_resolutions",
                   "--in_channels", "--num_classes", "--unet_ver", "--use_hae"}
    plain = [a for i, a in enumerate(argv) if a not in model_flags and (i == 0 or argv[i - 1] not in model_flags)]
    err = _user_error(capsys, _translate, plain)  # the model from config.json
    assert "holds 4 channel(s) at 16x16 px" in err and "takes --in_channels 4 --image_size 32" in err
    assert fileio.config_path(root / "model") in err
    assert not list((root / "logs").glob("batches/*.npz"))


# ==================================================================================================================
# Third round (issue 21): the silent results, lost work and unclear errors an outside campaign found, by command.
# Each test fails on the code before the fix; tiny models and subjects, a second or two each.



@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """The segment command's tiny random model (test_segment's TINY), in a folder without config.json."""
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    folder = tmp_path_factory.mktemp("seg_model")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **SEG_TINY})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "model000010.pt")
    return folder


def _segment(argv):
    from guided_diffusion.commands import segment

    try:
        return segment.main(argv)
    finally:
        logger.reset()


def _seg_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ---- segment ---------------------------------------------------------------------------------------------------


def test_segment_a_finished_map_damaged_afterwards_is_recomputed_not_skipped(tmp_path, seg_model):
    src = tmp_path / "raw"
    for i, name in enumerate("AB"):
        _write_subject(src, name, i)
    out = tmp_path / "out"
    argv = _seg_argv(seg_model, out, src, extra=["--hyperparams_file", str(_hyper_file(tmp_path))])
    assert _segment(argv) == 0
    amap = out / "A_anomaly_map.nii.gz"
    good = amap.read_bytes()
    amap.write_bytes(good[:len(good) // 2])  # truncated after the run (a copy, a full disk elsewhere)
    assert _segment(argv) == 0
    summary = _seg_summary(out)
    assert (summary["computed"], summary["skipped"]) == (1, 1)  # A again, B reused
    assert amap.read_bytes() == good  # the same result as the first time (the method is deterministic per subject)
    assert f"its finished {amap} is changed since it was written" in (out / "log.txt").read_text()
    # a record written before digests were recorded: the file is read whole instead
    record = out / "B_segmentation.json"
    rec = json.loads(record.read_text())
    del rec["output_digests"]
    record.write_text(json.dumps(rec))
    mask = out / "B_anomaly_mask.nii.gz"
    mask.write_bytes(mask.read_bytes()[:60])
    assert _segment(argv) == 0
    assert (_seg_summary(out)["computed"], _seg_summary(out)["skipped"]) == (1, 1)
    assert nib.load(str(mask)).get_fdata().shape == (24, 16, 10)


def test_segment_rerun_with_another_w_names_the_flag_that_differs(tmp_path, seg_model, capsys):
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    argv = _seg_argv(seg_model, tmp_path / "out", src, extra=["--hyperparams_file", str(_hyper_file(tmp_path))])
    assert _segment(argv) == 0
    argv[argv.index("--w") + 1] = "3"
    err = _user_error(capsys, _segment, argv)
    assert "--w 2.0 (now 3.0)" in err and "differing: settings" not in err and "segment_run.json" in err


def test_segment_resume_false_with_a_subset_is_refused_while_the_others_results_would_stay(tmp_path, seg_model,
                                                                                           capsys):
    src = tmp_path / "raw"
    for i, name in enumerate("AB"):
        _write_subject(src, name, i)
    out = tmp_path / "out"
    hyper = ["--hyperparams_file", str(_hyper_file(tmp_path))]
    assert _segment(_seg_argv(seg_model, out, src, extra=hyper)) == 0
    before = {p.name: p.read_bytes() for p in out.glob("B_*")}
    subset = _seg_argv(seg_model, out, src / "A", extra=hyper + ["--resume", "false"])
    subset[subset.index("--w") + 1] = "3"  # the earlier error's advice: other settings, --resume false
    err = _user_error(capsys, _segment, subset)
    assert "also holds results of 1 other subject(s) (B)" in err and "--w 2.0 (now 3.0)" in err
    assert {p.name: p.read_bytes() for p in out.glob("B_*")} == before and not (out / "A_anomaly_map.nii.gz").stat().st_size == 0
    # the same settings: the other subject's results are this run's kind, nothing is mixed
    assert _segment(_seg_argv(seg_model, out, src / "A", extra=hyper + ["--resume", "false"])) == 0


def test_segment_output_in_the_input_folder_is_refused(tmp_path, seg_model, capsys):
    from guided_diffusion.commands import segment

    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    hyper = ["--hyperparams_file", str(_hyper_file(tmp_path))]
    for out in (src, src / "results"):
        err = _user_error(capsys, _segment, _seg_argv(seg_model, out, src, extra=hyper))
        assert f"--output {out} overlaps --input {src}" in err and "outside the input folders" in err
    assert sorted(p.name for p in src.iterdir()) == ["A"]  # nothing written among the scans
    settings, _ = segment.parse(_seg_argv(seg_model, tmp_path, src / "A", extra=hyper))  # --output holding it: fine
    assert settings.output == str(tmp_path)


def test_first_beyond_the_scan_names_the_flags_in_segmentation_and_preprocessing(tmp_path, seg_model):
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)  # 10 slices
    out = tmp_path / "out"
    argv = _seg_argv(seg_model, out, src, extra=["--hyperparams_file", str(_hyper_file(tmp_path)), "--first", "40"])
    assert _segment(argv) == 1
    message = _seg_summary(out)["failed"][0]["message"]
    assert "--first 40 and --last 0 drop all 10 slices" in message and "IndexError" not in message
    summary = pp.preprocess(src, image_size=8, first=40, output=tmp_path / "pre", progress=False)
    assert len(summary["errors"]) == 1 and "--first 40 and --last 0 drop all 10 slices" in summary["errors"][0]


def test_segment_skips_a_stray_nifti_in_the_input_root_with_a_warning(tmp_path, seg_model, capsys):
    src = tmp_path / "raw"
    for i, name in enumerate("AB"):
        _write_subject(src, name, i)
    (src / "notes.nii.gz").write_bytes(b"not a scan")
    out = tmp_path / "out"
    assert _segment(_seg_argv(seg_model, out, src, extra=["--hyperparams_file", str(_hyper_file(tmp_path))])) == 0
    assert (_seg_summary(out)["done"], _seg_summary(out)["subjects"]) == (2, 2)
    assert f"ignoring stray file {src / 'notes.nii.gz'}" in capsys.readouterr().err


def test_segment_model_folder_without_config_names_in_channels_not_mod(tmp_path, seg_model, capsys):
    from guided_diffusion.commands import segment

    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    argv = _seg_argv(seg_model, tmp_path / "out", src,
                     extra=["--hyperparams_file", str(_hyper_file(tmp_path)), "--mod", "flair"])
    err = _user_error(capsys, segment.main, argv)  # a one-channel (FLAIR) model, --in_channels left at 4
    assert "--in_channels 4" in err and "has no config.json" in err and "pass --in_channels 1" in err
    assert "pass the --mod" not in err


def test_segment_subjects_csv_with_semicolons_is_read_and_one_without_id_is_named(tmp_path, seg_model):
    from guided_diffusion.commands import segment
    from guided_diffusion.evaluation.volumes.subjects import collect_subjects

    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    table = tmp_path / "subjects.csv"
    table.write_text("id;flair;t1;t1ce;t2;seg\nscan1;" + ";".join(f"raw/A/A_{m}.nii.gz" for m in pp.MODALITIES)
                     + ";raw/A/A_seg.nii.gz\n")  # a spreadsheet where the comma is the decimal mark
    argv = _seg_argv(seg_model, tmp_path / "out", extra=["--hyperparams_file", str(_hyper_file(tmp_path)),
                                                         "--subjects_csv", str(table)])
    argv.remove("--input")
    settings, _ = segment.parse(argv)
    (subject,) = collect_subjects(settings.volumes, "brats")
    assert subject.name == "scan1" and subject.images["t2"] == src / "A" / "A_t2.nii.gz"
    assert subject.mask == src / "A" / "A_seg.nii.gz"
    table.write_text("name,flair\nscan1,x.nii.gz\n")
    with pytest.raises(ValueError, match="has no id column; expected a header such as id,flair,t1,t1ce,t2"):
        collect_subjects(settings.volumes, "brats")


def test_a_misregistered_modality_is_reported_on_the_console_and_in_the_log(tmp_path, seg_model, capsys):
    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    vols, _ = _subject_arrays(0)
    shifted = np.array(nib.load(str(src / "A" / "A_t2.nii.gz")).affine)
    shifted[:3, 3] += 5.0  # t2 of another session, not co-registered
    _save(src / "A" / "A_t2.nii.gz", vols["t2"], affine=shifted)
    out = tmp_path / "out"
    assert _segment(_seg_argv(seg_model, out, src, extra=["--hyperparams_file", str(_hyper_file(tmp_path))])) == 0
    said = "subject A: A_t2.nii.gz has another affine than A_flair.nii.gz (not co-registered?)"
    assert said in capsys.readouterr().out and said in (out / "log.txt").read_text()
    summary = pp.preprocess(src, image_size=8, output=tmp_path / "pre", progress=False)  # preprocessing says it too
    assert any(said in w for w in summary["warnings"]) and said in capsys.readouterr().err


def test_launcher_keeps_paths_with_spaces_whole(tmp_path):
    from test_launchers import dry_run

    def values(cmd, flag):  # the words after a flag, up to the next flag
        rest = cmd[cmd.index(flag) + 1:]
        return rest[:next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))]

    scans = tmp_path / "my scans"
    scans.mkdir()
    (cmd,), _ = dry_run("run_segment.sh", NUM_GPUS="1", INPUT=str(scans), DATA_DIR=str(tmp_path / "pre data"))
    assert values(cmd, "--input") == [str(scans)]  # one existing path, not "my" and "scans"
    assert values(cmd, "--data_dir") == [str(tmp_path / "pre data")]  # a single value is kept whole
    (cmd,), _ = dry_run("run_segment.sh", NUM_GPUS="1", INPUT=f"{scans}\nother folder\n")  # one per line
    assert values(cmd, "--input") == [str(scans), "other folder"]
    (cmd,), _ = dry_run("run_segment.sh", NUM_GPUS="1", INPUT="a b", MODALITY="0 3")  # space-separated lists
    assert values(cmd, "--input") == ["a", "b"] and values(cmd, "--modality") == ["0", "3"]


# ---- hyperparams.json (evaluate and segment) --------------------------------------------------------------------


def test_hyperparams_fitted_with_other_settings_or_another_model_are_refused_naming_them(evaluation, capsys):
    root, argv = evaluation
    fitted = _translate(argv)["hyperparams"]  # fitted at --w 2 --forward_steps 2 on root/model
    hp = root / "logs" / "hyperparams.json"
    recorded = json.loads(hp.read_text())
    assert recorded["fitted_with"]["settings"]["w"] == 2.0 and recorded["fitted_with"]["timestep_respacing"] == ""
    assert recorded["fitted_on"]["checkpoint_files"] == [str(root / "model" / "model000010.pt")]

    def reuse(*extra, out="reuse"):
        new = list(argv) + ["--num_batches_val", "0", "--hyperparams_file", str(hp), "--output", str(root / out),
                            *extra]
        for flag, value in zip(extra[::2], extra[1::2]):  # the later value of a flag wins anyway; keep argv plain
            if flag in argv:
                new[argv.index(flag) + 1] = value
        return new

    err = _user_error(capsys, _translate, reuse("--w", "6", "--forward_steps", "3"))
    assert f"--hyperparams_file {hp} was fitted with other settings than this run's" in err
    assert "--forward_steps 2 (now 3)" in err and "--w 2.0 (now 6.0)" in err and "--accept_hyperparams true" in err
    assert not (root / "reuse" / "batches").exists()  # refused before any forward step
    # on purpose: used, and the log says what differs
    out = _translate(reuse("--w", "6", "--forward_steps", "3", "--accept_hyperparams", "true", out="accepted"))
    assert out["hyperparams"]["thr_01"] == fitted["thr_01"]
    assert "used anyway (--accept_hyperparams true): --forward_steps 2 (now 3)" in (root / "accepted" / "log.txt").read_text()
    # the same settings on another model (other weights, same architecture)
    other = root / "other_model"
    other.mkdir()
    state = torch.load(root / "model" / "model000010.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, other / "model000010.pt")
    err = _user_error(capsys, _translate, reuse("--model_dir", str(other)))
    assert "the checkpoint: fitted on another model" in err
    # upstream's files (no record) still load, with a warning that they cannot be checked; no validation split needed
    (root / "data" / "npy_val").rename(root / "val_elsewhere")
    upstream = root / "upstream.json"
    upstream.write_text(json.dumps({"thr_01": 0.9, "diff_max": [0.01, 0.02]}))
    plain = list(argv) + ["--num_batches_val", "0", "--hyperparams_file", str(upstream), "--output", str(root / "up")]
    assert _translate(plain)["hyperparams"]["thr_01"] == 0.9
    assert f"--hyperparams_file {upstream} records nothing of what it was fitted with" in (root / "up" / "log.txt").read_text()


def test_segment_refuses_hyperparams_fitted_at_another_w(tmp_path, seg_model, capsys):
    from guided_diffusion.commands import segment
    from guided_diffusion.evaluation.driver import fit_provenance
    from guided_diffusion.evaluation.fingerprint import file_digest
    from guided_diffusion.methods.registry import build_method

    src = tmp_path / "raw"
    _write_subject(src, "A", 0)
    hp = _hyper_file(tmp_path)
    argv = _seg_argv(seg_model, tmp_path / "out", src, extra=["--hyperparams_file", str(hp)])
    settings, _ = segment.parse(argv)  # what an evaluation at --w 2 --forward_steps 2 records
    method = build_method(settings.inference, "cpu")
    fitted_with = fit_provenance(method, settings.inference, [file_digest(str(seg_model / "model000010.pt"))])
    hp.write_text(json.dumps({**json.loads(hp.read_text()), "fitted_with": fitted_with}))
    assert _segment(argv) == 0  # the same settings: used
    argv[argv.index("--w") + 1] = "6"
    err = _user_error(capsys, _segment, argv + ["--output", str(tmp_path / "w6")])
    assert "--w 2.0 (now 6.0)" in err and f"--hyperparams_file {hp} was fitted with other settings" in err
    assert not (tmp_path / "w6" / "A_anomaly_map.nii.gz").exists()


# ---- evaluate ---------------------------------------------------------------------------------------------------


def test_evaluation_nan_pixels_in_a_test_slice_are_named(evaluation, capsys):
    root, argv = evaluation
    bad = sorted((root / "data" / "npy_test").glob("*/slice_*.npz"))[2]
    with np.load(bad) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["x"][0, 1, 5, 5:9] = np.nan
    np.savez_compressed(bad, **arrays)
    err = _user_error(capsys, _translate, argv)
    assert f"slice file {bad} holds 4 non-finite value(s) (NaN/inf) in x" in err and f"delete {bad.parent}" in err
    assert not (root / "logs" / "metrics.json").exists()


def test_evaluation_num_batches_above_the_split_says_it_was_capped(evaluation):
    root, argv = evaluation
    argv = list(argv)
    argv[argv.index("--num_batches") + 1] = "50"
    assert _translate(argv)["computed"]["test"] == 2
    assert ("--num_batches 50 is more than the test split holds: 8 slices make 2 batch(es) of 4; all 2 are used"
            in (root / "logs" / "log.txt").read_text())


# ---- train and train-classifier ---------------------------------------------------------------------------------


def test_training_nan_pixels_name_the_slice_and_no_missing_checkpoint(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    bad = data / "npy_train" / "patient_001" / "slice_1.npz"
    with np.load(bad) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["x"][0, 0, 3, 3] = np.nan
    np.savez(bad, **arrays)
    err = _user_error(capsys, _train, tmp_path / "run", data, monkeypatch, "--batch_size", "6", steps=1)
    assert f"slice file {bad} holds 1 non-finite value(s) (NaN/inf) in x" in err and "model000000.pt" not in err
    # a loss that turns non-finite on finite data before any save: no checkpoint to resume from is named
    from guided_diffusion.training import objectives

    real = objectives.DiffusionObjective.__call__

    def diverging(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(objectives.DiffusionObjective, "__call__", diverging)
    arrays["x"][0, 0, 3, 3] = 0.5
    np.savez(bad, **arrays)
    err = _user_error(capsys, _train, tmp_path / "run2", data, monkeypatch, steps=1)
    assert "non-finite training loss at step 1" in err and "no checkpoint has been saved yet" in err
    assert "model000000.pt" not in err


def test_class_conditional_training_on_data_without_a_lesion_slice_is_refused(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    err = _user_error(capsys, _train, tmp_path / "run", data, monkeypatch, "--mixed", "false",
                      "--n_unhealthy_patients", "0")  # healthy slices only, for a class-conditional model
    assert "the 4 training slices of" in err and "hold no slice with a lesion" in err and "--num_classes 0" in err
    # preprocessed data whose summary counts no lesion slice in train; the classifier needs both classes too
    (data / pp.SUMMARY_FILE).write_text(json.dumps({"splits": {"train": {"unhealthy_slices": 0}}}))
    err = _user_error(capsys, _train, tmp_path / "run2", data, monkeypatch)
    assert "the 6 training slices of" in err and "hold no slice with a lesion" in err
    err = _user_error(capsys, classifier_cli.main, ["--data_dir", str(data), "--image_size", "32", "--in_channels",
                                                    "4", "--classifier_width", "32", "--classifier_depth", "1",
                                                    "--classifier_attention_resolutions", "8", "--num_workers", "0",
                                                    "--batch_size", "2", "--iterations", "1",
                                                    "--output", str(tmp_path / "clf")])
    assert "the noisy-image classifier learns to tell healthy from unhealthy slices" in err
    assert not fileio.list_checkpoints(tmp_path / "run2") and not fileio.list_checkpoints(tmp_path / "clf")


def test_training_batch_size_above_the_slices_says_how_batches_fill(tmp_path, monkeypatch):
    data = write_npz_dataset(tmp_path / "data")  # 6 slices
    assert _train(tmp_path / "run", data, monkeypatch, "--batch_size", "100", steps=1) == 1
    assert ("--batch_size 100 is larger than the 6 training slices: each step takes all of them once, so a batch "
            "holds 6 slices, not 100" in (tmp_path / "run" / "log.txt").read_text())


def test_a_training_folder_holding_another_runs_checkpoints_is_refused(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert _train(run, data, monkeypatch) == 2  # --lr 1e-4
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".json")}
    # a second training into the folder with another --lr: refused, the first run's files untouched
    err = _user_error(capsys, _train, run, data, monkeypatch, "--lr", "1e-3", steps=4)
    assert "--lr 0.001 (config.json: 0.0001)" in err and f"--resume_checkpoint {run / 'model000002.pt'}" in err
    err = _user_error(capsys, _train, run, data, monkeypatch, "--resume_checkpoint", "")  # a fresh start
    assert f"--output {run} holds the checkpoints of another run (up to model000002.pt)" in err
    elsewhere = tmp_path / "other"
    assert _train(elsewhere, data, monkeypatch, steps=1) == 1
    err = _user_error(capsys, _train, run, data, monkeypatch, "--resume_checkpoint", str(elsewhere / "model000001.pt"))
    assert "does not continue it: training here would overwrite them" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".json")} == kept
    # continuing that run with a lower --lr on purpose: name its checkpoint
    assert _train(run, data, monkeypatch, "--lr", "1e-5", "--resume_checkpoint", str(run / "model000002.pt"),
                  steps=3) == 3
    assert "continuing" in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["training"]["lr"] == 1e-5
    assert json.loads((run / "settings.json").read_text())["settings"]["loop"]["lr"] == 1e-5


def test_a_full_disk_at_save_leaves_no_part_of_the_failed_set(tmp_path, monkeypatch, capsys):
    data = write_npz_dataset(tmp_path / "data")
    run = tmp_path / "run"
    real_open = fileio.atomic._open

    def full_at_the_model_file(path, mode, **kwargs):  # opt, ema and state of step 2 were written before
        if "model000002.pt" in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(fileio.atomic, "_open", full_at_the_model_file)
    err = _user_error(capsys, _train, run, data, monkeypatch, steps=3)
    assert "the disk is full" in err
    assert sorted(p.name for p in run.glob("*000002.pt")) == []  # not the opt file, nor the EMA or state
    assert sorted(p.name for p in run.glob("*000001.pt")) == ["ema_0.99_000001.pt", "model000001.pt",
                                                              "opt000001.pt", "state000001.pt"]


# ---- compare ----------------------------------------------------------------------------------------------------


def _compare(*argv):
    from guided_diffusion.commands import compare

    return compare.main(list(argv))


def test_compare_from_runs_refuses_another_methods_evaluation_for_a_row(tmp_path, capsys):
    from test_comparison import SLICES, _fake_run

    fpdm = _fake_run(tmp_path / "fpdm", "anofpdm", {}, False, SLICES, [1, 1, 0, 0])
    other = _fake_run(tmp_path / "other_fpdm", "anofpdm", {}, False, SLICES, [1, 1, 0, 0])
    err = _user_error(capsys, _compare, "--output", str(tmp_path / "out"), "--from_runs", f"anofpdm={fpdm}",
                      f"ddib={other}")
    assert f"ddib={other}: {other / 'metrics.json'} is an evaluation of anofpdm, not of DDIM clf-free (DDIB)" in err
    simplex = _fake_run(tmp_path / "simplex", "anoddpm", {}, True, SLICES, [1, 1, 0, 0])
    metrics = json.loads((simplex / "metrics.json").read_text())
    (simplex / "metrics.json").write_text(json.dumps({**metrics, "settings": {"noise_type": "simplex"}}))
    err = _user_error(capsys, _compare, "--output", str(tmp_path / "out"), "--from_runs", f"anofpdm={fpdm}",
                      f"anoddpm_gaussian={simplex}")
    assert "is an evaluation of anoddpm --noise_type simplex, not of AnoDDPM (G) (anoddpm --noise_type gaussian)" in err
    assert not (tmp_path / "out" / "comparison.md").exists()


@pytest.mark.parametrize("damage", ["gone", "truncated"])
def test_compare_from_runs_with_missing_or_damaged_batches_is_one_clear_error(tmp_path, capsys, damage):
    from test_comparison import SLICES, _fake_run

    fpdm = _fake_run(tmp_path / "fpdm", "anofpdm", {}, False, SLICES, [1, 1, 0, 0])
    ddib = _fake_run(tmp_path / "ddib", "ddib", {}, True, SLICES, [1, 1, 0, 0])
    batch = ddib / "batches" / "test_ws1_r0_b00000.npz"
    if damage == "gone":
        batch.unlink()
    else:
        batch.write_bytes(batch.read_bytes()[:300])
    argv = ["--output", str(tmp_path / "out"), "--from_runs", f"anofpdm={fpdm}", f"ddib={ddib}"]
    err = _user_error(capsys, _compare, *argv)
    assert f"ddib: cannot read {batch} ({'missing' if damage == 'gone' else 'truncated or corrupt'})" in err
    assert f"Rerun the evaluation into {ddib}" in err
    if damage == "truncated":  # the script too: exit 2, as user errors (a raw traceback before)
        res = subprocess.run([sys.executable, str(REPO / "scripts" / "comparison.py"), *argv], env=_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr and str(batch) in res.stderr


# ---- an upstream class-conditional v1 folder (issue 19 item 4) -------------------------------------------------


def test_an_upstream_class_conditional_v1_folder_runs_upstreams_label_rule_and_says_so(tmp_path, monkeypatch):
    """A folder without config.json of a class-conditional v1 model (upstream's classifier-guided DM) runs with the
    label ignored, as upstream trained it, and the console and log say so; --label_only_with_uncond false uses it."""
    from test_methods_models import CLASSIFIER, V1, _save_random
    from test_translation import _write_dataset

    from guided_diffusion.script_util import classifier_defaults, create_classifier, create_model_and_diffusion
    from guided_diffusion.script_util import model_and_diffusion_defaults as defaults

    _write_dataset(tmp_path / "data")
    kw = {**defaults(), **V1, "num_classes": 2, "class_cond": True, "clf_free": False, "learn_sigma": True}
    _save_random(create_model_and_diffusion(**kw)[0], tmp_path / "guided" / "model000005.pt", scale=0.3)
    _save_random(create_classifier(**{**classifier_defaults(), **CLASSIFIER}), tmp_path / "clf" / "model000003.pt")
    flags = (f"--method clf_guided --data_dir {tmp_path / 'data'} --model_dir {tmp_path / 'guided'} --modality 0 3 "
             f"--batch_size 4 --batch_size_val 4 --num_batches 1 --num_batches_val 0 --opt_thr 0.1 --sample_steps 3 "
             f"--clf_dir {tmp_path / 'clf'} --classifier_width 32 --classifier_depth 1 "
             "--classifier_attention_resolutions 8 --ema false --num_panels 0 --progress false --image_size 32 "
             "--num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1,2 --attention_resolutions 16,8 "
             "--in_channels 4 --unet_ver v1 --num_classes 2 --clf_free false --learn_sigma true").split()
    runs = {}
    for name, extra in (("upstream", []), ("label", ["--label_only_with_uncond", "false"]),
                        ("explicit", ["--label_only_with_uncond", "true"])):
        runs[name] = _translate(flags + ["--output", str(tmp_path / name)] + extra)
    said = f"{tmp_path / 'guided'} has no config.json: its class-conditional v1 model runs upstream's label rule"
    assert said in (tmp_path / "upstream" / "log.txt").read_text()
    assert said not in (tmp_path / "label" / "log.txt").read_text()
    settings = {k: v["metrics"]["settings"]["label_only_with_uncond"] for k, v in runs.items()}
    assert settings == {"upstream": True, "label": False, "explicit": True}
    maps = {}
    for name in runs:
        with np.load(tmp_path / name / "batches" / "test_ws1_r0_b00000.npz") as z:
            maps[name] = z["anomaly_map_0"]
    np.testing.assert_array_equal(maps["upstream"], maps["explicit"])  # upstream's rule: the label is ignored
    assert not np.array_equal(maps["upstream"], maps["label"])  # with the label: another function
