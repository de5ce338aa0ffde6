"""The shell launchers in config/: the torchrun command (dry run) for one and several nodes, SLURM, model flags."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "config").glob("run_t*.sh"))


def dry_run(config: str, *args: str, **env: str) -> tuple:
    """(stdout command lines split into words, stderr) of ``DRY_RUN=1 bash config/<config> args``."""
    full = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                               "NUM_GPUS", "CPU_PROCS", "CUDA_VISIBLE_DEVICES")}
    full.update(DRY_RUN="1", PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(REPO / "config" / config), *args], env=full, capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()], proc.stderr


def option(words: list, name: str) -> str:
    return words[words.index(name) + 1]


def test_two_node_training_command():
    (cmd,), err = dry_run("run_train_brats_clf_free_guided_hae_v2_conservative.sh", "--max_steps", "10",
                          NNODES="2", NODE_RANK="1", MASTER_ADDR="node0.cluster", NUM_GPUS="4")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert (option(cmd, "--nnodes"), option(cmd, "--node-rank"), option(cmd, "--nproc-per-node")) == ("2", "1", "4")
    assert (option(cmd, "--master-addr"), option(cmd, "--master-port")) == ("node0.cluster", "12362")
    script = cmd.index("scripts/train_hae_v2_conservative.py")
    assert script == cmd.index("--master-port") + 2  # torchrun's options, then the script and its flags
    assert option(cmd, "--batch_size") == str(64 * 4 * 2)  # global batch: per GPU x GPUs x nodes
    assert option(cmd, "--unet_ver") == "hae_v2_conservative" and option(cmd, "--use_hae") == "True"
    assert cmd[-2:] == ["--max_steps", "10"]  # the caller's arguments come last and override
    assert "2 node(s) x 4 process(es), global batch 512" in err


def test_one_cpu_process_is_plain_python_and_the_model_flags_are_shared():
    (cmd,), err = dry_run("run_train_ATLAS_clf_free_guided.sh", CUDA_VISIBLE_DEVICES="")
    assert cmd[:2] == [sys.executable, "scripts/train.py"] and "no GPU visible" in err
    assert (option(cmd, "--in_channels"), option(cmd, "--name"), option(cmd, "--batch_size")) == ("1", "atlas", "48")
    (two,), _ = dry_run("run_train_ATLAS_clf_free_guided.sh", CUDA_VISIBLE_DEVICES="", CPU_PROCS="2")
    assert option(two, "--nproc-per-node") == "2" and option(two, "--nnodes") == "1"
    # the model flags of training and of translation (folder without config.json) come from one list
    (trans,), _ = dry_run("run_translation_ATLAS_fpdm.sh", NUM_GPUS="1", MODEL_DIR="/nonexistent")
    model_flags = ("--unet_ver", "--use_hae", "--image_size", "--in_channels", "--num_classes", "--num_channels",
                   "--num_res_blocks", "--channel_mult", "--attention_resolutions", "--diffusion_steps",
                   "--noise_schedule", "--learn_sigma")
    assert [option(cmd, f) for f in model_flags] == [option(trans, f) for f in model_flags]
    text = (REPO / "config" / "run_quickstart.sh").read_text()
    assert "source config/_model_flags.sh" in text and "--num_channels" not in text


def test_translation_with_config_json_passes_no_model_flags(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"format": "guided_diffusion run config"}))
    (cmd,), _ = dry_run("run_translation_brats_fpdm_hae_v2_conservative.sh", NUM_GPUS="2", NNODES="2",
                        MODEL_DIR=str(model_dir), W="2")
    assert "--unet_ver" not in cmd and "--num_channels" not in cmd and "--image_size" not in cmd
    assert option(cmd, "--model_dir") == str(model_dir) and option(cmd, "--w") == "2"
    assert option(cmd, "--batch_size") == str(224 * 2 * 2) and option(cmd, "--master-port") == "12364"
    sweep, _ = dry_run("run_translation_brats_fpdm.sh", NUM_GPUS="1", MODEL_DIR=str(model_dir), W="1 3")
    assert [option(c, "--w") for c in sweep] == ["1", "3"]  # one run per guidance weight


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_prints_a_command_on_its_own_port(config):
    (cmd,), _ = dry_run(config, NUM_GPUS="8")
    text = (REPO / "config" / config).read_text()
    port = text.split("MASTER_PORT:-")[1].split("}")[0]
    assert option(cmd, "--master-port") == port and option(cmd, "--nproc-per-node") == "8"
    variant = text.split("UNET_VER=")[1].split()[0]
    baseline_v1 = variant == "v1" and any(b in config for b in ("anoddpm", "clf_guided", "_clf."))  # the baselines' own
    assert variant in config or (variant == "v2" and "hae" not in config) or baseline_v1
    assert len(text.splitlines()) <= 6  # a short wrapper: the launcher holds the rest


def test_ports_are_distinct():
    ports = [(REPO / "config" / c).read_text().split("MASTER_PORT:-")[1].split("}")[0] for c in CONFIGS]
    assert len(set(ports)) == len(ports)


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
        assert "scripts/translation_FPDM_hae_v2_conservative.py" in cmd and cmd[-2:] == ["--num_batches", "3"]
    text = (REPO / "config" / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "srun" in text


def test_launcher_files_parse():
    for f in list((REPO / "config").glob("*.sh")) + [REPO / "config" / "slurm.sbatch"]:
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f


@pytest.mark.parametrize("config, method, flags", [
    ("run_translation_brats_anoddpm.sh", "anoddpm", {"--sample_steps": "200", "--noise_type": "simplex",
                                                     "--use_ddpm": "True", "--num_classes": "0",
                                                     "--class_cond": "False", "--unet_ver": "v1"}),
    ("run_translation_ATLAS_clf_guided.sh", "clf_guided", {"--classifier_scale": "500", "--sample_steps": "200",
                                                          "--clf_free": "False", "--learn_sigma": "True",
                                                          "--in_channels": "1", "--modality": "0"}),
    ("run_translation_brats_ddib.sh", "ddib", {"--w": "1.1", "--sample_steps": "450", "--legacy_ddib": "False",
                                              "--unet_ver": "v2", "--clf_free": "True"}),
    ("run_translation_ATLAS_ddib.sh", "ddib", {"--w": "1.3", "--sample_steps": "300"}),
])
def test_baseline_configs_pass_upstreams_settings(config, method, flags):
    (cmd,), err = dry_run(config, NUM_GPUS="1")
    script = {"anoddpm": "scripts/translation_HEALTHY.py", "clf_guided": "scripts/translation_CLF.py",
              "ddib": "scripts/translation_DDIB.py"}[method]
    assert script in cmd
    for flag, value in flags.items():
        assert option(cmd, flag) == value, flag
    assert option(cmd, "--num_batches_val") != "0"  # the threshold is tuned on validation slices
    if method == "clf_guided":
        assert option(cmd, "--clf_dir").endswith("atlas_clf")
    sweep, _ = dry_run(config, NUM_GPUS="1", SWEEP="3 5")  # one run per value of the swept setting
    name = {"anoddpm": "--sample_steps", "clf_guided": "--classifier_scale", "ddib": "--w"}[method]
    assert [option(c, name) for c in sweep] == ["3", "5"]
    assert len({option(c, "--image_dir") for c in sweep}) == 2


# ---- the baselines' training configs: upstream's flags (upstream config/run_train_*_{anoddpm,clf,clf_guided}.sh) ----

def flag_values(cmd: list, flags: dict) -> dict:
    return {f: (" ".join(cmd[cmd.index(f) + 1:cmd.index(f) + 5]) if f == "--sample_shape" else option(cmd, f))
            for f in flags}


ANODDPM = {"--unet_ver": "v1", "--num_classes": "0", "--class_cond": "False", "--ret_lab": "False", "--mixed": "False",
           "--n_unhealthy_patients": "0", "--image_size": "128", "--num_channels": "128",
           "--attention_resolutions": "32,16,8", "--learn_sigma": "False", "--dropout": "0", "--diffusion_steps": "1000",
           "--noise_schedule": "linear", "--batch_size": "64", "--total_epochs": "1000", "--save_interval": "5000",
           "--ddpm_sampling": "True"}
CLF = {"--unet_ver": "v1", "--image_size": "128", "--out_channels": "2", "--classifier_attention_resolutions": "32,16,8",
       "--classifier_depth": "2", "--classifier_width": "128", "--classifier_pool": "attention",
       "--classifier_resblock_updown": "True", "--classifier_use_scale_shift_norm": "True", "--batch_size": "64",
       "--iterations": "250000"}
CLF_GUIDED = {"--unet_ver": "v1", "--num_classes": "2", "--class_cond": "True", "--ret_lab": "True", "--mixed": "True",
              "--clf_free": "False", "--learn_sigma": "True", "--image_size": "128", "--num_channels": "128",
              "--attention_resolutions": "32,16,8"}


@pytest.mark.parametrize("dataset, channels", [("brats", "4"), ("ATLAS", "1")])
def test_baseline_training_configs_pass_upstreams_flags(dataset, channels):
    name = dataset.lower()
    # AnoDDPM (S) by default, (G) with NOISE_TYPE=gaussian; healthy slices only; no label drop
    for noise in ("simplex", "gaussian"):
        env = {} if noise == "simplex" else {"NOISE_TYPE": "gaussian"}
        (cmd,), err = dry_run(f"run_train_{dataset}_anoddpm.sh", NUM_GPUS="1", **env)
        assert "scripts/train.py" in cmd and "--threshold" not in cmd
        expected = {**ANODDPM, "--noise_type": noise, "--in_channels": channels, "--name": name,
                    "--sample_shape": f"12 {channels} 128 128"}
        assert flag_values(cmd, expected) == expected
    # the noisy-image classifier
    (cmd,), _ = dry_run(f"run_train_{dataset}_clf.sh", NUM_GPUS="1")
    assert "scripts/train_classifier.py" in cmd
    for absent in ("--threshold", "--w", "--noise_type", "--total_epochs", "--sample_shape", "--num_channels"):
        assert absent not in cmd, absent  # not flags of the classifier's command line
    save = "10000" if dataset == "brats" else "5000"
    expected = {**CLF, "--in_channels": channels, "--save_interval": save, "--name": name}
    assert flag_values(cmd, expected) == expected
    # the class-conditional DM the classifier guides
    (cmd,), _ = dry_run(f"run_train_{dataset}_clf_guided.sh", NUM_GPUS="1")
    assert "scripts/train.py" in cmd and "--threshold" not in cmd
    expected = {**CLF_GUIDED, "--in_channels": channels, "--save_interval": save, "--name": name,
                "--batch_size": "32" if dataset == "brats" else "64", "--sample_shape": f"12 {channels} 128 128"}
    assert flag_values(cmd, expected) == expected


def test_baseline_training_on_several_gpus_nodes_and_the_cpu():
    # the global batch is per GPU x GPUs x nodes, the port is the config's, the caller's flags come last
    (cmd,), err = dry_run("run_train_brats_clf_guided.sh", "--lr", "2e-5", NUM_GPUS="2", NNODES="2", NODE_RANK="1",
                          MASTER_ADDR="node0")
    assert (option(cmd, "--nnodes"), option(cmd, "--node-rank"), option(cmd, "--master-port")) == ("2", "1", "12376")
    assert option(cmd, "--batch_size") == str(32 * 2 * 2) and cmd[-2:] == ["--lr", "2e-5"]
    assert "training clf_guided v1 on brats: 2 node(s) x 2 process(es), global batch 128" in err
    (cmd,), _ = dry_run("run_train_brats_anoddpm.sh", NUM_GPUS="2", BATCH_PER_GPU="32")  # upstream's 64 over 2 GPUs
    assert option(cmd, "--batch_size") == "64"
    # no GPU: one plain python process
    (cmd,), err = dry_run("run_train_ATLAS_clf.sh", CUDA_VISIBLE_DEVICES="")
    assert cmd[:2] == [sys.executable, "scripts/train_classifier.py"] and "no GPU visible" in err


@pytest.mark.parametrize("dataset", ["brats", "ATLAS"])
def test_baseline_training_folders_are_where_the_translation_configs_look(dataset, tmp_path):
    """Each training config's OPENAI_LOGDIR (its --image_dir's parent) is the folder its translation config reads."""
    root = str(tmp_path / "logs")

    def train_dir(config: str, **env: str) -> str:
        (cmd,), _ = dry_run(config, NUM_GPUS="1", LOG_ROOT=root, **env)
        image_dir = option(cmd, "--image_dir")
        assert os.path.basename(image_dir) == "images"
        return os.path.dirname(image_dir)

    def translation(config: str, **env: str) -> list:
        (cmd,), _ = dry_run(config, NUM_GPUS="1", LOG_ROOT=root, **env)
        return cmd

    prefix = "" if dataset == "brats" else "atlas_"
    for noise in ("simplex", "gaussian"):
        written = train_dir(f"run_train_{dataset}_anoddpm.sh", NOISE_TYPE=noise)
        assert written == os.path.join(root, f"{prefix}anoddpm_{noise}")  # upstream's own configs disagreed here
        assert option(translation(f"run_translation_{dataset}_anoddpm.sh", NOISE_TYPE=noise), "--model_dir") == written
    cmd = translation(f"run_translation_{dataset}_clf_guided.sh")
    assert option(cmd, "--model_dir") == train_dir(f"run_train_{dataset}_clf_guided.sh") == \
        os.path.join(root, f"{prefix}clf_guided")
    assert option(cmd, "--clf_dir") == train_dir(f"run_train_{dataset}_clf.sh") == os.path.join(root, f"{prefix}clf")
    # DDIB reads AnoFPDM's classifier-free checkpoints
    assert option(translation(f"run_translation_{dataset}_ddib.sh"), "--model_dir") == \
        train_dir(f"run_train_{dataset}_clf_free_guided.sh")
