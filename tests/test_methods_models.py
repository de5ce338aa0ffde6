"""The methods built from checkpoints (build_method) on tiny models and data; AnoFPDM through the interface gives
exactly the results of the translation run."""

import argparse
import json

import numpy as np
import pytest
import torch

from guided_diffusion.evaluation import translation
from guided_diffusion.methods.base import BatchContext, build_method
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from test_translation import SIZE, _tiny_flags, _write_checkpoint, _write_dataset

V1 = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,1,1,2", attention_resolutions="16,8",
          in_channels=4, unet_ver="v1")
CLASSIFIER = dict(image_size=SIZE, in_channels=4, classifier_width=32, classifier_depth=1,
                  classifier_attention_resolutions="8", out_channels=2)


@pytest.fixture(autouse=True)
def _fresh_logger():
    yield
    from guided_diffusion import logger

    logger.reset()


def _save_random(model, path, scale=0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    _write_dataset(root / "data")
    _write_checkpoint(root / "model_v2", "v2")
    kw = model_and_diffusion_defaults()
    kw.update(V1, num_classes=0, class_cond=False)
    _save_random(create_model_and_diffusion(**kw)[0], root / "anoddpm" / "model000005.pt")
    kw.update(num_classes=2, class_cond=True, clf_free=False, learn_sigma=True)
    _save_random(create_model_and_diffusion(**kw)[0], root / "guided" / "model000005.pt")
    flags = {**classifier_defaults(), **CLASSIFIER}
    _save_random(create_classifier(**{k: v for k, v in flags.items()}), root / "clf" / "model000003.pt")
    return root


def _args(ws, model_dir, *model_flags, **extra):
    """The translation parser's flags plus the baselines' (phase 1: the method flags are set here)."""
    argv = (f"--data_dir {ws / 'data'} --model_dir {ws / model_dir} --w 1 --modality 0 3 "
            "--batch_size 4 --batch_size_val 4").split() + list(model_flags)
    args = translation.create_argparser().parse_args(argv)
    for k, v in {**classifier_defaults(), **CLASSIFIER}.items():
        if not hasattr(args, k) or k not in ("image_size", "in_channels", "unet_ver"):
            setattr(args, k, v)
    defaults = dict(sample_steps=3, noise_type="gaussian", use_ddpm=True, opt_thr=-1.0,
                    threshold_grid="0.01,0.7,0.01", clf_dir=str(ws / "clf"), clf_num="", classifier_scale=10.0,
                    legacy_ddib=False)
    for k, v in {**defaults, **extra}.items():
        setattr(args, k, v)
    return args


def _v1_flags(num_classes, **kw):
    flags = (f"--image_size {SIZE} --num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1,2 "
             f"--attention_resolutions 16,8 --in_channels 4 --unet_ver v1 --num_classes {num_classes}").split()
    for k, v in kw.items():
        flags += [f"--{k}", str(v)]
    return flags


def _batches(args, split, size):
    from guided_diffusion.data.loaders import get_data_iter

    return list(get_data_iter("brats", args.data_dir, size, split=split, ret_lab=True, mixed=True, seed=0,
                              rank=0, world_size=1))


@pytest.mark.parametrize("name, model_dir, flags, extra", [
    ("anoddpm", "anoddpm", _v1_flags(0), dict(noise_type="simplex", use_ddpm=True)),
    ("anoddpm", "anoddpm", _v1_flags(0), dict(use_ddpm=False)),
    ("clf_guided", "guided", _v1_flags(2, clf_free=False, learn_sigma=True), {}),
    ("ddib", "model_v2", _tiny_flags("v2"), {}),
])
def test_each_baseline_from_its_checkpoints(ws, name, model_dir, flags, extra):
    args = _args(ws, model_dir, *flags, **extra)
    method = build_method(name, args, "cpu")
    assert method.uses_pixel_labels and all(p.endswith(".pt") for p in method.checkpoints())
    json.dumps(method.settings())
    records, labels, gts = [], [], []
    for k, (x, gt, lab) in enumerate(_batches(args, "val", 4)):
        steps = []
        rec = method.validation_batch(x, BatchContext.for_seed(k, progress=steps.append))
        assert rec["anomaly_map"].shape == (x.shape[0], 1, SIZE, SIZE) and len(steps) >= 3
        records.append(rec["anomaly_map"])
        labels.append(lab.numpy())
        gts.append(gt.numpy() > 0.5)
    hyper = method.fit({"anomaly_map": np.concatenate(records)}, np.concatenate(labels), np.concatenate(gts))
    assert 0.01 <= hyper["threshold"] <= 0.69 and hyper["n_val"] == 8
    json.dumps(hyper)
    x, gt, lab = _batches(args, "test", 4)[0]
    out = method.test_batch(x, hyper, BatchContext.for_seed(0)).check(4, SIZE, SIZE, name)
    again = method.test_batch(x, hyper, BatchContext.for_seed(0))
    assert torch.equal(out.anomaly_map, again.anomaly_map)  # deterministic given the context's seed
    assert out.arrays["reconstruction"].shape == (4, 4, SIZE, SIZE)
    assert np.all(out.columns["threshold"] == hyper["threshold"])


def test_bad_models_for_a_method_give_clear_errors(ws):
    with pytest.raises(ValueError, match="ddib needs the classifier-free guided model: --num_classes"):
        build_method("ddib", _args(ws, "anoddpm", *_v1_flags(0)), "cpu")
    # flags that build a class-conditional v1 for the unconditional checkpoint: the load names the file
    with pytest.raises(RuntimeError, match=r"anoddpm \(--model_dir\): checkpoint .*model000005\.pt does not fit"):
        build_method("anoddpm", _args(ws, "anoddpm", *_v1_flags(2, clf_free=False)), "cpu")
    args = _args(ws, "guided", *_v1_flags(2, clf_free=False, learn_sigma=True))
    args.classifier_depth = 2
    with pytest.raises(RuntimeError, match=r"classifier checkpoint .*model000003\.pt does not fit.*--classifier_depth 2"):
        build_method("clf_guided", args, "cpu")
    with pytest.raises(ValueError, match="unconditionally"):
        build_method("anoddpm", _args(ws, "guided", *_v1_flags(2, clf_free=False, learn_sigma=True)), "cpu")


def test_anofpdm_through_the_interface_equals_the_translation_run(ws, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    argv = (f"--data_dir {ws / 'data'} --model_dir {ws / 'model_v2'} --ema True --w 2 --forward_steps 3 "
            "--null True --batch_size 3 --num_batches -1 --batch_size_val 4 --num_batches_val -1 --modality 0 3 "
            "--num_panels 0 --progress False --t_e_ratio 1 1.5").split() + _tiny_flags("v2")
    translation.main(argv)
    hyper_run = json.loads((log_dir / "hyperparams.json").read_text())

    args = translation.create_argparser().parse_args(argv)
    translation.check_args(args)
    method = build_method("anofpdm", args, "cpu")
    assert not method.uses_pixel_labels and method.variants() == [1.0, 1.5]
    records, labels = [], []
    for k, (x, _gt, lab) in enumerate(_batches(args, "val", 4)):
        gen = torch.Generator().manual_seed(translation._batch_seed(args, "val", k))
        records.append(method.validation_batch(x, BatchContext(gen, rows=4)))
        labels.append(lab.numpy())
    merged = {key: np.concatenate([r[key] for r in records]) for key in records[0]}
    hyper = method.fit(merged, np.concatenate(labels), None)
    assert hyper == hyper_run

    for k, (x, _gt, _lab) in enumerate(_batches(args, "test", 3)):
        gen = torch.Generator().manual_seed(translation._batch_seed(args, "test", k))
        out = method.test_batch(x, hyper, BatchContext(gen, rows=3)).check(x.shape[0], SIZE, SIZE, "anofpdm")
        with np.load(log_dir / "batches" / f"test_ws1_r0_b{k:05d}.npz") as ref:
            assert np.array_equal(out.pred_label.numpy(), ref["pred_label"])
            assert np.array_equal(out.columns["similarity"], ref["similarity"])
            assert np.array_equal(out.columns["quantile"], ref["quantile"])
            for i, o in enumerate([out] + out.variants):
                assert np.array_equal(o.anomaly_map.numpy(), ref[f"anomaly_map_{i}"])
                assert np.array_equal(o.mask.numpy(), ref[f"mask_{i}"])
                assert np.array_equal(o.columns["end_step"], ref[f"end_step_{i}"])
                assert np.array_equal(o.columns["threshold"], ref[f"threshold_{i}"])
            assert np.array_equal(out.arrays["stats_divergence"], ref["stats_divergence"])
