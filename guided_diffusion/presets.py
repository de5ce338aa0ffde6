"""Named settings: the paper's (per data set, method and model), the quickstart's and the comparison's small ones.

A preset is flag values for the commands: ``anofpdm <command> --preset NAME`` starts from them and every flag given
on the command line overrides them. Values shared by every command come first; a command's own values (its
``--output``, its batch budget) override them for that command. ``anofpdm presets`` lists the presets and
``anofpdm presets NAME`` shows one. The shell configs ``config/run_*.sh`` launch commands over these presets.

The batch budgets are per process (``batch_per_process``: the global batch is that times the processes), taken
from the activation memory per slice of each UNet (``bench/memory_speed.py``): training v2 48 and
hae_v2_conservative 64 rows per GPU within the budget of upstream's hae_v2 configuration (14 rows), inference v2
256 and hae_v2_conservative 224 slices per GPU; hae, hae_lite and hae_v2 about as much as upstream's hae_v2 (14).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

COMMANDS = ("train", "train-classifier", "evaluate", "segment")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    values: Mapping[str, Any]  # for every command that has the flag
    by_command: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # a command's own values

    def for_command(self, command: str) -> Dict[str, Any]:
        return {**self.values, **self.by_command.get(command, {})}


# ---- data sets ------------------------------------------------------------------------------------------------
BRATS = {"name": "brats", "modality": [0, 3]}  # FLAIR and T2
ATLAS = {"name": "atlas", "modality": [0]}  # T1
PAPER_TEST = {"brats": {"test_slices": 10000, "val_slices": 1000}, "atlas": {"test_slices": 4000, "val_slices": 1000}}
TRAIN_EPOCHS = {"brats": 200, "atlas": 1000}
W = {"brats": 2.0, "atlas": 30.0}  # AnoFPDM's guidance weight (paper)

# ---- upstream's production model (128 px) ----------------------------------------------------------------------
PRODUCTION_MODEL = {
    "image_size": 128, "num_channels": 128, "num_res_blocks": 2, "channel_mult": "",
    "attention_resolutions": "32,16,8", "diffusion_steps": 1000, "noise_schedule": "linear",
    "rescale_learned_sigmas": False, "rescale_timesteps": False,
}
CLF_FREE = {"num_classes": 2, "clf_free": True, "learn_sigma": False}
TRAIN_BATCH = {"v2": 48, "hae_v2_conservative": 64, "hae_v2": 14}
EVAL_BATCH = {"v1": 256, "v2": 256, "hae_v2_conservative": 224, "hae_v2": 14}


def _suffix(unet_ver: str) -> str:
    return "" if unet_ver in ("v1", "v2") else f"_{unet_ver}"


def _prefix(dataset: str) -> str:
    return "atlas_" if dataset == "atlas" else ""


def anofpdm_model_dir(dataset: str, unet_ver: str) -> str:
    """Where the AnoFPDM presets train and evaluate: logs/[atlas_]clf_free_guided[_<unet_ver>]."""
    return f"logs/{_prefix(dataset)}clf_free_guided{_suffix(unet_ver)}"


def baseline_model_dir(dataset: str, model: str) -> str:
    """Where the baselines' presets train and evaluate: logs/[atlas_]{anoddpm_<noise>, clf_guided, clf}."""
    return f"logs/{_prefix(dataset)}{model}"


def _anofpdm(dataset: str, unet_ver: str) -> Preset:
    data = BRATS if dataset == "brats" else ATLAS
    model_dir = anofpdm_model_dir(dataset, unet_ver)
    return Preset(
        f"{dataset}-anofpdm-{unet_ver}",
        f"AnoFPDM on {dataset.upper() if dataset == 'atlas' else 'BraTS'} with the {unet_ver} UNet at the paper's "
        f"settings (w={W[dataset]:g}, 600 forward steps, DDIM encoding)",
        {**data, **PRODUCTION_MODEL, **CLF_FREE, "unet_ver": unet_ver, "seed": 0},
        {
            "train": {"output": model_dir, "batch_per_process": TRAIN_BATCH[unet_ver],
                      "total_epochs": TRAIN_EPOCHS[dataset], "save_interval": 5000, "threshold": 0.1, "dropout": 0.1,
                      "weight_decay": 0.0, "noise_type": "gaussian", "ret_lab": True, "mixed": True,
                      "w": [1.0, 1.8, 2.0, 3.0], "ddpm_sampling": False},
            "evaluate": {"method": "anofpdm", "model_dir": model_dir, "ema": True, "w": W[dataset],
                         "forward_steps": 600, "d_reverse": True, "null": True, "last_only": False,
                         "batch_per_process": EVAL_BATCH[unet_ver], **PAPER_TEST[dataset],
                         "output": f"logs/{dataset}-anofpdm-{unet_ver}"},
            "segment": {"method": "anofpdm", "model_dir": model_dir, "ema": True, "w": W[dataset],
                        "forward_steps": 600, "batch_size": 128,
                        "output": f"logs/segment_{dataset}-anofpdm-{unet_ver}"},
        },
    )


