"""Memory and speed of every UNet variant, at the production config (default) or a small one.

    python bench/memory_speed.py                 # production config (128 px, 128 channels), CPU or CUDA
    python bench/memory_speed.py --small         # quick run
    python bench/memory_speed.py --per-block     # where the activation memory goes, per top-level block
    python bench/memory_speed.py --budget-gib 70 # on CUDA: largest training batch that fits (and its step time)
    python bench/memory_speed.py --translation-batch 64 --precisions fp32,bf16   # translation throughput

Measured per variant, each in a fresh subprocess so nothing leaks from one to the next:

* activation memory saved for backward per training sample: unique storages that autograd
  saves (parameters excluded), via ``torch.autograd.graph.saved_tensors_hooks``;
* peak memory of an inference forward of a cond+null batch (the AnoFPDM/CFG call): peak RSS
  growth on CPU (``/proc`` high-water mark, reset before the call), ``max_memory_allocated``
  growth on CUDA;
* training step time per sample (forward, backward, AdamW step; label dropout 0.1; train mode)
  and inference forward time per sample;
* with ``--budget-gib`` (CUDA): the largest training batch whose step peaks under the budget, and the step time
  at that batch;
* with ``--translation-batch N``: translation throughput per precision (``--precisions``), i.e. slices per second
  through one AnoFPDM forward step (one batched cond+null forward of 2N rows under ``torch.autocast``, as
  translation runs it); a batch that does not fit is halved until it does (the batch used is reported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guided_diffusion import runtime  # noqa: E402
from guided_diffusion.script_util import create_model  # noqa: E402

VARIANTS = ("v2", "hae", "hae_lite", "hae_v2", "hae_v2_conservative")
PRODUCTION = dict(image_size=128, in_channels=4, num_channels=128, num_res_blocks=2, attention_resolutions="32,16,8",
                  channel_mult="", num_heads=4, use_scale_shift_norm=True, dropout=0.1, class_cond=True,
                  num_classes=2, use_hae=True, bottleneck_ratio=0.25)
SMALL = dict(PRODUCTION, image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="16,8")
MIB = 2 ** 20


def build(variant: str, config: dict, device: str, attention_impl: str | None = None):
    torch.manual_seed(0)
    model = create_model(**config, unet_ver=variant).to(device)
    if attention_impl:
        model.set_attention_impl(attention_impl)
    return model


def batch(config: dict, n: int, device: str):
    size, ch = config["image_size"], config["in_channels"]
    x = torch.randn(n, ch, size, size, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, 2, (n,), device=device)
    return x, t, y


def saved_activation_bytes(model, config, device, n: int, per_block: bool):
    """Unique bytes autograd saves for backward in one training forward of n samples."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]
    by_block = defaultdict(int)
    current = ["embeddings"]
    hooks = []
    if per_block:
        for name, module in model.named_children():
            children = list(module.named_children()) if isinstance(module, torch.nn.ModuleList) else [(None, module)]
            for idx, child in children:
                label = name if idx is None else f"{name}.{idx}"
                hooks.append(child.register_forward_pre_hook(lambda m, a, label=label: current.__setitem__(0, label)))

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen and tensor.device.type != "meta":
            seen.add(key)
            total[0] += storage.nbytes()
            by_block[current[0]] += storage.nbytes()
        return tensor

    x, t, y = batch(config, n, device)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, t, y=y, threshold=0.1)
    del out
    for h in hooks:
        h.remove()
    return total[0] / n, {k: v / n for k, v in by_block.items()}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def inference_peak_bytes(model, config, device, n: int) -> float:
    """Peak memory growth of one cond+null inference forward of n samples (2n rows)."""
    x, t, y = batch(config, n, device)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y])
    null = torch.tensor([False] * n + [True] * n, device=device)
    model.eval()
    with torch.no_grad():
        model(x2, t2, y=y2, clf_free=True, null=null)  # warm-up: masks, plans, allocator
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(x2, t2, y=y2, clf_free=True, null=null)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        base = rss_bytes("VmRSS")
        model(x2, t2, y=y2, clf_free=True, null=null)
        return rss_bytes("VmHWM") - base


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after one warm-up call.

    CPU time is the robust number on a shared machine: other processes inflate wall time.
    """
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, (time.process_time() - start_cpu) / repeats


def train_step_fn(model, config, device, n):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x, t, y = batch(config, n, device)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, t, y=y, threshold=0.1).square().mean().backward()
        opt.step()

    return step


def forward_fn(model, config, device, n):
    x, t, y = batch(config, n, device)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y])
    null = torch.tensor([False] * n + [True] * n, device=device)
    model.eval()

    def fwd():
        with torch.no_grad():
            model(x2, t2, y=y2, clf_free=True, null=null)

    return fwd


def largest_batch_under(budget: float, peak: Callable[[int], float]) -> int:
    """The largest batch n with ``peak(n) <= budget`` (0 if none), for a peak roughly linear in n.

    Batches 1 and 2 give the line; the prediction is confirmed by walking from it in small strides and bisecting the
    last stride, so a handful of calls suffice even when the line is only approximately right."""
    one = peak(1)
    if one > budget:
        return 0
    two = peak(2)
    if two > budget:
        return 1

    def fits(n: int) -> bool:
        return peak(n) <= budget

    per_sample = max(two - one, 1.0)
    guess = max(2, int((budget - (one - per_sample)) // per_sample))
    step = max(1, guess // 32)
    if fits(guess):  # the prediction holds: walk up in small strides until a step does not fit
        lo = guess
        while fits(lo + step):
            lo += step
        hi = lo + step
    else:  # too high: walk down until one fits (batch 2 does)
        hi, lo = guess, max(2, guess - step)
        while lo > 2 and not fits(lo):
            hi, lo = lo, max(2, lo - step)
    while hi - lo > 1:  # bisection inside the last stride
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_train_batch(variant, config, device, budget_bytes, impl, repeats: int = 2) -> tuple[int, float]:
    """(largest training batch whose step peaks under the budget, seconds per step at that batch); CUDA only.

    A step's peak memory is linear in the batch (weights and optimizer state plus activations per sample), so
    ``largest_batch_under`` needs about 5 steps instead of a doubling-then-bisection search's 12 or so (large, slow
    steps for the reference HAE variants)."""
    model = build(variant, config, device, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def peak(n: int) -> float:
        """Peak bytes of one step at batch n (inf when it does not fit in the device)."""
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            x, t, y = batch(config, n, device)
            opt.zero_grad(set_to_none=True)
            model.train()(x, t, y=y, threshold=0.1).square().mean().backward()
            opt.step()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        except torch.OutOfMemoryError:
            return float("inf")
        finally:
            opt.zero_grad(set_to_none=True)

    lo = largest_batch_under(budget_bytes, peak)
    if lo == 0:
        return 0, float("nan")
    torch.cuda.empty_cache()
    step = train_step_fn(model, config, device, lo)
    wall, _ = timed(step, device, repeats)
    return lo, wall


def translation_throughput(model, config, device, n: int, precision: str, repeats: int) -> dict:
    """Slices per second through one AnoFPDM forward step: a cond+null forward of 2n rows under autocast."""
    while n >= 1:
        try:
            fwd = forward_fn(model, config, device, n)

            def step():
                with runtime.autocast(device, precision):
                    fwd()

            wall, _ = timed(step, device, repeats)
            return {"batch": n, "step_s": wall, "slices_per_s": n / wall}
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            n //= 2
    return {"batch": 0, "step_s": float("nan"), "slices_per_s": 0.0}


def measure(variant: str, args) -> dict:
    config = SMALL if args.small else PRODUCTION
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        runtime.configure_cuda()  # the settings training and translation use (TF32 off, cuDNN autotuning on)
    model = build(variant, config, device, args.attention_impl)
    result = {"variant": variant, "attention_impl": model.attention_impl,
              "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    act, blocks = saved_activation_bytes(model, config, device, args.batch, args.per_block)
    result["activation_MiB_per_sample"] = act / MIB
    if args.per_block:
        result["per_block_MiB"] = {k: v / MIB for k, v in sorted(blocks.items(), key=lambda kv: -kv[1])}
    model.zero_grad(set_to_none=True)
    result["inference_peak_MiB_per_sample"] = inference_peak_bytes(model, config, device, args.batch) / MIB / args.batch
    wall, cpu = timed(train_step_fn(model, config, device, args.batch), device, args.repeats)
    result["train_step_s_per_sample"], result["train_step_cpu_s_per_sample"] = wall / args.batch, cpu / args.batch
    wall, cpu = timed(forward_fn(model, config, device, args.batch), device, args.repeats)
    result["forward_s_per_sample"], result["forward_cpu_s_per_sample"] = wall / args.batch, cpu / args.batch
    if args.translation_batch:
        result["translation"] = {p: translation_throughput(model, config, device, args.translation_batch, p, args.repeats)
                                 for p in args.precisions.split(",") if p}
    if device == "cuda" and args.budget_gib:
        del model
        torch.cuda.empty_cache()
        result["max_train_batch"], result["max_batch_step_s"] = max_train_batch(
            variant, config, device, args.budget_gib * 2 ** 30, args.attention_impl, args.repeats)
    return result


def machine() -> str:
    return f"{runtime.machine_description()}; {datetime.date.today().isoformat()}"


def child_args(argv: list[str]) -> list[str]:
    """The command line minus --json (only the parent writes it)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="64 px, 64 channels, 1 res block: a quick run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="samples per measurement (results are per sample)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention_impl", choices=["reference", "fused"], default=None,
                        help="override every variant's attention computation")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--per-block", dest="per_block", action="store_true")
    parser.add_argument("--budget-gib", dest="budget_gib", type=float, default=0.0,
                        help="CUDA: find the largest training batch under this memory budget")
    parser.add_argument("--translation-batch", dest="translation_batch", type=int, default=0,
                        help="slices per translation batch for the throughput measurement (0: skip it)")
    parser.add_argument("--precisions", default="fp32,bf16", help="precisions of the translation throughput")
    parser.add_argument("--child-timeout", dest="child_timeout", type=float, default=None,
                        help="seconds per variant (a variant that takes longer is reported as failed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print one table from --json files of earlier runs (measures nothing)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        runs = [json.loads(p.read_text()) for p in args.render if p.exists()]
        if not runs:
            parser.error("--render: none of the files exists")
        print(f"# {runs[0]['machine']}")
        report([r for run in runs for r in run["results"]], runs[0].get("budget_gib", 0.0),
               runs[0].get("precisions", []), False)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")

    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    print(f"# {'small' if args.small else 'production'} config on {machine()}", flush=True)
    results = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--child", variant] + child_args(sys.argv[1:])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            print(f"{variant}: timed out after {args.child_timeout} s", file=sys.stderr, flush=True)
            continue
        if proc.returncode:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  measured {variant}: {r['activation_MiB_per_sample']:.0f} MiB saved/sample", flush=True)

    report(results, args.budget_gib, _precisions(args), args.per_block)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "small": args.small, "budget_gib": args.budget_gib,
                                         "precisions": _precisions(args), "results": results}, indent=2))
    if len(results) < len(variants):
        sys.exit(1)  # a variant failed or timed out (reported above)


