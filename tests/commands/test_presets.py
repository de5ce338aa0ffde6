"""The presets (guided_diffusion/presets.py): upstream's and the paper's settings as the commands build them, explicit
flags over presets, the training folders where evaluation looks, and no preset value that no command knows."""

from __future__ import annotations

import pytest

from guided_diffusion import presets
from guided_diffusion.commands import evaluate, segment, train, train_classifier
from test_train import write_npz_dataset

PARSERS = {"train": lambda method: train.create_parser(), "train-classifier": lambda method: train_classifier.create_parser(),
           "evaluate": lambda method: evaluate.create_parser(method), "segment": lambda method: segment.create_parser(method)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_npz_dataset(tmp_path_factory.mktemp("presets") / "data")  # 4-channel 32-px slices


def _train(preset, data, *extra, world=1):
    return train.parse(["--preset", preset, "--data_dir", str(data), *extra], world=world)[0]


def test_every_preset_value_is_a_flag_of_a_command_that_takes_it():
    for name, preset in presets.PRESETS.items():
        for command in preset.by_command:
            parser = PARSERS[command](preset.by_command[command].get("method", "anofpdm"))
            dests = {a.dest for a in parser._actions}
            unknown = set(preset.by_command[command]) - dests
            assert not unknown, (name, command, unknown)
        shared = set(preset.values)
        taken = set()
        for command in PARSERS:
            parser = PARSERS[command](preset.by_command.get(command, {}).get("method", "anofpdm"))
            taken |= {a.dest for a in parser._actions}
        assert shared <= taken, (name, shared - taken)


@pytest.mark.parametrize("dataset, channels", [("brats", 4)])
def test_anoddpm_training_preset_is_upstreams(dataset, channels, data):
    # upstream config/run_train_brats_anoddpm.sh: unconditional v1 on healthy slices, simplex noise, batch 64
    s = _train(f"{dataset}-anoddpm-simplex", data)
    m = s.model
    assert (m.unet_ver, m.num_classes, m.class_cond, m.learn_sigma) == ("v1", 0, False, False)
    assert (m.image_size, m.num_channels, m.attention_resolutions, m.dropout) == (128, 128, "32,16,8", 0.0)
    assert (m.diffusion_steps, m.noise_schedule, m.in_channels) == (1000, "linear", channels)
    assert (s.data.ret_lab, s.data.mixed, s.data.n_unhealthy_patients) == (False, False, 0)
    assert (s.training.noise_type, s.training.total_epochs, s.loop.save_interval) == ("simplex", 1000, 5000)
    assert s.training.ddpm_sampling is True and s.label_drop == -1.0  # no label drop
    assert s.loop.batch_size == 64 and _train(f"{dataset}-anoddpm-simplex", data, world=2).loop.batch_size == 128
    assert _train(f"{dataset}-anoddpm-gaussian", data).training.noise_type == "gaussian"


def test_anofpdm_training_presets(data):
    s = _train("brats-anofpdm-hae_v2_conservative", data)
    assert (s.model.unet_ver, s.model.use_hae, s.model.class_cond, s.model.clf_free) == ("hae_v2_conservative", True,
                                                                                         True, True)
    assert s.label_drop == 0.1 and s.model.dropout == 0.1 and s.training.total_epochs == 200
    assert s.loop.batch_size == 64 and _train("brats-anofpdm-v2", data).loop.batch_size == 48
    assert s.training.w == [1.0, 1.8, 2.0, 3.0] and s.sample_shape == [12, 4, 128, 128]
    assert _train("atlas-anofpdm-v2", data).training.total_epochs == 1000
    # an explicit flag overrides the preset
    assert _train("brats-anofpdm-v2", data, "--batch_size", "8", "--total_epochs", "3").loop.batch_size == 8


def test_classifier_presets(data):
    s = train_classifier.parse(["--preset", "brats-clf_guided", "--data_dir", str(data)])[0]
    c = s.classifier
    assert (c.classifier_width, c.classifier_depth, c.classifier_attention_resolutions) == (128, 2, "32,16,8")
    assert (c.classifier_pool, c.classifier_resblock_updown, c.classifier_use_scale_shift_norm) == ("attention", True,
                                                                                                    True)
    assert (c.image_size, c.out_channels, s.loop.batch_size, s.training.iterations) == (128, 2, 64, 250000)
    assert s.loop.save_interval == 10000
    dm = _train("atlas-clf_guided", data)
    assert (dm.model.unet_ver, dm.model.clf_free, dm.model.learn_sigma, dm.loop.batch_size) == ("v1", False, True, 64)
    assert dm.label_drop == -1.0


def test_evaluation_presets_are_the_papers():
    fpdm = presets.values_for("brats-anofpdm-v2", "evaluate")
    assert (fpdm["w"], fpdm["forward_steps"], fpdm["d_reverse"], fpdm["modality"]) == (2.0, 600, True, [0, 3])
    assert (fpdm["test_slices"], fpdm["val_slices"]) == (10000, 1000)
    assert presets.values_for("atlas-anofpdm-v2", "evaluate")["w"] == 30.0
    assert presets.values_for("atlas-anofpdm-v2", "evaluate")["modality"] == [0]
    anoddpm = presets.values_for("brats-anoddpm-simplex", "evaluate")
    assert (anoddpm["sample_steps"], anoddpm["use_ddpm"], anoddpm["noise_type"]) == (200, True, "simplex")
    clf = presets.values_for("atlas-clf_guided", "evaluate")
    assert (clf["sample_steps"], clf["classifier_scale"]) == (200, 500.0)
    assert presets.values_for("brats-clf_guided", "evaluate")["classifier_scale"] == 1000.0
    assert (presets.values_for("brats-ddib", "evaluate")["w"], presets.values_for("brats-ddib", "evaluate")[
        "sample_steps"]) == (1.1, 450)
    assert (presets.values_for("atlas-ddib", "evaluate")["w"], presets.values_for("atlas-ddib", "evaluate")[
        "sample_steps"]) == (1.3, 300)


@pytest.mark.parametrize("dataset", ["brats", "atlas"])
def test_training_folders_are_where_evaluation_looks(dataset):
    for unet_ver in ("v2", "hae_v2", "hae_v2_conservative"):
        name = f"{dataset}-anofpdm-{unet_ver}"
        assert presets.values_for(name, "train")["output"] == presets.values_for(name, "evaluate")["model_dir"]
    for noise in ("simplex", "gaussian"):
        name = f"{dataset}-anoddpm-{noise}"
        assert presets.values_for(name, "train")["output"] == presets.values_for(name, "evaluate")["model_dir"]
    clf = presets.values_for(f"{dataset}-clf_guided", "evaluate")
    assert clf["model_dir"] == presets.values_for(f"{dataset}-clf_guided", "train")["output"]
    assert clf["clf_dir"] == presets.values_for(f"{dataset}-clf_guided", "train-classifier")["output"]
    # DDIB reads AnoFPDM's classifier-free v2 checkpoints
    assert presets.values_for(f"{dataset}-ddib", "evaluate")["model_dir"] == \
        presets.values_for(f"{dataset}-anofpdm-v2", "train")["output"]
    prefix = "atlas_" if dataset == "atlas" else ""
    assert presets.values_for(f"{dataset}-anoddpm-simplex", "train")["output"] == f"logs/{prefix}anoddpm_simplex"


def test_unknown_preset_lists_the_known_ones(capsys):
    from guided_diffusion.commands import presets as presets_command

    with pytest.raises(SystemExit) as exc:
        train.main(["--preset", "nope", "--data_dir", "x"])
    assert exc.value.code == 2 and "brats-anofpdm-v2" in capsys.readouterr().err
    assert presets_command.main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in presets.PRESETS)
    assert presets_command.main(["quickstart"]) == 0
    shown = capsys.readouterr().out
    assert "--forward_steps 30" in shown and "--timestep_respacing ddim100" in shown
