"""``anofpdm train``: train a diffusion UNet on preprocessed slices.

AnoFPDM's classifier-free guided model (``--num_classes 2``, label drop 0.1), a plain class-conditional model
(``--clf_free false``: the DM that a noisy-image classifier guides) or an unconditional one (``--num_classes 0``:
AnoDDPM, with ``--mixed false --n_unhealthy_patients 0`` for healthy slices only), any ``--unet_ver``, Gaussian or
simplex noise. The output folder gets checkpoints, config.json (the model, for evaluation), logs and preview grids;
a rerun continues from the newest checkpoint. Examples:

    anofpdm train --preset quickstart --data_dir data --output model
    anofpdm train --preset brats-anofpdm-hae_v2_conservative --data_dir data/brats128 --output logs/hae_v2c
    torchrun --nproc-per-node 4 -m guided_diffusion train --preset ...      # --batch_size is global
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence, Set

from guided_diffusion import dist_util
from guided_diffusion.architecture import ModelSettings
from guided_diffusion.commands import common
from guided_diffusion.data.loaders import data_shape
from guided_diffusion.errors import entry_point
from guided_diffusion.flags import add_options, build, output_folder
from guided_diffusion.training.settings import DiffusionTrainingSettings, LoopSettings, TrainDataSettings, TrainSettings

COMMAND = "train"


def create_parser(preset: Optional[Dict[str, Any]] = None, prog: str = "anofpdm train") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    common.add_preset_flag(p)
    known: Set[str] = {"preset"}
    add_options(p.add_argument_group("data"), TrainDataSettings, known=known)
    common.add_output_flag(p, "checkpoints, config.json, logs and previews (default: $OPENAI_LOGDIR, else "
                              "runs/train_<unet_ver>); a rerun into it continues")
    known.add("output")
    add_options(p.add_argument_group("optimisation"), LoopSettings, known=known)
    add_options(p.add_argument_group("objective and previews"), DiffusionTrainingSettings, known=known)
    add_options(p.add_argument_group("model"), ModelSettings, known=known)
    if preset:
        common.apply_defaults(p, preset)
    return p


def settings_from_flags(values: Dict[str, Any], given: Set[str], world: int = 1) -> TrainSettings:
    data = build(TrainDataSettings, values)
    model = build(ModelSettings, values)
    if not model.resolved:  # the shape comes from the data
        channels, size = data_shape(data.data_dir, ("train",))
        model = model.replace(in_channels=model.in_channels or channels, image_size=model.image_size or size)
    loop = build(LoopSettings, values, batch_size=common.global_batch(values, given, world),
                 precision=common.fp16_precision(values["precision"], model.use_fp16, "--use_fp16"))
    model = model.replace(use_fp16=False)  # upstream's switch goes through autocast here
    return TrainSettings(data=data, model=model, loop=loop, training=build(DiffusionTrainingSettings, values),
                         output=output_folder(values["output"], f"runs/train_{model.unet_ver}"), world_size=world)


def parse(argv: Optional[Sequence[str]] = None, *, unet_ver: Optional[str] = None, prog: str = "anofpdm train",
          world: int = 1) -> tuple:
    pre = common.pre_parse(argv)
    preset = common.preset_values(pre.preset, COMMAND)
    p = create_parser(preset, prog)
    args = p.parse_args(argv)
    given = common.given_flags(p, argv, preset)
    if unet_ver is not None:  # the train_<ver>.py aliases fix the variant, HAE blocks included
        args.unet_ver, args.use_hae = unet_ver, None
    return settings_from_flags(vars(args), given, world), pre.preset


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, unet_ver: Optional[str] = None,
         prog: str = "anofpdm train") -> int:
    """Command-line entry point; returns the final step."""
    from guided_diffusion.training.run import train

    def check():
        return parse(argv, unet_ver=unet_ver, prog=prog, world=dist_util.get_world_size())

    def run(checked) -> int:
        settings, preset = checked
        # settings.json once the folder is known to take this run (a refused run leaves the earlier one's)
        return train(settings, record=lambda: common.prepare_output(settings.output, settings, COMMAND, preset))

    return common.run_in_process_group(check, run)
