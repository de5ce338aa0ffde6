"""The ``anofpdm`` command: one entry point with a subcommand per job.

    anofpdm synth --output raw                 # BraTS-like synthetic subjects (NIfTI)
    anofpdm preprocess --source raw --output data --image_size 32
    anofpdm train --preset quickstart --data_dir data --output model
    anofpdm evaluate --preset quickstart --data_dir data --model_dir model --output results
    anofpdm segment --preset quickstart --input raw/BraTS2021_00000 --hyperparams_file results/hyperparams.json ...
    anofpdm presets                            # the named settings (the paper's, the quickstart's)

``anofpdm <command> --help`` lists a command's flags (``evaluate --method NAME --help``: that method's).
``python -m guided_diffusion <command>`` and ``torchrun ... -m guided_diffusion <command>`` run the same.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Sequence

#: subcommand -> (module under guided_diffusion.commands, one line for the overview)
COMMANDS = {
    "quickstart": ("quickstart", "the whole pipeline at a small size, from an empty folder to metrics"),
    "synth": ("synth", "write BraTS-like synthetic subjects (NIfTI) built from the MNI152 templates"),
    "preprocess": ("preprocess", "BraTS 2021 / ATLAS v2.0 NIfTI volumes -> the slice format (npy_{train,val,test})"),
    "train": ("train", "train a diffusion UNet (AnoFPDM's classifier-free model, or a baseline's)"),
    "train-classifier": ("train_classifier", "train the noisy-image classifier of classifier-guided DDIM"),
    "evaluate": ("evaluate", "a method on the validation and test slices: Dice / IoU / AUPRC, pictures"),
    "segment": ("segment", "whole NIfTI volumes in, anomaly map and mask NIfTI on each scan's grid out"),
    "compare": ("compare", "the paper's comparison table of every method, at a small size"),
    "presets": ("presets", "list the named settings, or show one"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [__doc__.strip().splitlines()[0], "", "usage: anofpdm <command> [flags]   (anofpdm <command> --help)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


#: commands whose ``main`` returns an exit code (the others return their result: a final step, a summary)
EXIT_CODES = {"synth", "preprocess", "segment", "compare", "presets", "quickstart"}


def run(name: str, argv: Sequence[str], prog: Optional[str] = None, **kwargs: Any) -> int:
    """Run subcommand ``name`` with ``argv``; its exit code (user errors exit 2 with one message)."""
    module = importlib.import_module(f"guided_diffusion.commands.{COMMANDS[name][0]}")
    result = module.main(list(argv), prog=prog or f"anofpdm {name}", **kwargs)
    return int(result or 0) if name in EXIT_CODES else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"anofpdm: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:])
