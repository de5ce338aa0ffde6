"""unet_ver v1 and the noisy-image classifier against the original AnoFPDM (tests/reference/upstream/)."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from guided_diffusion import script_util as su
from guided_diffusion.models.classifier import AttentionPool2d, EncoderUNetModel
from guided_diffusion.models.unet import UNetModelV1

from conftest import load_keys, load_vector, tolerance

MODEL_KEYS = set(su.model_and_diffusion_defaults()) - set(su.diffusion_defaults()) | {"learn_sigma"}


pytestmark = pytest.mark.usefixtures("one_thread")


def v1_model(flags: dict, **overrides) -> UNetModelV1:
    return su.create_model(**{**{k: v for k, v in flags.items() if k in MODEL_KEYS}, **overrides})


def loaded_v1(name: str, **overrides) -> tuple:
    vec = load_vector("v1")
    entry = vec["models"][name]
    model = v1_model(entry["flags"], **overrides)
    model.load_state_dict(entry["state_dict"], strict=True)
    assert sum(p.numel() for p in model.parameters()) == entry["param_count"]
    cases = {case["name"]: case for case in entry["cases"]}
    return model.eval(), vec, cases


def assert_close_to(out: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    err = (out - reference).abs().max().item()
    assert err <= tolerance(reference), f"{what}: max abs error {err}"


# ------------------------------------------------------------------ keys --------------------------
@pytest.mark.parametrize("config", ["uncond", "cond"])
def test_v1_production_keys_and_shapes(config):
    recorded = load_keys("v1")
    expected = recorded if config == "uncond" else recorded["cond"]
    with torch.device("meta"):
        model = v1_model(expected["flags"])
    assert isinstance(model, UNetModelV1)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["param_count"]


def test_classifier_production_keys_and_shapes():
    expected = load_keys("classifier")
    with torch.device("meta"):
        classifier = su.create_classifier(**expected["flags"])
    assert isinstance(classifier, EncoderUNetModel)
    assert [[k, list(v.shape)] for k, v in classifier.state_dict().items()] == expected["keys"]
    assert sum(p.numel() for p in classifier.parameters()) == expected["param_count"]
    heads = {name: [m.qkv.in_channels, m.num_heads] for name, m in classifier.named_modules() if hasattr(m, "qkv")}
    assert heads == expected["derived"]["attention_channels_heads"]
    pool = classifier.out[2]
    assert [pool.qkv_proj.in_channels, pool.num_heads, pool.positional_embedding.shape[1]] == \
        expected["derived"]["pool_channels_heads_tokens"]


# ------------------------------------------------------------------ v1 outputs -------------------
@pytest.mark.parametrize("attention_impl", ["reference", "fused"])
def test_v1_unconditional_reproduces_upstream(attention_impl):
    model, vec, cases = loaded_v1("uncond")
    model.set_attention_impl(attention_impl)
    with torch.no_grad():
        out = model(vec["x"], vec["t"], **cases["default"]["kwargs"])
    assert_close_to(out, cases["default"]["output"], f"uncond ({attention_impl})")


def test_v1_label_case_reproduces_upstream_in_both_modes():
    """`uncond=True` is upstream's way to use the label: the same output whatever the model's rule."""
    for label_only_with_uncond in (False, True):
        model, vec, cases = loaded_v1("cond", label_only_with_uncond=label_only_with_uncond)
        with torch.no_grad():
            out = model(vec["x"], vec["t"], **cases["label"]["kwargs"])
        assert_close_to(out, cases["label"]["output"], f"label, label_only_with_uncond={label_only_with_uncond}")


def test_v1_default_call_uses_the_label():
    """Our default: upstream's training/sampling call `{y, threshold -1, clf_free False}` uses y, so it
    gives the recorded `label` output (upstream's default ignores y, recorded as `default`)."""
    model, vec, cases = loaded_v1("cond")
    kwargs = cases["default"]["kwargs"]
    assert "uncond" not in kwargs
    with torch.no_grad():
        out = model(vec["x"], vec["t"], **kwargs)
        flipped = model(vec["x"], vec["t"], **{**kwargs, "y": 1 - kwargs["y"]})
    assert_close_to(out, cases["label"]["output"], "default call, label used")
    assert (out - cases["default"]["output"]).abs().max() > 1.0  # recorded: 1.76
    assert (flipped - out).abs().max() > 1.0  # recorded: flipping y moves the label case by 2.11


def test_v1_label_only_with_uncond_is_upstreams_rule():
    model, vec, cases = loaded_v1("cond", label_only_with_uncond=True)
    kwargs = cases["default"]["kwargs"]
    with torch.no_grad():
        out = model(vec["x"], vec["t"], **kwargs)
        flipped = model(vec["x"], vec["t"], **{**kwargs, "y": 1 - kwargs["y"]})
        no_label = model(vec["x"], vec["t"])
    assert_close_to(out, cases["default"]["output"], "label ignored")
    assert torch.equal(out, flipped) and torch.equal(out, no_label)
    # and an explicit uncond=False ignores the label on a default model too (upstream's signature)
    default_model, _, _ = loaded_v1("cond")
    with torch.no_grad():
        ignored = default_model(vec["x"], vec["t"], **kwargs, uncond=False)
    assert torch.equal(ignored, out)


def test_v1_unconditional_output_is_the_first_channels_of_the_conditional_default():
    """Recorded relation between the two files: shared weights, so uncond == cond `default`[:, :4]."""
    uncond, vec, cases = loaded_v1("uncond")
    cond, _, cond_cases = loaded_v1("cond", label_only_with_uncond=True)
    with torch.no_grad():
        a = uncond(vec["x"], vec["t"])
        b = cond(vec["x"], vec["t"], **cond_cases["default"]["kwargs"])
    assert torch.allclose(a, b[:, :4], atol=1e-6)


def test_v1_honours_new_attention_order():
    """The q,k,v-first head split changes the function (README: by 0.89–1.04); both computations agree."""
    vec = load_vector("v1")
    entry = vec["models"]["uncond"]
    model = v1_model(entry["flags"], use_new_attention_order=True)
    model.load_state_dict(entry["state_dict"])
    model.eval()
    with torch.no_grad():
        ref = model(vec["x"], vec["t"])
        model.set_attention_impl("fused")
        fused = model(vec["x"], vec["t"])
    assert (ref - entry["cases"][0]["output"]).abs().max() > 0.5
    assert_close_to(fused, ref, "new order, fused vs reference")
    # the v2 family accepts the flag and ignores it, as upstream
    v2 = su.create_model(**{**{k: v for k, v in entry["flags"].items() if k in MODEL_KEYS}, "unet_ver": "v2",
                            "use_new_attention_order": True})
    assert all(m.legacy_order for m in v2.modules() if hasattr(m, "legacy_order"))


def test_v1_classifier_free_modes():
    """A v1 built with clf_free=True (label_emb -> class_emb): null rows carry the time embedding
    alone, i.e. equal the label-ignored output; per-row nulls equal separate calls."""
    vec = load_vector("v1")
    flags = {**vec["models"]["cond"]["flags"], "clf_free": True}
    torch.manual_seed(0)
    model = v1_model(flags).eval()
    own = model.state_dict()  # the recorded (non-zero) weights where shapes agree; label/class MLP as initialised
    model.load_state_dict({k: v for k, v in vec["models"]["cond"]["state_dict"].items()
                           if k in own and v.shape == own[k].shape}, strict=False)
    assert {"label_emb.weight", "class_emb.0.weight"} <= set(own)
    assert model.label_emb.weight.shape == (2, 32)
    x, t, y = vec["x"], vec["t"], vec["y"]
    with torch.no_grad():
        cond = model(x, t, y=y, clf_free=True)
        null = model(x, t, y=y, clf_free=True, null=True)
        ignored = model(x, t, uncond=False)
        mixed = model(x, t, y=y, clf_free=True, null=torch.tensor([True, False, True]))
    assert torch.allclose(null, ignored, atol=1e-6)
    assert (cond - null).abs().max() > 1e-3
    assert torch.allclose(mixed, torch.where(torch.tensor([True, False, True])[:, None, None, None], null, cond), atol=1e-5)
    torch.manual_seed(1)
    dropped = torch.rand(3) < 0.5
    torch.manual_seed(1)
    train = model.train()(x, t, y=y, threshold=0.5).detach()
    assert 0 < dropped.sum() < 3
    assert torch.allclose(train[dropped], null[dropped], atol=1e-5)
    assert torch.allclose(train[~dropped], cond[~dropped], atol=1e-5)


# ------------------------------------------------------------------ v1 errors --------------------
def test_v1_contradictory_calls_are_clear_errors():
    vec = load_vector("v1")
    x, t, y = vec["x"], vec["t"], vec["y"]
    uncond = v1_model(vec["models"]["uncond"]["flags"])
    guided = v1_model(vec["models"]["cond"]["flags"])  # clf_free=False: Embedding(y) added, no null
    with pytest.raises(ValueError, match="no classes"):
        uncond(x, t, uncond=True)
    with pytest.raises(ValueError, match="unconditional model"):
        uncond(x, t, y=y)
    with pytest.raises(ValueError, match="needs labels y"):
        guided(x, t)
    for kwargs in (dict(threshold=0.1), dict(clf_free=True), dict(clf_free=True, null=True)):
        with pytest.raises(ValueError, match="built with clf_free=False"):
            guided(x, t, y=y, **kwargs)
    with pytest.raises(ValueError, match="label_only_with_uncond is upstream v1's"):
        su.create_model(image_size=32, num_channels=32, num_res_blocks=1, class_cond=True, unet_ver="v2",
                        label_only_with_uncond=True)
    with pytest.raises(ValueError, match="needs a class-conditional v1"):
        v1_model(vec["models"]["uncond"]["flags"], label_only_with_uncond=True)


def test_v1_flags_flow_through_argparse():
    defaults = su.model_and_diffusion_defaults()
    assert defaults["label_only_with_uncond"] is False
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--unet_ver", "v1", "--image_size", "32", "--num_channels", "32", "--num_res_blocks",
                              "1", "--channel_mult", "1,1,1,2", "--in_channels", "4", "--class_cond", "True",
                              "--clf_free", "False", "--label_only_with_uncond", "True"])
    model, _ = su.create_model_and_diffusion(**su.args_to_dict(args, defaults))
    assert isinstance(model, UNetModelV1) and model.label_only_with_uncond and not model.clf_free


