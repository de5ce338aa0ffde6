"""Mutation testing of the core modules with mutmut 3, within CI-sized limits.

    pip install -e ".[mutation]"
    nice -n 10 python bench/mutation.py --module metrics          # one module
    nice -n 10 python bench/mutation.py --module all              # every module, one after the other

Per module it builds a scratch copy of the repository in ``.mutation/<module>/`` (git-ignored), writes a
``setup.cfg`` there that mutates only that module and selects only the test files that exercise it, and
runs ``mutmut run`` on a deterministic sample of the module's mutants: mutmut's own list of the file's
mutants in source order, every ``stride``-th one starting at the first (``--stride`` overrides the table;
``--stride 1`` runs them all). mutmut runs, for each mutant, only the selected tests that call the mutated
function (found by its stats run), with ``-x``, and stops a mutant after a CPU-time limit of
``2 · timeout_multiplier · (its tests' clean time + timeout_constant)`` (a timeout; it counts as killed
in the kill rate, as mutmut counts it).

It prints one row per module (killed / survived / timeout / no tests / total, kill rate) and writes
``.mutation/<module>.json`` (counts, the status of every mutant run) and ``.mutation/<module>/survivors.txt``
(the diff of every survivor, for review). After adding tests, ``--rerun-survivors`` reruns only the last
run's survivors of an unchanged module and updates its counts (tests only added can only kill more). Run it with ``OMP_NUM_THREADS=1`` (set here if unset) on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
SCRATCH = REPO / ".mutation"


@dataclass(frozen=True)
class Target:
    source: str  # the file mutated
    tests: Tuple[str, ...]  # the test files that exercise it (from their imports), and deselections
    stride: int  # run every stride-th mutant in mutmut's order


TARGETS: Dict[str, Target] = {
    "attention": Target(
        "guided_diffusion/models/attention.py",
        ("tests/models/test_attention_processors.py", "tests/models/test_reference_vectors.py", "tests/models/test_conservative.py"),
        2,
    ),
    "sparse_attention": Target(
        "guided_diffusion/models/sparse_attention.py",
        # test_attention_processors: the dense inference path (dense_masked_sdpa) against nn.MultiheadAttention
        ("tests/models/test_sparse_attention.py", "tests/models/test_sparse_dropout.py", "tests/models/test_attention_processors.py"),
        6,
    ),
    "anofpdm": Target(
        "guided_diffusion/methods/anofpdm/selection.py",
        ("tests/methods/test_anofpdm.py", "tests/methods/test_anofpdm_choices.py", "tests/methods/test_methods_models.py"),
        5,
    ),
    "anofpdm_maps": Target(
        "guided_diffusion/methods/anofpdm/maps.py",
        ("tests/methods/test_anofpdm.py", "tests/methods/test_anofpdm_choices.py", "tests/methods/test_forward_process_options.py"),
        3,
    ),
    "metrics": Target(
        "guided_diffusion/metrics.py",
        # test_segment: the per-volume metrics (volume_metrics, per_volume_metrics, mean_sd)
        ("tests/evaluation/test_metrics.py", "tests/evaluation/test_metrics_pooling.py", "tests/methods/test_anofpdm.py", "tests/evaluation/test_segment.py"),
        1,
    ),
    "train_util": Target(
        "guided_diffusion/training/train_util.py",
        (
            "tests/training/test_train.py",
            "tests/training/test_train_microbatch.py",
            "tests/training/test_objectives.py",
            # the two multi-process launches (75 s of the file's 85 s) would be every survivor's cost
            "--deselect=tests/training/test_train.py::test_two_gloo_processes_train_and_hold_identical_weights",
            "--deselect=tests/training/test_train.py::test_config_script_runs_on_cpu_with_torchrun_on_its_port",
        ),
        8,
    ),
    "preprocess": Target(
        "guided_diffusion/data/slices.py",  # the slices' computation (preprocess.py since its split is the run)
        ("tests/data/test_preprocess.py",),
        5,
    ),
}

# what the scratch copy needs besides the package and the tests (some tests read them)
COPIED = ("guided_diffusion", "tests", "pytest.ini", "scripts", "config", "bench")
TIMEOUT_MULTIPLIER = 3.0
TIMEOUT_CONSTANT = 5.0
STATUS_COLUMNS = ("killed", "survived", "timeout", "no tests", "other")


def _mutmut_bin() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        sys.exit('mutmut is not installed in this Python: pip install -e ".[mutation]"')
    return str(exe)


def _setup_cfg(target: Target) -> str:
    def listing(items: Sequence[str]) -> str:
        return "\n" + "\n".join(f"    {x}" for x in items)

    also_copy = [p for p in COPIED if p not in ("guided_diffusion", "tests")]
    return (
        "[mutmut]\n"
        "source_paths = guided_diffusion\n"
        f"only_mutate = {target.source}\n"
        f"pytest_add_cli_args_test_selection ={listing(target.tests)}\n"
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n"
        f"also_copy ={listing(also_copy)}\n"
        f"timeout_multiplier = {TIMEOUT_MULTIPLIER}\n"
        f"timeout_constant = {TIMEOUT_CONSTANT}\n"
        "use_git_change_detection = false\n"
        "track_dependencies = false\n"
    )


def _prepare(name: str, target: Target) -> Path:
    work = SCRATCH / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in COPIED:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, work / item)
    (work / "setup.cfg").write_text(_setup_cfg(target))
    return work


def _mutant_names(work: Path, target: Target) -> List[str]:
    """mutmut's names of the file's mutants, in the order it generates them."""
    code = (
        "from pathlib import Path\n"
        "from mutmut.mutation.file_mutation import mutate_file_contents\n"
        "from mutmut.utils.format_utils import get_mutant_name\n"
        f"p = Path({target.source!r})\n"
        "for n in mutate_file_contents(str(p), p.read_text()).mutant_names:\n"
        "    print(get_mutant_name(p, n))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, check=True, capture_output=True, text=True)
    return out.stdout.split()


def _statuses(work: Path, target: Target, keys: Sequence[str]) -> Dict[str, str]:
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / (target.source + ".meta")).read_text())
    codes = meta["exit_code_by_key"]
    return {key: status_by_exit_code[codes.get(key)] for key in keys}


def _write_diffs(work: Path, target: Target, keys: Sequence[str]) -> None:
    """survivors.txt: mutmut's diff of each surviving mutant (one process, not one ``mutmut show`` each)."""
    code = (
        "import sys\n"
        "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
        "for key in sys.argv[2:]:\n"
        "    print('# ' + key)\n"
        "    print(get_diff_for_mutant(key, path=sys.argv[1]) + '\\n')\n"
    )
    with open(work / "survivors.txt", "w") as f:
        subprocess.run([sys.executable, "-c", code, target.source, *keys], cwd=work, stdout=f, check=True)


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "guided_diffusion", "tests"], cwd=REPO,
                               capture_output=True, text=True).stdout
        return sha.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def _summary_path(name: str) -> Path:
    return SCRATCH / f"{name}.json"


