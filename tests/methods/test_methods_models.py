"""The methods built from checkpoints (build_method) on tiny models and data; AnoFPDM through the interface gives
exactly the results of the translation run."""

import json

import numpy as np
import pytest
import torch
from test_translation import SIZE, _tiny_flags, _write_checkpoint, _write_dataset

from guided_diffusion.commands import evaluate
from guided_diffusion.evaluation.driver import batch_seed
from guided_diffusion.methods.registry import build_method
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

V1 = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,1,1,2", attention_resolutions="16,8",
          in_channels=4, unet_ver="v1")
CLASSIFIER = dict(image_size=SIZE, in_channels=4, classifier_width=32, classifier_depth=1,
                  classifier_attention_resolutions="8", out_channels=2)




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


def _build(ws, method, model_dir, *model_flags):
    """The method built from the command line's flags (every method's) for a tiny model, the classifier's and short
    reconstructions."""
    argv = (f"--method {method} --data_dir {ws / 'data'} --model_dir {ws / model_dir} --modality 0 3 "
            f"--batch_size 4 --batch_size_val 4 --sample_steps 3").split()
    if method == "ddib":
        argv += ["--w", "1"]
    if method == "clf_guided":
        argv += (f"--clf_dir {ws / 'clf'} --classifier_width 32 --classifier_depth 1 "
                 "--classifier_attention_resolutions 8 --ema false").split()  # the test folders hold no EMA files
    settings, _ = evaluate.parse(argv + list(model_flags))
    return build_method(settings.inference, "cpu")


def _v1_flags(num_classes, **kw):
    flags = (f"--image_size {SIZE} --num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1,2 "
             f"--attention_resolutions 16,8 --in_channels 4 --unet_ver v1 --num_classes {num_classes}").split()
    for k, v in kw.items():
        flags += [f"--{k}", str(v)]
    return flags


def _batches(data_dir, split, size):
    from guided_diffusion.data.loaders import get_data_iter

    return list(get_data_iter("brats", data_dir, size, split=split, ret_lab=True, mixed=True, seed=0,
                              rank=0, world_size=1))


def test_bad_models_for_a_method_give_clear_errors(ws):
    with pytest.raises(ValueError, match="ddib needs the classifier-free guided model: --num_classes"):
        _build(ws, "ddib", "anoddpm", *_v1_flags(0))
    # flags that build another architecture than the checkpoint's: the load names the file
    with pytest.raises(RuntimeError, match=r"anoddpm \(--model_dir\): checkpoint .*model000005\.pt does not fit"):
        _build(ws, "anoddpm", "anoddpm", *_v1_flags(0), "--num_res_blocks", "2")
    with pytest.raises(RuntimeError, match=r"classifier \(--clf_dir\): checkpoint .*model000003\.pt does not fit the "
                                           r"model built from the classifier flags.*--classifier_depth 2"):
        _build(ws, "clf_guided", "guided", *_v1_flags(2, clf_free=False, learn_sigma=True), "--classifier_depth", "2")
    with pytest.raises(ValueError, match="unconditionally"):
        _build(ws, "anoddpm", "guided", *_v1_flags(2, clf_free=False, learn_sigma=True))


def test_anofpdm_through_the_driver_equals_the_forward_process_pipeline(ws, tmp_path, monkeypatch):
    """The driver + AnoFPDM method give exactly what the pipeline functions give when called as the original
    translation run called them (ForwardProcess per batch with the batch's seed, fit_hyperparams, segment_batch)."""
    from guided_diffusion.methods import anofpdm as af

    log_dir = tmp_path / "logs"
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    argv = (f"--data_dir {ws / 'data'} --model_dir {ws / 'model_v2'} --ema True --w 2 --forward_steps 3 "
            "--null True --batch_size 3 --num_batches -1 --batch_size_val 4 --num_batches_val -1 --modality 0 3 "
            "--num_panels 0 --progress False --t_e_ratio 1 1.5").split() + _tiny_flags("v2")
    evaluate.main(argv)
    hyper_run = json.loads((log_dir / "hyperparams.json").read_text())
    assert hyper_run["pixel_labels_used"] is False

    settings, _ = evaluate.parse(argv)
    s = settings.inference
    model, diffusion, _ = s.source.load(torch.device("cpu"))
    cfg = af.forward_config(s.options, s.maps.modality)
    process = af.ForwardProcess(model, diffusion, cfg)
    stats, labels = [], []
    for k, (x, _gt, lab) in enumerate(_batches(settings.data.data_dir, "val", 4)):
        gen = torch.Generator().manual_seed(batch_seed(s.seed, "val", k))
        stats.append(process.run(x, with_maps=False, generator=gen, noise_rows=(4, 0, 1)).stats)
        labels.append(lab)
    hyper = af.fit_hyperparams(af.StepStats.cat(stats), torch.cat(labels))
    assert hyper_run.pop("fitted_with")["settings"]["w"] == 2.0 and "val_split" in hyper_run.pop("fitted_on")
    assert {**hyper.to_dict(), "pixel_labels_used": False} == hyper_run

    for k, (x, _gt, _lab) in enumerate(_batches(settings.data.data_dir, "test", 3)):
        gen = torch.Generator().manual_seed(batch_seed(s.seed, "test", k))
        res = process.run(x, with_maps=True, generator=gen, noise_rows=(3, 0, 1))
        with np.load(log_dir / "batches" / f"test_ws1_r0_b{k:05d}.npz") as ref:
            for i, ratio in enumerate((1.0, 1.5)):
                seg = af.segment_batch(res, hyper, cfg, t_e_ratio=ratio, cc_max_size=s.component_size)
                assert np.array_equal(seg["anomaly_map"].numpy(), ref[f"anomaly_map_{i}"])
                assert np.array_equal(seg["mask"].numpy(), ref[f"mask_{i}"])
                assert np.array_equal(seg["pred_label"].numpy(), ref[f"pred_label_{i}"])
                assert np.array_equal(seg["end_step"].numpy(), ref[f"col{i}__end_step"])
                assert np.array_equal(seg["threshold"].numpy(), ref[f"col{i}__threshold"])
                assert np.array_equal(seg["similarity"].numpy(), ref[f"col{i}__similarity"])
