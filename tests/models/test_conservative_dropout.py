"""HAEUNetModelV2Conservative against HAEUNetModelV2 in training mode with dropout, in distribution.

The two compute attention dropout differently (nn.MultiheadAttention's dense dropout vs the sparse kernel's
seeded keep-mask) and so draw different random numbers: their outputs agree in distribution only. One input is
repeated over the batch, so each row is an independent draw; per output pixel the means and variances over the
draws must agree within their sampling error (a mean z² near 1, log variance ratios near 0). With only the
attention dropout active the test is sharp: a wrong dropout scale or keep probability in the kernel moves the
mean z² above 10.
"""

import torch

from guided_diffusion.models.unet import HAEUNetModelV2, HAEUNetModelV2Conservative
from guided_diffusion.script_util import create_model

ROWS, DRAWS = 64, 4  # 4 forwards of 64 rows: 128 conditional and 128 null draws per model


def _pair(dropout: float):
    models = []
    for ver in ("hae_v2", "hae_v2_conservative"):
        torch.manual_seed(0)
        models.append(create_model(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                   attention_resolutions="8", in_channels=1, class_cond=True, num_classes=2,
                                   use_hae=True, num_head_channels=32, unet_ver=ver, dropout=dropout))
    v2, cons = models
    with torch.no_grad():  # random weights everywhere (the zero-initialised layers included)
        for p in v2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cons.load_state_dict(v2.state_dict())
    assert type(v2) is HAEUNetModelV2 and isinstance(cons, HAEUNetModelV2Conservative)
    assert cons.attention_impl == "fused" and v2.attention_impl == "reference"
    assert all(b.multihead_attn.dropout == dropout for b in v2.hae_transformers() + cons.hae_transformers())
    return v2.train(), cons.train()


def _input():
    return torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def _draws(model, seed):
    x = _input().expand(ROWS, -1, -1, -1).contiguous()
    t = torch.full((ROWS,), 300)
    y = torch.zeros(ROWS, dtype=torch.long)
    null = torch.arange(ROWS) % 2 == 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = torch.cat([model(x, t, y=y, clf_free=True, null=null) for _ in range(DRAWS)])
    null = null.repeat(DRAWS)
    return out[~null], out[null]


def _compare(a: torch.Tensor, b: torch.Tensor):
    n = a.shape[0]
    z = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / n).sqrt()
    return float(z.pow(2).mean()), float((a.var(0) / b.var(0)).log().mean())


def _same_distribution(v2, cons):
    for kind, a, b in zip(("conditional", "null"), _draws(v2, 1), _draws(cons, 2)):
        assert a.var(0).min() > 0 and b.var(0).min() > 0, "dropout must make the draws differ"
        z2, log_ratio = _compare(a, b)
        assert z2 < 2.0, (kind, z2)  # ~1 for equal means; a kernel dropout-scale error gives > 10
        assert abs(log_ratio) < 0.15, (kind, log_ratio)


def test_attention_dropout_alone_same_distribution():
    """Only the HAE attention dropout active (the identical ResBlock/MLP dropouts replaced in both models)."""
    v2, cons = _pair(0.3)
    for model in (v2, cons):
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Dropout):
                    setattr(module, name, torch.nn.Identity())
    _same_distribution(v2, cons)
    # the comparison has power: the mean output with attention dropout differs measurably from the output
    # without it (eval mode), as it would under a wrong dropout scale
    a, _ = _draws(v2, 1)
    with torch.no_grad():
        plain = v2.eval()(_input(), torch.tensor([300]), y=torch.tensor([0]), clf_free=True)[0]
    assert float(((a.mean(0) - plain) ** 2 / (a.var(0) / a.shape[0])).mean()) > 3.0


def test_every_dropout_same_distribution():
    """ResBlock, attention and MLP dropout all active, as in training."""
    v2, cons = _pair(0.3)
    _same_distribution(v2, cons)
