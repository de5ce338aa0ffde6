"""Readable runs: the one progress bar (plain lines in a redirected log, tqdm on a terminal) and the training
commands' --tensorboard flag (TensorBoard event files in <output>/tb)."""

from __future__ import annotations

import csv
import importlib.util
import io
import re

import pytest

from guided_diffusion import logger
from guided_diffusion.commands import train as train_command
from guided_diffusion.training.settings import LoopSettings

from test_train import TINY_FLAGS, write_npz_dataset


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_redirected_log_prints_plain_lines():
    stream = io.StringIO()  # not a terminal, like a log file
    bar = logger.progress_bar(4, "test batches", stream=stream, interval=0)
    for _ in range(4):
        bar.set_postfix(loss="0.5")
        bar.update()
    bar.close()
    bar.close()  # a second close adds nothing
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 5  # one per update (interval 0) and the last one
    for i, line in enumerate(lines[:4], start=1):
        assert line.startswith(f"test batches: {i}/4 ({25 * i} %), ")
        assert line.endswith("[loss=0.5]")
    assert "left" in lines[0] and "left" not in lines[3]  # no time left once done
    assert re.fullmatch(r"test batches: 4/4, \d+ s \[loss=0\.5\]", lines[4])


def test_progress_bar_lines_are_throttled_and_reset_restarts_the_count():
    stream = io.StringIO()
    bar = logger.progress_bar(None, "steps", stream=stream, interval=3600)
    for _ in range(50):
        bar.update()
    assert stream.getvalue() == ""  # within the interval nothing is printed
    bar.reset(total=3)
    bar.set_description("val batch 0 steps")
    bar.update(2)
    bar.close()
    assert re.fullmatch(r"val batch 0 steps: 2/3, \d+ s\n", stream.getvalue())


@pytest.mark.parametrize("kwargs", [dict(leave=False), dict(enabled=False)])
def test_transient_and_disabled_bars_print_nothing_in_a_log(kwargs):
    stream = io.StringIO()
    bar = logger.progress_bar(3, "steps", stream=stream, interval=0, **kwargs)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == ""


def test_progress_bar_on_a_terminal_is_tqdm():
    from tqdm import tqdm

    stream = Terminal()
    bar = logger.progress_bar(2, "subjects", stream=stream)
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "subjects" in stream.getvalue()
    assert not isinstance(logger.progress_bar(2, "subjects", stream=Terminal(), enabled=False), tqdm)


def _tiny_training(tmp_path, monkeypatch, *extra):
    data = write_npz_dataset(tmp_path / "data")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OPENAI_LOGDIR", "OPENAI_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--data_dir", str(data), "--output", str(tmp_path / "run"), "--unet_ver", "v2", "--batch_size", "2",
            "--max_steps", "2", *TINY_FLAGS, *extra]
    try:
        assert train_command.main(argv) == 2
    finally:
        logger.reset()
    return tmp_path / "run"


def test_training_in_a_redirected_log_has_no_bar_escape_codes(tmp_path, monkeypatch, capfd):
    run = _tiny_training(tmp_path, monkeypatch, "--preview_steps", "0")
    err = capfd.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert re.search(r"^train brats: 2/\d+, ", err, re.M)  # the bar's last line, plain
    assert not (run / "tb").exists()  # TensorBoard only when asked


def test_tensorboard_flag_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else object())
    with pytest.raises(ValueError, match=r"--tensorboard true needs the tensorboard package.*pip install"):
        LoopSettings(tensorboard=True)
    LoopSettings(tensorboard=False)  # off by default, and off needs nothing


def test_tensorboard_flag_writes_the_logged_losses(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _tiny_training(tmp_path, monkeypatch, "--preview_steps", "0", "--tensorboard", "true")
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    with open(run / "progress.csv", newline="") as f:  # the same values, as the csv output wrote them
        expected = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}
    assert logged.keys() == expected.keys() == {1, 2}
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-6)