def _anoddpm(dataset: str, noise: str) -> Preset:
    data = BRATS if dataset == "brats" else ATLAS
    model_dir = baseline_model_dir(dataset, f"anoddpm_{noise}")
    return Preset(
        f"{dataset}-anoddpm-{noise}",
        f"AnoDDPM ({noise[0].upper()}) on {dataset}: unconditional v1 UNet trained on healthy slices, {noise} noise, "
        "DDPM reconstruction from S=200 (upstream's configs; its commented-out Gaussian setting used S=300)",
        {**data, **PRODUCTION_MODEL, "unet_ver": "v1", "num_classes": 0, "class_cond": False, "learn_sigma": False,
         "noise_type": noise, "seed": 0},
        {
            "train": {"output": model_dir, "batch_per_process": 64, "total_epochs": 1000, "save_interval": 5000,
                      "dropout": 0.0, "weight_decay": 0.0, "ret_lab": False, "mixed": False,
                      "n_unhealthy_patients": 0, "ddpm_sampling": True},
            "evaluate": {"method": "anoddpm", "model_dir": model_dir, "ema": True, "sample_steps": 200,
                         "use_ddpm": True, "batch_per_process": EVAL_BATCH["v1"], **PAPER_TEST[dataset],
                         "output": f"logs/{dataset}-anoddpm-{noise}"},
            "segment": {"method": "anoddpm", "model_dir": model_dir, "ema": True, "sample_steps": 200,
                        "batch_size": 128, "output": f"logs/segment_{dataset}-anoddpm-{noise}"},
        },
    )


def _clf_guided(dataset: str) -> Preset:
    data = BRATS if dataset == "brats" else ATLAS
    model_dir = baseline_model_dir(dataset, "clf_guided")
    clf_dir = baseline_model_dir(dataset, "clf")
    scale = 500.0 if dataset == "atlas" else 1000.0
    classifier = {"out_channels": 2, "classifier_width": 128, "classifier_depth": 2,
                  "classifier_attention_resolutions": "32,16,8", "classifier_pool": "attention",
                  "classifier_resblock_updown": True, "classifier_use_scale_shift_norm": True}
    return Preset(
        f"{dataset}-clf_guided",
        f"DDIM + classifier guidance on {dataset}: upstream's class-conditional v1 DM and noisy-image classifier, "
        f"S=200, s={scale:g} (train the DM with `train`, the classifier with `train-classifier`)",
        {**data, **PRODUCTION_MODEL, "unet_ver": "v1", "num_classes": 2, "class_cond": True, "clf_free": False,
         "learn_sigma": True, **classifier, "seed": 0},
        {
            "train": {"output": model_dir, "batch_per_process": 64 if dataset == "atlas" else 32,
                      "total_epochs": 1000, "save_interval": 5000 if dataset == "atlas" else 10000, "dropout": 0.0,
                      "weight_decay": 0.0, "ret_lab": True, "mixed": True, "noise_type": "gaussian",
                      "ddpm_sampling": False},
            "train-classifier": {"output": clf_dir, "batch_per_process": 64, "iterations": 250000,
                                 "save_interval": 5000 if dataset == "atlas" else 10000},
            "evaluate": {"method": "clf_guided", "model_dir": model_dir, "clf_dir": clf_dir, "ema": True,
                         "sample_steps": 200, "classifier_scale": scale, "batch_per_process": EVAL_BATCH["v1"],
                         **PAPER_TEST[dataset], "output": f"logs/{dataset}-clf_guided"},
            "segment": {"method": "clf_guided", "model_dir": model_dir, "clf_dir": clf_dir, "ema": True,
                        "sample_steps": 200, "classifier_scale": scale, "batch_size": 128,
                        "output": f"logs/segment_{dataset}-clf_guided"},
        },
    )


