"""Throughput of AnoDDPM simplex noise (guided_diffusion.diffusion.noise): fields per second.

    OMP_NUM_THREADS=1 python bench/simplex_noise_bench.py                 # CPU, 1 thread, batch 16 x 4 x 128^2
    python bench/simplex_noise_bench.py --device cuda --batch 64 --threads 0

One field = one slice and channel (6 octaves, persistence 0.8, base frequency 64), as in a training batch.
Prints the Gaussian reference (torch.randn) on the same tensor for scale.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from guided_diffusion.diffusion.noise import simplex_noise_like


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.zeros(args.batch, args.channels, args.size, args.size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    fields = args.batch * args.channels
    simplex = timed(lambda: simplex_noise_like(x, t), args.repeats, device)
    gauss = timed(lambda: torch.randn_like(x), args.repeats, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {args.batch} x {args.channels} channels x {args.size}^2 = {fields} fields")
    print(f"simplex: {simplex:.3f} s per batch, {fields / simplex:.1f} fields/s ({simplex / fields * 1e3:.2f} ms/field)")
    print(f"gaussian: {gauss * 1e3:.3f} ms per batch")


if __name__ == "__main__":
    main()