# ------------------------------------------------------------------ DDP -------------------------
@pytest.fixture
def process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp_steps(model, steps: int = 2, **kwargs) -> None:
    ddp = DDP(model, find_unused_parameters=False)
    x, t = torch.randn(2, 4, 32, 32), torch.tensor([3, 700])
    for _ in range(steps):
        ddp(x, t, **kwargs).square().mean().backward()


def test_v1_parameters_and_ddp_without_find_unused(process_group):
    """Default: every parameter (label_emb included) gets a gradient. Upstream's rule: label_emb is
    frozen, so DDP(find_unused_parameters=False) still trains (upstream failed at step 2)."""
    flags = load_vector("v1")["models"]["cond"]["flags"]
    y = torch.tensor([0, 1])
    model = v1_model(flags)
    model(torch.randn(2, 4, 32, 32), torch.tensor([3, 700]), y=y).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    _ddp_steps(v1_model(flags), y=y)

    frozen = v1_model(flags, label_only_with_uncond=True)
    assert not frozen.label_emb.weight.requires_grad
    frozen(torch.randn(2, 4, 32, 32), torch.tensor([3, 700]), y=y).sum().backward()
    assert all(p.grad is not None for p in frozen.parameters() if p.requires_grad)
    _ddp_steps(v1_model(flags, label_only_with_uncond=True), y=y)

    # what the freeze prevents: a trainable label_emb that the call never reads
    unfrozen = v1_model(flags, label_only_with_uncond=True)
    unfrozen.label_emb.requires_grad_(True)
    with pytest.raises(RuntimeError, match="finished reduction"):
        _ddp_steps(unfrozen, y=y)


