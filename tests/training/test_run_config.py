"""config.json: written by training, checked on resume, and what consumers build their model from; the alias scripts;
auto-resume past a truncated checkpoint; leftovers swept at start; the thread policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion import fileio, logger, runtime, script_util
from guided_diffusion.commands import evaluate
from guided_diffusion.commands import train as train_command
from guided_diffusion.script_util import model_and_diffusion_defaults
from test_train import TINY_FLAGS, write_npz_dataset
from test_translation import _write_dataset as write_eval_dataset

REPO = Path(__file__).resolve().parents[2]




def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def train(run: Path, data: Path, monkeypatch, *extra: str, unet_ver=None, max_steps: int = 2) -> int:
    monkeypatch.setenv("OPENAI_LOGDIR", str(run))
    argv = ["--data_dir", str(data), "--in_channels", "4", "--batch_size", "2", "--ema_rate", "0.99",
            "--max_steps", str(max_steps), *TINY_FLAGS, "--save_interval", "1", "--preview_steps", "0", *extra]
    try:
        return train_command.main(argv, unet_ver=unet_ver)
    finally:
        logger.reset()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny v2 model trained for 2 steps (checkpoints at steps 1 and 2) on a data set with all three splits."""
    root = tmp_path_factory.mktemp("run_config")
    data = write_npz_dataset(root / "data")
    write_eval_dataset(root / "data")
    run = root / "run"
    mp = pytest.MonkeyPatch()
    try:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(var, raising=False)
        assert train(run, data, mp, "--unet_ver", "v2") == 2
    finally:
        mp.undo()
    return root


def test_training_writes_config_json(trained):
    record = json.loads((trained / "run" / "config.json").read_text())
    assert record["format"] == "guided_diffusion run config" and record["format_version"] == 1
    assert record["kind"] == "diffusion"
    assert set(record["flags"]) == set(model_and_diffusion_defaults())  # every flag, found generically
    flags = record["flags"]
    assert (flags["image_size"], flags["num_channels"], flags["channel_mult"], flags["in_channels"]) == (32, 32, "1,1,1,2", 4)
    assert flags["unet_ver"] == "v2" and flags["class_cond"] is True and flags["attention_resolutions"] == "16,8"
    assert record["training"]["ema_rate"] == "0.99"
    # the checkpoints stay plain state_dicts
    sd = torch.load(trained / "run" / "ema_0.99_000002.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_translation_needs_only_model_dir_data_and_method_flags(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "fpdm"))
    argv = (f"--data_dir {trained / 'data'} --model_dir {trained / 'run'} --ema True --w 2 --forward_steps 2 "
            "--null True --batch_size 4 --num_batches 1 --batch_size_val 4 --num_batches_val 1 --modality 0 3 "
            "--num_panels 0 --progress False").split()
    summary = evaluate.main(argv)  # without config.json this would build a 64 px, 128-channel model
    assert summary["computed"] == {"val": 1, "test": 1}
    metrics = json.loads((tmp_path / "fpdm" / "metrics.json").read_text())
    assert metrics["checkpoint"].endswith("ema_0.99_000002.pt")  # the EMA rate recorded by training
    # a runtime flag (the forward grid) may differ from the recorded one
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "fpdm_respaced"))
    out = evaluate.main(argv + ["--timestep_respacing", "ddim10", "--model_num", "1"])
    assert out["computed"]["test"] == 1


def test_an_explicit_contradicting_flag_is_a_clear_error(trained, capsys):
    argv = (f"--data_dir {trained / 'data'} --model_dir {trained / 'run'} --w 2 --forward_steps 2 "
            "--num_channels 64 --attention_resolutions 16,8").split()
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--num_channels 64 (config.json: 32)" in err and str(trained / "run" / "config.json") in err
    assert "attention_resolutions" not in err and "usage:" not in err  # the same value as recorded: no complaint
    # the alias script's variant is as explicit as a flag
    with pytest.raises(SystemExit):
        evaluate.main(argv[:-4], unet_ver="hae_v2_conservative")
    assert "--unet_ver 'hae_v2_conservative' (config.json: 'v2')" in capsys.readouterr().err


