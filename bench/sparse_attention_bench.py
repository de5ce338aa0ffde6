"""Time and saved-activation memory: dense masked attention (as nn.MultiheadAttention computes it
in training: explicit softmax + dropout) versus guided_diffusion.models.sparse_attention.masked_attention.

    python bench/sparse_attention_bench.py [--lengths 4416,1104,276,69] [--channels 16,32,48,64]
        [--batch 1] [--heads 8] [--dropout 0.1] [--block-size 128] [--repeats 3] [--threads N]

Times are the best of --repeats forward+backward passes (wall clock); memory is the bytes of
unique storages saved for backward, measured with autograd saved-tensor hooks.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, List

import torch
import torch.nn.functional as F

from guided_diffusion.models.sparse_attention import band_random_mask, build_mask_plan, masked_attention


def dense_mha_math(q, k, v, float_mask, dropout_p: float) -> torch.Tensor:
    """What nn.MultiheadAttention does with a bool mask in training (additive -inf mask)."""
    b, h, length, c = q.shape
    qf = (q * (1.0 / math.sqrt(c))).reshape(b * h, length, c)
    attn = torch.baddbmm(float_mask, qf, k.reshape(b * h, length, c).transpose(1, 2))
    attn = F.dropout(torch.softmax(attn, dim=-1), p=dropout_p, training=True)
    return torch.bmm(attn, v.reshape(b * h, length, c)).reshape(b, h, length, c)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of unique storages saved for backward during one forward."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fns: List[Callable[[], torch.Tensor]], inputs: List[torch.Tensor], repeats: int) -> List[float]:
    """Best forward+backward wall time of each fn; runs are interleaved so load changes hit all."""
    device = inputs[0].device
    times = [[] for _ in fns]
    for _ in range(repeats + 1):  # first round is warm-up
        for fn, record in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            out = fn()
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
            _sync(device)
            record.append(time.perf_counter() - start)
            del out, grads
    return [min(record[1:]) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4416,1104,276,69")
    parser.add_argument("--channels", default="16,32,48,64", help="head dim per length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    channels = [int(x) for x in args.channels.split(",")]
    if len(channels) != len(lengths):
        parser.error(f"--channels needs one value per length: {args.channels!r} vs {args.lengths!r}")
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, B={args.batch}, H={args.heads}, "
          f"dropout {args.dropout}, block_size {args.block_size}")
    header = f"{'L':>6} {'c':>4} | {'dense s':>8} {'kernel s':>8} {'speedup':>7} | {'dense MiB':>10} {'kernel MiB':>10} {'ratio':>6} | plan (W, R, MiB, build s)"
    print(header)
    print("-" * len(header))
    for length, c in zip(lengths, channels):
        gen = torch.Generator().manual_seed(0)
        mask = band_random_mask(length, generator=gen).to(device)
        start = time.perf_counter()
        plan = build_mask_plan(mask, args.block_size)
        build_s = time.perf_counter() - start
        float_mask = torch.zeros(length, length, device=device).masked_fill_(mask, float("-inf"))
        q, k, v = (torch.randn(args.batch, args.heads, length, c, device=device, requires_grad=True) for _ in range(3))

        def dense():
            return dense_mha_math(q, k, v, float_mask, args.dropout)

        def kernel():
            return masked_attention(q, k, v, plan, args.dropout, training=True)

        t_dense, t_kernel = time_fwd_bwd([dense, kernel], [q, k, v], args.repeats)
        m_dense = saved_bytes(dense) / 2**20
        m_kernel = saved_bytes(kernel) / 2**20
        print(f"{length:>6} {c:>4} | {t_dense:>8.3f} {t_kernel:>8.3f} {t_dense / t_kernel:>6.1f}x | "
              f"{m_dense:>10.1f} {m_kernel:>10.2f} {m_dense / m_kernel:>5.0f}x | "
              f"({plan.window}, {plan.num_outside}, {plan.nbytes() / 2**20:.1f}, {build_s:.2f})")


if __name__ == "__main__":
    main()