def _precisions(args) -> list[str]:
    return [p for p in args.precisions.split(",") if p] if args.translation_batch else []


def report(results: list[dict], budget_gib: float = 0.0, precisions: list[str] = (), per_block: bool = False) -> None:
    """The results table (markdown) and the Conservative ratios."""
    header = ("| variant | attention | params (M) | saved for backward (MiB/sample) | inference peak cond+null (MiB/sample) "
              "| train step wall / CPU (s/sample) | forward cond+null wall / CPU (s/sample) |")
    if any("max_train_batch" in r for r in results):
        header += f" max train batch ({budget_gib:g} GiB) / step s |"
    for p in precisions:
        header += f" translation {p}: slices/s per forward step (batch) |"
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        row = (f"| {r['variant']} | {r['attention_impl']} | {r['params_M']:.1f} | {r['activation_MiB_per_sample']:.0f} | "
               f"{r['inference_peak_MiB_per_sample']:.0f} | {r['train_step_s_per_sample']:.2f} / {r['train_step_cpu_s_per_sample']:.2f} | "
               f"{r['forward_s_per_sample']:.2f} / {r['forward_cpu_s_per_sample']:.2f} |")
        if any("max_train_batch" in x for x in results):
            row += f" {r['max_train_batch']} / {r['max_batch_step_s']:.2f} |" if "max_train_batch" in r else " – |"
        for p in precisions:
            tr = r.get("translation", {}).get(p)
            row += f" {tr['slices_per_s']:.3g} ({tr['batch']}) |" if tr else " – |"
        print(row)
    by = {r["variant"]: r for r in results}
    if "hae_v2" in by and "hae_v2_conservative" in by:
        c, v = by["hae_v2_conservative"], by["hae_v2"]
        print(f"\nConservative / HAE V2: activation memory {c['activation_MiB_per_sample'] / v['activation_MiB_per_sample']:.3f}, "
              f"train step time {c['train_step_s_per_sample'] / v['train_step_s_per_sample']:.3f} (wall), "
              f"{c['train_step_cpu_s_per_sample'] / v['train_step_cpu_s_per_sample']:.3f} (CPU)")
        if "v2" in by:
            print(f"Conservative / v2 UNet: activation memory "
                  f"{c['activation_MiB_per_sample'] / by['v2']['activation_MiB_per_sample']:.3f}")
    if per_block:
        for r in results:
            top = list(r["per_block_MiB"].items())[:6]
            print(f"\n{r['variant']} largest blocks (MiB/sample): " + ", ".join(f"{k} {v:.0f}" for k, v in top))


if __name__ == "__main__":
    main()
