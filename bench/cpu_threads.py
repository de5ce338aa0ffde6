"""Training-step time under each CPU thread setting, on an idle CPU and on one shared with busy processes.

    python bench/cpu_threads.py                    # idle machine: every setting, no hog
    python bench/cpu_threads.py --hogs 2           # plus 2 busy-looping processes started by the benchmark
    python bench/cpu_threads.py --json out.json --steps 5

Each setting runs in a fresh process, because OpenMP reads ``OMP_WAIT_POLICY`` (and torch its thread pool
size from ``OMP_NUM_THREADS``) when torch is imported: the launchers must set them before Python starts.
Settings: threads 1 .. the core count, each with the OpenMP default wait policy and with ``PASSIVE``, plus
``auto`` = what the launchers and entry points choose (``OMP_WAIT_POLICY=PASSIVE`` and the free cores, i.e. the
cores minus the load average, decided while the hogs run).
A step is forward + backward + AdamW on the quickstart's model (hae_v2_conservative, 32 px, 32 channels,
batch 16); per setting the median over ``--steps`` steps after one warm-up step, wall and CPU time (with
``--rounds N``: the median of N interleaved runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_MODEL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                        attention_resolutions="8", in_channels=4, num_classes=2, class_cond=True,
                        unet_ver="hae_v2_conservative", use_hae=True)


def _child(steps: int, batch: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **QUICKSTART_MODEL})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, 32, 32)
    y = torch.arange(batch) % 2

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        opt.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x, t, model_kwargs={"y": y, "threshold": 0.1})["loss"].mean().backward()
        opt.step()

    step()  # warm-up
    walls, cpus = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"threads": torch.get_num_threads(), "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "wall_max_s": max(walls)}


def _hog() -> None:  # a CPU-bound neighbour
    while True:
        pass


def auto_env() -> dict:
    """What the launchers and entry points choose: OMP_WAIT_POLICY=PASSIVE (config/_common.sh, guided_diffusion
    /__init__.py) and the free cores (guided_diffusion.runtime.configure_threads), decided now."""
    sys.path.insert(0, str(REPO))
    from guided_diffusion.runtime import free_cores

    return {"OMP_NUM_THREADS": str(free_cores()), "OMP_WAIT_POLICY": "PASSIVE"}


def run_setting(env_over: dict, steps: int, batch: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env.update(env_over)
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--batch", str(batch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"setting {env_over} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(env_over: dict) -> str:
    extra = [f"{k}={v}" for k, v in env_over.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "auto")]
    return ("auto: " if "auto" in env_over else "") + (
        f"{env_over.get('OMP_NUM_THREADS', 'default')} thread(s), wait policy "
        f"{env_over.get('OMP_WAIT_POLICY', 'default')}") + "".join(f", {e}" for e in extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hogs", type=int, default=0, help="busy-looping processes running during the measurement")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every setting this many times, interleaved, and report the medians (a shared "
                        "machine's load drifts; interleaving keeps the comparison fair)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max_threads", type=int, default=0, help="largest thread count tried (0: the core count)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per setting")
    p.add_argument("--setting", action="append", default=[], metavar="K=V,K=V",
                   help="measure only these environments (repeatable), e.g. OMP_NUM_THREADS=2,GOMP_SPINCOUNT=10000")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.steps, args.batch)))
        return

    cores = os.cpu_count() or 1
    settings = []
    for n in range(1, (args.max_threads or cores) + 1):
        settings.append({"OMP_NUM_THREADS": str(n)})
        settings.append({"OMP_NUM_THREADS": str(n), "OMP_WAIT_POLICY": "PASSIVE"})
    if args.setting:
        settings = [dict(kv.split("=", 1) for kv in s.split(",")) for s in args.setting]
    hogs = [mp.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    time.sleep(2 if hogs else 0)
    load = os.getloadavg()[0]
    results = []
    try:
        auto = auto_env()  # decided with the hogs running, as a launcher would
        todo = settings + ([] if args.setting else [dict(auto, auto="1")])
        runs = {i: [] for i in range(len(todo))}
        for round_ in range(args.rounds):
            for i, env_over in enumerate(todo):
                r = run_setting({k: v for k, v in env_over.items() if k != "auto"}, args.steps, args.batch,
                                args.timeout)
                runs[i].append(r)
                print(f"  round {round_ + 1} {_label(env_over):<45} wall {r['wall_s']:7.3f} s  CPU {r['cpu_s']:7.3f} s",
                      flush=True)
        for i, env_over in enumerate(todo):
            results.append({"setting": _label(env_over), "threads": runs[i][0]["threads"],
                            "wall_s": statistics.median(r["wall_s"] for r in runs[i]),
                            "cpu_s": statistics.median(r["cpu_s"] for r in runs[i]),
                            "wall_s_runs": [r["wall_s"] for r in runs[i]]})
    finally:
        for h in hogs:
            h.terminate()
            h.join()
    from guided_diffusion.runtime import cpu_name

    cpu = cpu_name()
    import torch

    machine = (f"{cpu}, {cores} cores; {args.hogs} busy process(es) started by the benchmark; load average "
               f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at the end; {args.rounds} round(s) of {args.steps} "
               f"steps; torch {torch.__version__}; {datetime.date.today().isoformat()}")
    print(f"# {machine}")
    print("| setting | step wall (s) | step CPU (s) | wall per round (s) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{', '.join(f'{w:.2f}' for w in r['wall_s_runs'])} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "hogs": args.hogs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
