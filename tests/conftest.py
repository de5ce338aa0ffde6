"""The tests mirror the package (tests/models, diffusion, data, methods, evaluation, training, commands, bench; what
crosses layers at the top). Shared fixtures: a clean process for every test (no distributed environment, no configured logger left behind),
one CPU thread where asked (``pytest.mark.usefixtures("one_thread")``), and the upstream reference vectors carried
in tests/reference/upstream/ (see its README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# Some tests build on another's helpers (``from test_train import write_npz_dataset``): every test folder is importable.
for folder in sorted(p for p in TESTS.iterdir() if p.is_dir() and p.name != "reference" and not p.name.startswith("_")):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

REFERENCE_DIR = Path(__file__).resolve().parent / "reference" / "upstream"
VARIANTS_WITH_VECTORS = ("v2", "hae", "hae_lite", "hae_v2")
MODEL_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
    "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
    "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16", "use_new_attention_order",
    "in_channels", "num_classes", "unet_ver", "clf_free", "use_hae", "bottleneck_ratio",
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GD_DEBUG")


@pytest.fixture(autouse=True)
def _single_process_and_fresh_logger(monkeypatch):
    """Every test runs as one process without a distributed environment (or GD_DEBUG) inherited from the shell, and
    leaves no configured logger behind (the commands configure the global one)."""
    for var in DISTRIBUTED_ENV:
        monkeypatch.delenv(var, raising=False)
    yield
    from guided_diffusion import logger

    logger.reset()


@pytest.fixture
def one_thread():
    """One CPU thread for tests of small tensors: OpenMP overhead dominates them on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_path(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.fail(f"reference file {path} is missing from the repository (tests/reference/upstream/)")
    return path


def load_vector(variant: str) -> dict:
    return torch.load(reference_path(f"{variant}.pt"), weights_only=True)


def load_keys(variant: str) -> dict:
    return json.loads(reference_path(f"{variant}_production_keys.json").read_text())


def model_flags(flags: dict, **overrides) -> dict:
    out = {k: v for k, v in flags.items() if k in MODEL_FLAGS}
    out.update(overrides)
    return out


def tolerance(reference: torch.Tensor) -> float:
    """The reference README's check: 1e-4 · max(1, max|output|)."""
    return 1e-4 * max(1.0, reference.abs().max().item())
