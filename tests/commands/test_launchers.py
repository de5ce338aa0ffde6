"""The shell launchers in config/: thin wrappers that run `anofpdm <command> --preset <name>` (dry run) for one and
several nodes, SLURM, the variables they turn into flags, and paths relative to the caller."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from guided_diffusion import presets

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (REPO / "config").glob("run_t*.sh")) + ["run_segment.sh"]


def dry_run(config: str, *args: str, cwd: str = "/", **env: str) -> tuple:
    """(stdout command lines split into words, stderr) of ``DRY_RUN=1 bash config/<config> args``."""
    full = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                               "NUM_GPUS", "CPU_PROCS", "CUDA_VISIBLE_DEVICES",
                                                               "OPENAI_LOGDIR", "OUT_DIR")}
    full.update(DRY_RUN="1", PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(REPO / "config" / config), *args], env=full, capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()], proc.stderr


def option(words: list, name: str) -> str:
    return words[words.index(name) + 1]


def after_module(cmd: list) -> list:
    """The command's part from ``-m guided_diffusion`` on."""
    i = cmd.index("-m", cmd.index("-m") + 1) if cmd.count("-m") > 1 else cmd.index("-m")
    return cmd[i:]


def test_two_node_training_command():
    (cmd,), err = dry_run("run_train_brats_clf_free_guided_hae_v2_conservative.sh", "--max_steps", "10",
                          NNODES="2", NODE_RANK="1", MASTER_ADDR="node0.cluster", NUM_GPUS="4")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert (option(cmd, "--nnodes"), option(cmd, "--node-rank"), option(cmd, "--nproc-per-node")) == ("2", "1", "4")
    assert (option(cmd, "--master-addr"), option(cmd, "--master-port")) == ("node0.cluster", "12362")
    tail = after_module(cmd)
    assert tail[:5] == ["-m", "guided_diffusion", "train", "--preset", "brats-anofpdm-hae_v2_conservative"]
    assert cmd.index("-m", 3) == cmd.index("--master-port") + 2  # torchrun's options, then the module and its flags
    assert cmd[-2:] == ["--max_steps", "10"]  # the caller's arguments come last and override
    assert "--batch_size" not in cmd  # the global batch is the preset's per-process budget x processes, in Python
    assert "2 node(s) x 4 process(es)" in err


def test_one_cpu_process_is_plain_python():
    (cmd,), err = dry_run("run_train_ATLAS_clf_free_guided.sh", CUDA_VISIBLE_DEVICES="")
    assert cmd[:5] == [sys.executable, "-m", "guided_diffusion", "train", "--preset"] and "no GPU visible" in err
    assert option(cmd, "--preset") == "atlas-anofpdm-v2"
    (two,), _ = dry_run("run_train_ATLAS_clf_free_guided.sh", CUDA_VISIBLE_DEVICES="", CPU_PROCS="2")
    assert option(two, "--nproc-per-node") == "2" and option(two, "--nnodes") == "1"


def test_variables_become_flags_and_relative_paths_stay_the_callers(tmp_path):
    (cmd,), _ = dry_run("run_translation_brats_fpdm_hae_v2_conservative.sh", cwd=str(tmp_path), NUM_GPUS="1",
                        DATA_DIR="data32", MODEL_DIR="model", OUT_DIR="results", MODEL_NUM="1000", MODALITY="0 3",
                        BATCH_PER_GPU="32", W="2")
    assert option(cmd, "--data_dir") == "data32" and option(cmd, "--model_dir") == "model"  # resolved by Python in
    assert option(cmd, "--output") == "results" and option(cmd, "--model_num") == "1000"  # the caller's folder
    assert cmd[cmd.index("--modality") + 1:cmd.index("--modality") + 3] == ["0", "3"]
    assert option(cmd, "--batch_per_process") == "32" and option(cmd, "--w") == "2"
    assert not (REPO / "results").exists() and not (tmp_path / "results").exists()  # a dry run writes nothing
    sweep, _ = dry_run("run_translation_brats_fpdm.sh", NUM_GPUS="1", W="1 3", OUT_DIR="out")
    assert [option(c, "--w") for c in sweep] == ["1", "3"]  # one run per guidance weight
    assert [c[-1] for c in sweep] == ["out/w_1", "out/w_3"] and all(c[-2] == "--output" for c in sweep)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_names_a_preset_and_its_own_port(config):
    (cmd,), _ = dry_run(config, NUM_GPUS="8")
    text = (REPO / "config" / config).read_text()
    port = text.split("MASTER_PORT:-")[1].split("}")[0]
    assert option(cmd, "--master-port") == port and option(cmd, "--nproc-per-node") == "8"
    assert option(cmd, "--preset") in presets.PRESETS
    tail = after_module(cmd)
    assert tail[2] in ("train", "train-classifier", "evaluate", "segment")
    assert tail[2] in presets.get(option(cmd, "--preset")).by_command or tail[2] == "train-classifier"
    code = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert len(code) <= 2  # a short wrapper: the settings are the preset's, the rest is config/_launch.sh


def test_ports_are_distinct():
    ports = [(REPO / "config" / c).read_text().split("MASTER_PORT:-")[1].split("}")[0] for c in CONFIGS]
    assert len(set(ports)) == len(ports)


def test_noise_type_picks_the_anoddpm_preset():
    (cmd,), _ = dry_run("run_translation_ATLAS_anoddpm.sh", NUM_GPUS="1", NOISE_TYPE="gaussian")
    assert option(cmd, "--preset") == "atlas-anoddpm-gaussian" and option(cmd, "--noise_type") == "gaussian"
    (cmd,), _ = dry_run("run_train_brats_anoddpm.sh", NUM_GPUS="1")
    assert option(cmd, "--preset") == "brats-anoddpm-simplex"


def test_slurm_example_starts_one_torchrun_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stand-ins for SLURM: srun runs its command once per node with that node's SLURM_NODEID
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\n'
                                  'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit 1; done\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho gpu-a17; echo gpu-a18\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    lines, _ = dry_run("slurm.sbatch", "config/run_translation_brats_fpdm_hae_v2_conservative.sh", "--num_batches", "3",
                       PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2",
                       SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_SUBMIT_DIR=str(REPO), NUM_GPUS="4")
    assert len(lines) == 2
    for rank, cmd in enumerate(lines):
        assert (option(cmd, "--nnodes"), option(cmd, "--node-rank")) == ("2", str(rank))
        assert option(cmd, "--master-addr") == "gpu-a17" and option(cmd, "--nproc-per-node") == "4"
        assert option(cmd, "--preset") == "brats-anofpdm-hae_v2_conservative" and cmd[-2:] == ["--num_batches", "3"]
    text = (REPO / "config" / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "srun" in text


def test_launcher_files_parse():
    for f in list((REPO / "config").glob("*.sh")) + [REPO / "config" / "slurm.sbatch"]:
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f


def test_quickstart_leaves_the_port_to_python_unless_given(tmp_path):
    # two quickstarts side by side each pick a free port for their evaluation processes; a default 29500 exported
    # by the shell made the second one fail with EADDRINUSE
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\necho \"MASTER_PORT=${MASTER_PORT:-unset}\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(PYTHON=str(fake), INSTALL="never")
    script = str(REPO / "config" / "run_quickstart.sh")
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MASTER_PORT=unset"
    env["MASTER_PORT"] = "31234"
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MASTER_PORT=31234"