# ------------------------------------------------------------------ classifier ------------------
def loaded_classifier() -> tuple:
    vec = load_vector("classifier")
    classifier = su.create_classifier(**vec["flags"])
    classifier.load_state_dict(vec["state_dict"], strict=True)
    assert sum(p.numel() for p in classifier.parameters()) == vec["param_count"]
    return classifier.eval(), vec


def test_classifier_logits_and_guidance_gradient_reproduce_upstream():
    classifier, vec = loaded_classifier()
    with torch.no_grad():
        logits = classifier(vec["x"], vec["t"])
    assert logits.shape == (3, 2)
    assert_close_to(logits, vec["logits"], "logits")
    # cond_fn of upstream's translation_CLF.py
    x_in = vec["x"].detach().requires_grad_(True)
    log_prob = F.log_softmax(classifier(x_in, vec["t"]), dim=-1)[range(3), vec["y"]]
    grad, = torch.autograd.grad(log_prob.sum(), x_in)
    assert_close_to(log_prob.detach(), vec["log_prob_y"], "log p(y | x, t)")
    err = (grad - vec["grad_log_prob_y"]).abs().max().item()
    assert err <= 1e-4 * vec["grad_log_prob_y"].abs().max().item(), f"gradient: max abs error {err}"


def test_attention_pool_reproduces_upstream_pool_check():
    check = load_vector("classifier")["pool_check"]
    args = check["args"]
    pool = AttentionPool2d(args["spacial_dim"], args["embed_dim"], args["num_heads_channels"], args["output_dim"])
    pool.load_state_dict(check["state_dict"], strict=True)
    assert pool.num_heads == 2
    with torch.no_grad():
        out = pool(check["input"])
    assert_close_to(out, check["output"], "pool_check")


