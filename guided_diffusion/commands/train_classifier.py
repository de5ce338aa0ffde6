"""``anofpdm train-classifier``: train the noisy-image classifier that guides classifier-guided DDIM.

Upstream's classifier (``EncoderUNetModel``) on preprocessed slices with their slice labels (healthy 0 /
unhealthy 1): x_t = q_sample(x0, t) with t uniform (``--noised true``), cross-entropy, AdamW. The output folder gets
checkpoints and config.json (kind "classifier"); a rerun continues. Example:

    anofpdm train-classifier --preset brats-clf_guided --data_dir data/brats128 --output logs/clf
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence, Set

from guided_diffusion import dist_util
from guided_diffusion.architecture import ClassifierSettings, DiffusionSettings
from guided_diffusion.commands import common
from guided_diffusion.data.loaders import data_shape
from guided_diffusion.errors import entry_point
from guided_diffusion.flags import add_options, build, output_folder
from guided_diffusion.training.settings import (
    ClassifierTrainingSettings,
    ClassifierTrainSettings,
    LoopSettings,
    TrainDataSettings,
)

COMMAND = "train-classifier"
# upstream's train_classifier.py defaults where they differ from the diffusion training's
LOOP_DEFAULTS = {"lr": 3e-4, "batch_size": 4, "ema_rate": "", "save_interval": 5000}


def create_parser(preset: Optional[Dict[str, Any]] = None,
                  prog: str = "anofpdm train-classifier") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    common.add_preset_flag(p)
    known: Set[str] = {"preset"}
    add_options(p.add_argument_group("data"), TrainDataSettings, known=known, exclude=("ret_lab",))
    common.add_output_flag(p, "checkpoints and config.json (default: $OPENAI_LOGDIR, else runs/train_classifier); "
                              "a rerun into it continues")
    known.add("output")
    add_options(p.add_argument_group("optimisation"), LoopSettings, known=known, defaults=LOOP_DEFAULTS)
    add_options(p.add_argument_group("classifier training"), ClassifierTrainingSettings, known=known)
    add_options(p.add_argument_group("classifier"), ClassifierSettings, known=known)
    add_options(p.add_argument_group("diffusion (the noise the classifier sees)"), DiffusionSettings, known=known)
    p.add_argument("--unet_ver", default="v1", choices=["v1"], help=argparse.SUPPRESS)  # upstream's configs pass it
    if preset:
        common.apply_defaults(p, preset)
    return p


def settings_from_flags(values: Dict[str, Any], given: Set[str], world: int = 1) -> ClassifierTrainSettings:
    data = build(TrainDataSettings, values)
    classifier = build(ClassifierSettings, values)
    if not classifier.resolved:
        channels, size = data_shape(data.data_dir, ("train",))
        classifier = classifier.replace(in_channels=classifier.in_channels or channels,
                                        image_size=classifier.image_size or size)
    loop = build(LoopSettings, values, batch_size=common.global_batch(values, given, world),
                 precision=common.fp16_precision(values["precision"], classifier.classifier_use_fp16,
                                                 "--classifier_use_fp16"))
    classifier = classifier.replace(classifier_use_fp16=False)  # upstream's switch goes through autocast here
    return ClassifierTrainSettings(data=data, classifier=classifier, diffusion=build(DiffusionSettings, values),
                                   loop=loop, training=build(ClassifierTrainingSettings, values),
                                   output=output_folder(values["output"], "runs/train_classifier"), world_size=world)


def parse(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm train-classifier", world: int = 1) -> tuple:
    pre = common.pre_parse(argv)
    preset = common.preset_values(pre.preset, COMMAND)
    p = create_parser(preset, prog)
    args = p.parse_args(argv)
    return settings_from_flags(vars(args), common.given_flags(p, argv, preset), world), pre.preset


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm train-classifier") -> int:
    """Command-line entry point; returns the final step."""
    from guided_diffusion.training.run import train_classifier

    def check():
        return parse(argv, prog=prog, world=dist_util.get_world_size())

    def run(checked) -> int:
        settings, preset = checked
        # settings.json once the folder is known to take this run (a refused run leaves the earlier one's)
        return train_classifier(settings, record=lambda: common.prepare_output(settings.output, settings, COMMAND, preset))

    return common.run_in_process_group(check, run)