def run_module(name: str, stride: int | None, max_children: int, rerun_survivors: bool = False) -> dict:
    target = TARGETS[name]
    source_sha = hashlib.sha256((REPO / target.source).read_bytes()).hexdigest()
    previous = None
    if rerun_survivors:
        if not _summary_path(name).exists():
            sys.exit(f"--rerun-survivors: no earlier run of {name} ({_summary_path(name)} is missing)")
        previous = json.loads(_summary_path(name).read_text())
        if previous["source_sha256"] != source_sha:
            sys.exit(f"--rerun-survivors: {target.source} changed since the run it would update; run it whole")
        stride = previous["stride"]
    stride = stride or target.stride
    commit = _git_commit()  # what is measured: the tree as copied now
    work = _prepare(name, target)
    names = _mutant_names(work, target)
    sample = names[::stride]
    to_run = sample
    if previous is not None:
        to_run = [k for k in sample if previous["status_by_key"][k] == "survived"]
        print(f"== {name}: rerunning the {len(to_run)} survivors of the run at {previous['commit']}", flush=True)
    else:
        print(f"== {name}: {target.source}, {len(names)} mutants, running every {stride}-th: {len(sample)}",
              flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # subprocesses of the tests import the mutated copy; the folder must exist before mutmut starts, or
    # Python caches "nothing here" for that sys.path entry and the tests import the installed package
    (work / "mutants").mkdir()
    env["PYTHONPATH"] = str(work / "mutants")
    start = time.time()
    log_path = work / "mutmut.log"
    status = dict(previous["status_by_key"]) if previous is not None else {}
    if to_run:
        with open(log_path, "w") as log:
            proc = subprocess.run([_mutmut_bin(), "run", "--max-children", str(max_children), *to_run],
                                  cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(f"mutmut run failed (exit {proc.returncode}); its output: {log_path}", file=sys.stderr)
            sys.exit(proc.returncode)
        status.update(_statuses(work, target, to_run))
    wall = time.time() - start
    counts = {c: 0 for c in STATUS_COLUMNS}
    for key in sample:
        counts[status[key] if status[key] in counts else "other"] += 1
    survivors = [k for k in sample if status[k] == "survived"]
    if to_run:
        _write_diffs(work, target, survivors)
    total = len(sample)
    summary = {
        "module": name,
        "source": target.source,
        "source_sha256": source_sha,
        "tests": list(target.tests),
        "mutants_in_file": len(names),
        "stride": stride,
        **counts,
        "total": total,
        "kill_rate": (counts["killed"] + counts["timeout"]) / total if total else float("nan"),
        "wall_s": round(wall, 1) + (previous["wall_s"] if previous is not None else 0.0),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end",
        "rerun_of": None if previous is None else {k: previous[k] for k in ("commit", "killed", "survived", "total")},
        "survivors": survivors,
        "status_by_key": status,
    }
    _summary_path(name).write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", required=True, choices=[*TARGETS, "all"],
                        help="module to mutate (repeatable; 'all' for every one)")
    parser.add_argument("--stride", type=int, default=None, help="run every N-th mutant (default: the table's)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (2)")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="rerun only the survivors of the module's last run (after adding tests; the others "
                             "stay killed, since added tests can only kill more) and update its counts")
    args = parser.parse_args(argv)
    if args.stride is not None and args.stride < 1:
        parser.error(f"--stride must be at least 1, got {args.stride}")
    modules = list(TARGETS) if "all" in args.module else list(dict.fromkeys(args.module))
    rows = [run_module(m, args.stride, args.max_children, args.rerun_survivors) for m in modules]
    header = f"{'module':<17}{'killed':>7}{'survived':>9}{'timeout':>8}{'no tests':>9}{'total':>6}{'kill rate':>10}{'wall':>8}"
    print(header)
    for r in rows:
        print(f"{r['module']:<17}{r['killed']:>7}{r['survived']:>9}{r['timeout']:>8}{r['no tests']:>9}"
              f"{r['total']:>6}{100 * r['kill_rate']:>9.1f}%{r['wall_s']:>7.0f}s")
    print(f"commit {rows[0]['commit']}, {rows[0]['date']}; sample: every stride-th mutant in mutmut's order")


if __name__ == "__main__":
    main()
