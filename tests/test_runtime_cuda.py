"""The CUDA backend choices (TF32, cuDNN autotuning): made deliberately, and restorable (plain flags, no GPU needed)."""

import torch

from guided_diffusion import runtime


def test_configure_cuda_sets_the_documented_defaults_and_returns_what_was_there():
    before = runtime.cuda_settings()
    try:
        runtime.restore_cuda({"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": False})
        previous = runtime.configure_cuda()
        assert previous == {"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": False}
        # fp32 means fp32 (no TF32 in matmuls or convolutions); convolution algorithms timed once per shape
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.benchmark is True
    finally:
        runtime.restore_cuda(before)
    assert runtime.cuda_settings() == before


def test_cuda_backends_context_restores_the_settings_even_after_an_error():
    before = runtime.cuda_settings()
    try:
        with runtime.cuda_backends(tf32=not before["cudnn_tf32"], benchmark=not before["cudnn_benchmark"]):
            assert torch.backends.cudnn.allow_tf32 is (not before["cudnn_tf32"])
            assert torch.backends.cuda.matmul.allow_tf32 is (not before["cudnn_tf32"])
            assert torch.backends.cudnn.benchmark is (not before["cudnn_benchmark"])
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert runtime.cuda_settings() == before
