"""A training step per variant and option, timed through the real loop (``TrainLoop.run_step``), CPU or GPU.

    python bench/train_step.py                                         # production config, the options below
    python bench/train_step.py --variants v2 --options fp32,reference # v2's attention: fused (default) or upstream's
    python bench/train_step.py --small --options fp32,compile         # compile's first-call cost and steady speed

Production config: 128 px, 4 channels, 128 base channels, attention at 32/16/8, 4 heads, HAE on, dropout 0.1, label
dropout 0.1; ``--batch`` samples per step (default 1); seeded non-zero weights. Per variant, one warm-up step per
option (reported apart: with ``compile`` it is the compilation), then ``--rounds`` steps interleaved with the other
options (A B C, C B A, ...); the median step is reported. Options: ``fp32`` (the default), ``bf16`` (``--precision
bf16``: autocast), ``compile`` (``--compile true``), ``reference`` (the attention computed as upstream does, materialised, instead
of the model's default: fused for v1 and v2, Conservative's own kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from guided_diffusion import runtime  # noqa: E402
from guided_diffusion.training.train_util import TrainLoop  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from translation_loop import PRODUCTION, SMALL, build, interleaved  # noqa: E402

OPTIONS = {"fp32": {}, "bf16": {"precision": "bf16"}, "compile": {"compile": True}, "reference": {}}


def measure(args) -> list:
    config = dict(SMALL if args.small else PRODUCTION, dropout=0.1)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(args.batch, config["in_channels"], config["image_size"], config["image_size"], generator=g)
    x = x.mul_(2).sub_(1).to(device)
    y = (torch.arange(args.batch) % 2).to(device)
    results = []
    for variant in args.variants.split(","):
        loops = {}
        for name in args.options.split(","):
            model, diffusion = build(variant, config, args.device)
            model.train()
            if name == "reference":
                model.set_attention_impl("reference")
            loops[name] = TrainLoop(model=model, diffusion=diffusion, data=[], batch_size=args.batch, lr=1e-4,
                                    threshold=0.1, progress=False, seed=0, **OPTIONS[name])
        first, times = interleaved({name: (lambda lp=lp: lp.run_step(x, {"y": y})) for name, lp in loops.items()},
                                   args.rounds, device)
        base = statistics.median(times[next(iter(times))])
        for name, runs in times.items():
            step_s = statistics.median(runs)
            row = {"variant": variant, "option": name, "batch": args.batch, "first_step_s": first[name],
                   "step_s": step_s, "speedup": base / step_s}
            results.append(row)
            print(f"| {variant} | {name} | {args.batch} | {first[name]:.1f} | {step_s:.2f} | {base / step_s:.2f}× |",
                  flush=True)
        del loops
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="hae_v2_conservative")
    parser.add_argument("--small", action="store_true", help="64 px, 64 channels, 1 res block")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="samples per step")
    parser.add_argument("--options", default="fp32,bf16", help=f"comma-separated: {', '.join(OPTIONS)} (the first "
                        "is the baseline of the speed-up column)")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per option, after one warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    unknown = set(args.options.split(",")) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown --options: {sorted(unknown)} (choose from {', '.join(OPTIONS)})")
    print(f"# training step, {'small' if args.small else 'production'} config; {runtime.machine_description()}")
    print("\n| variant | option | batch | first step s | s per step | speed-up |")
    print("|---|---|---|---|---|---|", flush=True)
    results = measure(args)
    if args.json:
        args.json.write_text(json.dumps({"machine": runtime.machine_description(), "args": vars(args) | {
            "json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
