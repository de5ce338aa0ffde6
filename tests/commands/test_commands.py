"""The `anofpdm` command: subcommands, --help that lists only what a command uses with one line each, booleans
spelled every usual way, upstream's flag names, and the installed entry point."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from guided_diffusion import commands
from guided_diffusion.commands import compare, evaluate, preprocess, quickstart, segment, synth, train, train_classifier
from guided_diffusion.flags import parse_bool
from guided_diffusion.methods.registry import METHODS

REPO = Path(__file__).resolve().parents[2]


def _parsers():
    yield "train", train.create_parser()
    yield "train-classifier", train_classifier.create_parser()
    for method in METHODS:
        yield f"evaluate --method {method}", evaluate.create_parser(method)
        yield f"segment --method {method}", segment.create_parser(method)
    yield "preprocess", preprocess.create_parser()
    yield "synth", synth.create_parser()
    yield "compare", compare.create_parser()
    yield "quickstart", quickstart.create_parser()


def _shown(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and a.option_strings]


@pytest.mark.parametrize("name, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_listed_flag_has_a_one_line_help(name, parser):
    for action in _shown(parser):
        assert action.help and action.help.strip(), (name, action.option_strings)
        assert "\n" not in action.help, (name, action.option_strings)


def test_help_lists_only_the_chosen_methods_flags():
    def flags(method):
        return {a.dest for a in _shown(evaluate.create_parser(method))}

    anofpdm, clf = flags("anofpdm"), flags("clf_guided")
    assert {"classifier_scale", "clf_dir", "classifier_width"} <= clf and not {"classifier_scale", "clf_dir",
                                                                               "classifier_width"} & anofpdm
    assert {"forward_steps", "t_e_ratio", "quantile_a"} <= anofpdm and not {"forward_steps", "t_e_ratio"} & clf
    assert "noise_type" in flags("anoddpm") and "noise_type" not in anofpdm
    assert "legacy_ddib" in flags("ddib") and "sample_steps" not in anofpdm
    # upstream's flags that do nothing here are accepted, not listed
    parser = evaluate.create_parser("anofpdm")
    args = parser.parse_args(["--dynamic_clip", "False", "--threshold", "-1", "--use_fp16", "False"])
    assert args.dynamic_clip is False and "dynamic_clip" not in {a.dest for a in _shown(parser)}
    # a flag of another method is an error, not silently ignored
    with pytest.raises(SystemExit):
        parser.parse_args(["--classifier_scale", "100"])


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False),
                                         ("False", False), ("0", False), ("NO", False)])
def test_booleans_take_every_usual_spelling(text, value):
    assert parse_bool(text) is value
    assert evaluate.create_parser().parse_args(["--ema", text]).ema is value


def test_a_bad_boolean_names_the_flag_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.create_parser().parse_args(["--ema", "maybe"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --ema: expected a boolean (true/false, 1/0), got 'maybe'" in err
    assert "usage:" not in err and len(err.strip().splitlines()) == 2  # the message and where the flags are listed


def test_the_subcommands_and_the_overview(capsys):
    assert commands.main([]) == 0
    overview = capsys.readouterr().out
    for name in commands.COMMANDS:
        assert name in overview
    assert commands.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        commands.main(["evaluate", "--help"])
    assert exc.value.code == 0 and "usage: anofpdm evaluate" in capsys.readouterr().out


def test_python_dash_m_and_the_declared_console_command():
    proc = subprocess.run([sys.executable, "-m", "guided_diffusion", "presets"], capture_output=True, text=True,
                          cwd="/", env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0 and "quickstart" in proc.stdout
    text = (REPO / "pyproject.toml").read_text()
    assert 'anofpdm = "guided_diffusion.commands:main"' in text


def test_shape_flags_come_from_the_data(tmp_path):
    from test_train import write_npz_dataset

    data = write_npz_dataset(tmp_path / "data")  # 4 channels, 32 px
    settings, _ = train.parse(["--data_dir", str(data)])
    assert (settings.model.in_channels, settings.model.image_size) == (4, 32)
    assert settings.sample_shape == [12, 4, 32, 32]
    given, _ = train.parse(["--data_dir", str(data), "--image_size", "64", "--sample_shape", "2", "4", "64", "64"])
    assert given.model.image_size == 64  # an explicit flag wins


def test_relative_output_is_the_callers_folder(tmp_path, monkeypatch):
    from test_train import write_npz_dataset

    data = write_npz_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    settings, _ = train.parse(["--data_dir", "data", "--output", "model"])
    assert settings.output == str(tmp_path / "model") and settings.data.data_dir == "data"
    assert train.parse(["--data_dir", str(data)])[0].output == str(tmp_path / "runs" / "train_v2")
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "upstream"))  # upstream's variable still works
    assert train.parse(["--data_dir", str(data)])[0].output == str(tmp_path / "upstream")
