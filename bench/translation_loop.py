"""The AnoFPDM forward process itself, timed: slices per second through ``ForwardProcess.run`` (CPU or GPU).

    python bench/translation_loop.py                                   # Conservative, production config, fp32
    python bench/translation_loop.py --variants hae_v2_conservative,v2 --precisions fp32,bf16 --batch 64 --steps 5
    python bench/translation_loop.py --small --options compile         # first-call cost and steady speed
    python bench/translation_loop.py --options default,channels_last,one_call --rounds 3   # interleaved

What runs is what translation runs: ``ForwardProcess`` with the AnoFPDM defaults (w = 2, modalities 0 and 3, DDIM
encoding with the null embedding), ``--steps`` forward steps over one batch of ``--batch`` slices, under
``torch.autocast`` for bf16 / fp16, on seeded non-zero weights. Per variant, precision and option: one warm-up run
(reported apart: with ``compile`` it is the compilation), then ``--rounds`` runs interleaved with the other options
(A B A B ...); the median run gives seconds per slice-step and slices·steps per second.

Options (``--options``, comma-separated): ``default`` (the defaults: on a CPU, calls capped by feature-map size);
``one_call`` (all 2B rows of a step in one call, as before issue 20); ``channels_last``; ``compile``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from guided_diffusion import runtime  # noqa: E402
from guided_diffusion.methods.anofpdm import ForwardConfig, ForwardProcess  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

PRODUCTION = dict(image_size=128, in_channels=4, num_channels=128, num_res_blocks=2, attention_resolutions="32,16,8",
                  num_heads=4, use_scale_shift_norm=True, dropout=0.0, class_cond=True, num_classes=2, use_hae=True)
SMALL = dict(PRODUCTION, image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="16,8")
OPTIONS = {"default": {}, "one_call": {"max_rows": 0}, "channels_last": {"channels_last": True},
           "compile": {"compile": True}}


def interleaved(cases: Dict[str, Callable[[], object]], rounds: int, device: torch.device) -> Tuple[dict, dict]:
    """One warm-up call per case (its seconds apart: with ``compile`` the compilation), then ``rounds`` timed calls
    each, the order alternating (A B, B A, ...) against drift. Returns (first call's seconds, timed seconds)."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    first: Dict[str, float] = {}
    for r in range(rounds + 1):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            cases[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            (times[name].append(elapsed) if r else first.__setitem__(name, elapsed))
    return first, times


def build(variant: str, config: dict, device: str):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **config, "unet_ver": variant})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero weights everywhere (a fresh model's output convolution is zero)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator) / max(1, p[0].numel()) ** 0.5)
    return model.to(device).eval(), diffusion


def measure(args) -> list:
    config = dict(SMALL if args.small else PRODUCTION)
    config.update({k: v for k, v in (("image_size", args.image_size), ("num_channels", args.num_channels)) if v})
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for variant in args.variants.split(","):
        model, diffusion = build(variant, config, args.device)
        x0 = torch.rand(args.batch, config["in_channels"], config["image_size"], config["image_size"],
                        generator=torch.Generator().manual_seed(2)).mul_(2).sub_(1).to(device)
        cfg = ForwardConfig(w=2.0, forward_steps=args.steps, modality=[0, 3])
        for precision in args.precisions.split(","):
            processes = {name: ForwardProcess(model, diffusion, cfg, runtime.PRECISIONS[precision], **OPTIONS[name])
                         for name in args.options.split(",")}
            cases = {name: (lambda p=p: p.run(x0, generator=torch.Generator().manual_seed(0)))
                     for name, p in processes.items()}
            first, times = interleaved(cases, args.rounds, device)
            for name, runs in times.items():
                run_s = statistics.median(runs)
                row = {"variant": variant, "precision": precision, "option": name, "batch": args.batch,
                       "steps": args.steps, "first_run_s": first[name], "run_s": run_s,
                       "s_per_slice_step": run_s / (args.batch * args.steps),
                       "slice_steps_per_s": args.batch * args.steps / run_s}
                results.append(row)
                print(f"| {variant} | {precision} | {name} | {args.batch} | {first[name]:.1f} | "
                      f"{row['s_per_slice_step'] * 1000:.1f} | {row['slice_steps_per_s']:.2f} |", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="hae_v2_conservative")
    parser.add_argument("--small", action="store_true", help="64 px, 64 channels, 1 res block")
    parser.add_argument("--image_size", type=int, default=0, help="override the config's image size")
    parser.add_argument("--num_channels", type=int, default=0, help="override the config's width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="slices per batch")
    parser.add_argument("--steps", type=int, default=3, help="forward steps per run")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--options", default="default", help=f"comma-separated: {', '.join(OPTIONS)}")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per option, after one warm-up run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    unknown = set(args.options.split(",")) - set(OPTIONS) or set(args.precisions.split(",")) - set(runtime.PRECISIONS)
    if unknown:
        parser.error(f"unknown --options / --precisions: {sorted(unknown)}")
    print(f"# AnoFPDM forward process, {'small' if args.small else 'production'} config; {runtime.machine_description()}")
    print("\n| variant | precision | option | batch | first run s | ms per slice-step | slice-steps per s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    results = measure(args)
    if args.json:
        args.json.write_text(json.dumps({"machine": runtime.machine_description(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