def test_adaptive_pool_is_norm_silu_mean_conv():
    torch.manual_seed(0)
    classifier = su.create_classifier(image_size=32, classifier_width=32, classifier_attention_resolutions="8,4",
                                      classifier_pool="adaptive", in_channels=4, out_channels=3)
    assert [k for k in classifier.state_dict() if k.startswith("out.")] == \
        ["out.0.weight", "out.0.bias", "out.3.weight", "out.3.bias"]
    with torch.no_grad():
        classifier.out[3].weight.normal_()
        classifier.out[3].bias.normal_()
    captured = {}
    classifier.middle_block.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    x, t = torch.randn(2, 4, 32, 32), torch.tensor([5, 600])
    with torch.no_grad():
        logits = classifier(x, t)
        h = captured["h"]
        gn = classifier.out[0]
        expected = F.silu(F.group_norm(h, 32, gn.weight, gn.bias)).mean(dim=(2, 3)) @ \
            classifier.out[3].weight[:, :, 0, 0].T + classifier.out[3].bias
    assert torch.allclose(logits, expected, atol=1e-5)


def test_classifier_flags_and_errors():
    defaults = su.classifier_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--image_size", "32", "--classifier_width", "32", "--classifier_depth", "1",
                              "--classifier_attention_resolutions", "8,4", "--in_channels", "4",
                              "--diffusion_steps", "100"])
    classifier, diffusion = su.create_classifier_and_diffusion(**su.args_to_dict(args, defaults))
    assert isinstance(classifier, EncoderUNetModel) and classifier.out_channels == 2
    assert diffusion.num_timesteps == 100
    assert classifier(torch.randn(2, 4, 32, 32), torch.tensor([1, 2])).shape == (2, 2)
    with pytest.raises(ValueError, match="attention pool built for 4×4 feature maps got \\(8, 8\\)"):
        classifier(torch.randn(1, 4, 64, 64), torch.tensor([1]))
    with pytest.raises(TypeError, match="unknown classifier/diffusion flags"):
        su.create_classifier_and_diffusion(num_channels=32)
    small = dict(image_size=32, classifier_width=32, in_channels=4)
    for flags, message in [
        (dict(classifier_pool="spatial"), "classifier_pool 'spatial' is not supported"),
        (dict(unet_ver="v2"), "unet_v1.EncoderUNetModel"),
        (dict(image_size=96), "image_size 96 is not one of"),
        (dict(classifier_attention_resolutions="32"), "not divisible by num_head_channels 64"),
        (dict(classifier_use_fp16=True), "torch.autocast"),
        (dict(out_channels=1), "out_channels"),
    ]:
        with pytest.raises(ValueError, match=message):
            su.create_classifier(**{**small, **flags})
