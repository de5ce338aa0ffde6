"""The baselines' training command lines on tiny on-disk data: the noisy-image classifier
(scripts/train_classifier.py), AnoDDPM (unconditional v1 on healthy slices, simplex noise) and the plain
class-conditional v1 that a classifier guides (scripts/train.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from guided_diffusion import logger
from guided_diffusion.commands import train as train_cli
from guided_diffusion.commands import train_classifier as classifier_cli
from test_train import TINY_FLAGS, write_npz_dataset

CLF_FLAGS = ["--image_size", "32", "--in_channels", "4", "--classifier_width", "32", "--classifier_depth", "1",
             "--classifier_attention_resolutions", "8", "--num_workers", "0", "--log_interval", "1"]


@pytest.fixture
def data(tmp_path):
    root = write_npz_dataset(tmp_path / "data")  # 2 patients x 3 slices, odd slices unhealthy
    shutil.copytree(root / "npy_train", root / "npy_val")
    return root


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path / "run"
    logger.reset()


def csv_rows(path):
    rows = [r.split(",") for r in path.read_text().splitlines()]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def test_train_classifier_end_to_end_with_validation_and_auto_resume(data, run_dir):
    argv = ["--data_dir", str(data), "--batch_size", "2", "--save_interval", "2", "--eval_interval", "1",
            "--val_batches", "2", *CLF_FLAGS]
    assert classifier_cli.main(argv + ["--iterations", "2"]) == 2
    assert classifier_cli.main(argv + ["--iterations", "3", "--resume_checkpoint", "auto"]) == 3
    for step in ("000002", "000003"):
        for prefix in ("model", "opt", "state"):
            assert (run_dir / f"{prefix}{step}.pt").exists(), f"{prefix}{step}.pt"
    assert not list(run_dir.glob("ema_*"))
    state = torch.load(run_dir / "state000003.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 3)  # 6 slices = 3 batches: epoch 0 used up
    rows = csv_rows(run_dir / "progress.csv")
    assert len(rows) == 3 and [r["step"] for r in rows] == ["1", "2", "3"]
    for row in rows:
        assert 0 <= float(row["acc"]) <= 1 and float(row["loss"]) > 0 and float(row["val_loss"]) > 0
        assert float(row["val_acc"]) * 4 == round(float(row["val_acc"]) * 4)  # 2 val batches of 2 slices
    log = (run_dir / "log.txt").read_text()
    assert "resuming from" in log and "M parameters" in log
    assert (run_dir / "images" / "real_brats_clf_train.png").exists()
    # the checkpoint is a plain state_dict of the classifier the flags describe
    from guided_diffusion.script_util import classifier_and_diffusion_defaults, create_classifier_and_diffusion

    flags = dict(classifier_and_diffusion_defaults(), image_size=32, in_channels=4, classifier_width=32,
                 classifier_depth=1, classifier_attention_resolutions="8")
    model, _ = create_classifier_and_diffusion(**flags)
    model.load_state_dict(torch.load(run_dir / "model000003.pt", weights_only=True))


def cli_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classifier_use_fp16", "True", "--precision", "bf16"], "--classifier_use_fp16 true asks for fp16 but --precision is bf16"),
        (["--out_channels", "1"], "out_channels (number of classes) >= 2"),
        (["--mixed", "False"], "the classifier needs both classes: --mixed true"),
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--noised", "False", "--schedule_sampler", "loss-second-moment"], "--noised false trains on clean inputs"),
        (["--unet_ver", "v2"], "--unet_ver: invalid choice: 'v2' (choose from 'v1')"),
        (["--image_size", "48"], "image_size 48 is not one of"),
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ],
)
def test_classifier_bad_flags_give_clear_errors(capsys, data, extra, message):
    argv = ["--data_dir", str(data), *CLF_FLAGS, *extra]
    assert message in cli_error(capsys, classifier_cli.main, argv)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--noise_type", "foo"], "--noise_type: invalid choice: 'foo' (choose from 'gaussian', 'simplex')"),
        (["--unet_ver", "v1", "--clf_free", "False", "--threshold", "0.1"],
         "--clf_free false trains a plain class-conditional model"),
        (["--clf_free", "False"], "--clf_free false (a plain class-conditional model, the classifier-guided DM) exists "
                                  "for --unet_ver v1 only"),
        (["--num_classes", "0", "--threshold", "0.2"], "--num_classes 0 trains an unconditional model"),
        (["--use_fp16", "True", "--precision", "bf16"], "--use_fp16 true asks for fp16"),
    ],
)
def test_diffusion_baseline_bad_flags_give_clear_errors(capsys, tmp_path, extra, message):
    argv = ["--data_dir", str(tmp_path), "--in_channels", "4", "--image_size", "32", *extra]
    assert message in cli_error(capsys, train_cli.main, argv)


def test_threshold_defaults_follow_the_kind_of_model(tmp_path):
    cases = [([], 0.1), (["--unet_ver", "v1", "--clf_free", "False"], -1.0), (["--num_classes", "0"], -1.0),
             (["--threshold", "0.3"], 0.3)]
    for extra, expected in cases:
        settings, _ = train_cli.parse(["--data_dir", str(tmp_path), "--in_channels", "4", "--image_size", "32",
                                       *extra])
        assert settings.label_drop == expected, extra


def test_anoddpm_healthy_only_v1_with_simplex_noise(tmp_path, run_dir):
    data = write_npz_dataset(tmp_path / "data")  # slices 0 and 2 of each patient are healthy: 4 of 6
    argv = ["--data_dir", str(data), "--unet_ver", "v1", "--in_channels", "4", "--num_classes", "0",
            "--class_cond", "False", "--ret_lab", "False", "--mixed", "False", "--n_unhealthy_patients", "0",
            "--learn_sigma", "False", "--noise_type", "simplex", "--ddpm_sampling", "True", "--batch_size", "1",
            "--max_steps", "5", *TINY_FLAGS]
    assert train_cli.main(argv) == 5
    state = torch.load(run_dir / "state000005.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)  # 4 healthy slices per epoch: 5 = 4 + 1
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "000002.png", "000004.png", "000005.png", "real_brats_train.png"]  # unconditional: no guidance weight
    rows = csv_rows(run_dir / "progress.csv")
    assert len(rows) == 5 and all(float(r["loss"]) > 0 for r in rows)
    assert "vb" not in rows[0]
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    flags = dict(model_and_diffusion_defaults(), unet_ver="v1", in_channels=4, num_classes=0, class_cond=False,
                 image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8",
                 channel_mult="1,1,1,2")
    model, _ = create_model_and_diffusion(**flags)
    model.load_state_dict(torch.load(run_dir / "ema_0.9999_000005.pt", weights_only=True))
    assert getattr(model, "label_emb", None) is None


def test_plain_class_conditional_v1_uses_the_label(tmp_path, run_dir):
    data = write_npz_dataset(tmp_path / "data")
    argv = ["--data_dir", str(data), "--unet_ver", "v1", "--in_channels", "4", "--num_classes", "2",
            "--clf_free", "False", "--learn_sigma", "True", "--batch_size", "2", "--max_steps", "3",
            "--lr", "1e-3", *TINY_FLAGS, "--save_interval", "1"]  # the last --save_interval wins
    assert train_cli.main(argv) == 3
    # zero-initialised output convs: the label's path first gets a gradient at step 3
    second = torch.load(run_dir / "model000002.pt", weights_only=True)
    third = torch.load(run_dir / "model000003.pt", weights_only=True)
    assert "label_emb.weight" in third
    assert not torch.equal(second["label_emb.weight"], third["label_emb.weight"])  # the label is used
    rows = csv_rows(run_dir / "progress.csv")
    assert "vb" in rows[0] and "mse" in rows[0]  # learn_sigma: MSE + VB
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "000001.png", "000002.png", "000003.png", "real_brats_train.png"]  # plain conditional: no guidance weight
    import json

    assert json.loads((run_dir / "config.json").read_text())["training"]["threshold"] == -1.0  # no label drop