def _ddib(dataset: str) -> Preset:
    data = BRATS if dataset == "brats" else ATLAS
    w, steps = (1.3, 300) if dataset == "atlas" else (1.1, 450)
    model_dir = anofpdm_model_dir(dataset, "v2")
    return Preset(
        f"{dataset}-ddib",
        f"DDIB (DDIM classifier-free) on {dataset} with AnoFPDM's v2 checkpoint: S={steps}, w={w:g}",
        {**data, **PRODUCTION_MODEL, **CLF_FREE, "unet_ver": "v2", "seed": 0},
        {
            "evaluate": {"method": "ddib", "model_dir": model_dir, "ema": True, "w": w, "sample_steps": steps,
                         "batch_per_process": EVAL_BATCH["v2"], **PAPER_TEST[dataset],
                         "output": f"logs/{dataset}-ddib"},
            "segment": {"method": "ddib", "model_dir": model_dir, "ema": True, "w": w, "sample_steps": steps,
                        "batch_size": 128, "output": f"logs/segment_{dataset}-ddib"},
        },
    )


# ---- the quickstart: 32 px, a small hae_v2_conservative UNet, 2000 steps (docs/quickstart.md) ------------------
QUICKSTART_MODEL = {
    "unet_ver": "hae_v2_conservative", "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
    "attention_resolutions": "8", "diffusion_steps": 1000, "noise_schedule": "linear", **CLF_FREE,
}
QUICKSTART = Preset(
    "quickstart",
    "the quickstart: a 1.4 M-parameter hae_v2_conservative UNet trained 2000 steps on 32-px slices, AnoFPDM with "
    "w=2 over 30 forward steps of a 100-step grid, post-processing sized for 32 px",
    {**BRATS, **QUICKSTART_MODEL, "seed": 0},
    {
        "train": {"output": "runs/quickstart/model", "threshold": 0.1, "dropout": 0.0, "batch_size": 16, "lr": 3e-4,
                  "ema_rate": "0.995", "max_steps": 2000, "total_epochs": 100000, "save_interval": 250,
                  "log_interval": 50, "sample_shape": [4, 4, 32, 32], "w": [2.0], "preview_steps": 25,
                  "num_workers": 0},
        "evaluate": {"method": "anofpdm", "model_dir": "runs/quickstart/model", "ema": True, "w": 2.0,
                     "forward_steps": 30, "timestep_respacing": "ddim100", "d_reverse": True, "null": True,
                     "median_kernel": 3, "quantile_a": 0.93, "quantile_b": 0.99, "batch_size": 32,
                     "batch_size_val": 32, "num_batches": -1, "num_batches_val": -1, "num_panels": 8,
                     "output": "runs/quickstart/results"},
        "segment": {"method": "anofpdm", "model_dir": "runs/quickstart/model", "ema": True, "w": 2.0,
                    "forward_steps": 30, "timestep_respacing": "ddim100", "median_kernel": 3, "quantile_a": 0.93,
                    "quantile_b": 0.99, "batch_size": 32, "output": "runs/quickstart/segment"},
    },
)

PRESETS: Dict[str, Preset] = {p.name: p for p in [
    *(_anofpdm(d, v) for d in ("brats", "atlas") for v in ("v2", "hae_v2", "hae_v2_conservative")),
    *(_anoddpm(d, n) for d in ("brats", "atlas") for n in ("simplex", "gaussian")),
    *(_clf_guided(d) for d in ("brats", "atlas")),
    *(_ddib(d) for d in ("brats", "atlas")),
    QUICKSTART,
]}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not known; `anofpdm presets` lists them: {', '.join(PRESETS)}")
    return PRESETS[name]


def values_for(name: str, command: str) -> Dict[str, Any]:
    """The flag values preset ``name`` gives ``command``."""
    return get(name).for_command(command)


def names() -> List[str]:
    return list(PRESETS)