def test_resolve_model_and_load_model_from_dir(trained):
    from guided_diffusion.architecture import ModelSettings
    from guided_diffusion.flags import build, explicit_flags
    from guided_diffusion.loading import CheckpointSettings, resolve_model

    parser = evaluate.create_parser()
    argv = ["--model_dir", str(trained / "run"), "--image_size", "32"]
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    assert given == {"model_dir", "image_size"}
    assert args.num_channels == 128 and args.ema_rate == ""  # parser defaults ...
    source = resolve_model(build(CheckpointSettings, args), build(ModelSettings, args), given)
    m = source.model  # ... replaced by config.json's
    assert (m.num_channels, m.channel_mult, source.checkpoint.ema_rate) == (32, "1,1,1,2", "0.99")
    assert source.config_file == str(trained / "run" / "config.json")
    # equivalent spellings are no contradiction
    args = parser.parse_args(["--model_dir", str(trained / "run"), "--attention_resolutions", "8, 16"])
    resolve_model(build(CheckpointSettings, args), build(ModelSettings, args), {"attention_resolutions"})
    model, diffusion, path = script_util.load_model_from_dir(str(trained / "run"), ema=True, model_num=1)
    assert path.endswith("ema_0.99_000001.pt") and not model.training
    assert model.image_size == 32 and diffusion.num_timesteps == 1000
    sd = torch.load(path, weights_only=True)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(fileio.RunConfigError, match="no config.json"):
        script_util.load_model_from_dir(str(trained / "data"))


def test_config_conflicts_compare_meaning_not_spelling():
    recorded = dict(model_and_diffusion_defaults(), image_size=128, channel_mult="", attention_resolutions="32,16,8",
                    num_channels=128, dropout=0.1, use_hae=False)
    same = {"channel_mult": "1,1,2,3,4",  # the default for 128 px, spelled out
            "attention_resolutions": "8,16, 32", "num_channels": 128.0,
            "dropout": 0.0, "timestep_respacing": "ddim100", "use_checkpoint": True}  # run-time flags may differ
    assert script_util.config_conflicts(recorded, same) == []
    assert script_util.config_conflicts(recorded, {"channel_mult": "1,2,2,2", "use_hae": True, "image_size": 128}) == [
        "--channel_mult '1,2,2,2' (config.json: '')", "--use_hae True (config.json: False)"]


def test_resume_checks_config_json(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(trained / "run"):
        if name.endswith((".pt", ".json")):
            (run / name).write_bytes((trained / "run" / name).read_bytes())
    with pytest.raises(SystemExit) as exc:
        train(run, trained / "data", monkeypatch, "--unet_ver", "v2", "--num_channels", "64",
              "--resume_checkpoint", "auto", max_steps=3)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--num_channels 64 (config.json: 32)" in err and "another --output" in err
    # runtime flags may change on resume (activation checkpointing here)
    assert train(run, trained / "data", monkeypatch, "--unet_ver", "v2", "--use_checkpoint", "True",
                 "--resume_checkpoint", "auto", max_steps=3) == 3


def test_auto_resume_skips_a_truncated_newest_checkpoint(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(trained / "run"):
        if name.endswith((".pt", ".json")):
            (run / name).write_bytes((trained / "run" / name).read_bytes())
    newest = run / "model000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a copy interrupted by a full disk
    partial = run / f".opt000003.pt.partial-{dead_pid()}-0badf00d"
    partial.write_bytes(b"PK")  # a save killed mid-write
    assert train(run, trained / "data", monkeypatch, "--unet_ver", "v2", "--resume_checkpoint", "auto",
                 max_steps=3) == 3
    log = (run / "log.txt").read_text()
    assert "skipped unreadable checkpoint(s)" in log and "model000002.pt (is truncated" in log
    assert f"resuming from {run / 'model000001.pt'} (step 1)" in log
    assert not partial.exists() and "removed 1 partial file(s)" in log
    assert fileio.checkpoint_problem(run / "model000003.pt") is None


def test_alias_script_trains_the_variant_with_its_hae_blocks(trained, tmp_path, monkeypatch):
    run = tmp_path / "alias"
    # as scripts/train_hae_v2_conservative.py --data_dir D (no --use_hae): HAE blocks included
    assert train(run, trained / "data", monkeypatch, unet_ver="hae_v2_conservative", max_steps=1) == 1
    flags = json.loads((run / "config.json").read_text())["flags"]
    assert flags["unet_ver"] == "hae_v2_conservative" and flags["use_hae"] is True
    keys = set(torch.load(run / "model000001.pt", weights_only=True))
    plain = dict(model_and_diffusion_defaults(), **{k: flags[k] for k in ("image_size", "num_channels", "num_res_blocks",
                 "attention_resolutions", "channel_mult", "in_channels", "class_cond", "unet_ver")}, use_hae=False)
    without_hae = set(script_util.create_model_and_diffusion(**plain)[0].state_dict())
    assert len(keys - without_hae) > 50  # the HAE blocks' weights (conv and transformer branches)
    text = (REPO / "scripts" / "train_hae_v2_conservative.py").read_text()
    assert 'unet_ver="hae_v2_conservative"' in text


def test_translation_sweeps_leftovers_at_start(trained, tmp_path, monkeypatch):
    out = tmp_path / "fpdm"
    (out / "batches").mkdir(parents=True)
    pid = dead_pid()
    stale = [out / f".metrics.json.partial-{pid}-00c0ffee", out / "batches" / f".test_ws1_r0_b00000.npz.partial-{pid}-00000001"]
    for p in stale:
        p.write_bytes(b"half")
    monkeypatch.setenv("OPENAI_LOGDIR", str(out))
    evaluate.main((f"--data_dir {trained / 'data'} --model_dir {trained / 'run'} --w 2 --forward_steps 1 "
                      "--batch_size 4 --num_batches 1 --batch_size_val 4 --num_batches_val 1 --num_panels 0 "
                      "--progress False").split())
    assert not any(p.exists() for p in stale)
    assert "removed 1 partial file(s)" in (out / "log.txt").read_text()


# -- threads --------------------------------------------------------------------------------------------------


def test_free_cores_rule():
    assert runtime.free_cores(cores=2, load=6.2) == 1  # a busy shared machine: never below one
    assert runtime.free_cores(cores=16, load=3.4) == 13
    assert runtime.free_cores(cores=16, load=3.6) == 12
    assert runtime.free_cores(cores=8, load=0.0) == 8


def _python(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    full.update(env, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_wait_policy_is_passive_before_torch_loads_and_the_user_wins():
    code = ("import guided_diffusion, os, torch; from guided_diffusion import runtime; "
            "n = runtime.configure_threads(); print(os.environ['OMP_WAIT_POLICY'], n, runtime.free_cores())")
    policy, threads, free = _python(code).split()
    assert policy == "PASSIVE" and threads == free
    policy, threads, _ = _python(code, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1").split()
    assert (policy, threads) == ("ACTIVE", "1")


def test_classifier_training_records_its_kind_and_loads_from_it(trained, tmp_path, monkeypatch, capsys):
    from guided_diffusion.script_util import classifier_and_diffusion_defaults
    from guided_diffusion.commands import train_classifier as classifier_cli

    run = tmp_path / "clf"
    monkeypatch.setenv("OPENAI_LOGDIR", str(run))
    argv = ["--data_dir", str(trained / "data"), "--image_size", "32", "--in_channels", "4", "--classifier_width",
            "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "8", "--num_workers", "0",
            "--batch_size", "2", "--save_interval", "1", "--eval_interval", "0"]
    try:
        assert classifier_cli.main(argv + ["--iterations", "1"]) == 1
        record = json.loads((run / "config.json").read_text())
        assert record["kind"] == "classifier" and set(record["flags"]) == set(classifier_and_diffusion_defaults())
        assert record["flags"]["classifier_width"] == 32
        model, _, path = script_util.load_model_from_dir(str(run), kind="classifier")
        assert path.endswith("model000001.pt") and model.out_channels == 2
        # the diffusion consumers refuse it clearly, and so does a resume with another width
        with pytest.raises(fileio.RunConfigError, match="describes a 'classifier' model"):
            script_util.load_model_from_dir(str(run))
        with pytest.raises(SystemExit):
            classifier_cli.main(argv + ["--iterations", "2", "--classifier_width", "64", "--resume_checkpoint", "auto"])
        assert "--classifier_width 64 (config.json: 32)" in capsys.readouterr().err
    finally:
        logger.reset()
