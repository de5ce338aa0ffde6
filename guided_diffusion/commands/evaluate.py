"""``anofpdm evaluate``: a segmentation method on the preprocessed validation and test slices, with metrics.

Validation picks the method's hyper-parameters (AnoFPDM: from slice labels only; the baselines: a Dice search with
pixel labels), the test pass segments every test slice, and the output folder gets metrics.json / metrics.csv
(Dice, IoU, AUPRC; mixed and unhealthy setups), per_slice.csv, per_volume.csv and panels.png. A rerun into the same
folder reuses every finished batch. Examples:

    anofpdm evaluate --preset brats-anofpdm-hae_v2_conservative --data_dir data/brats128 --model_dir runs/model
    anofpdm evaluate --method ddib --w 1.1 --sample_steps 450 --data_dir DATA --model_dir MODEL --output runs/ddib
    torchrun --nproc-per-node 4 -m guided_diffusion evaluate ...        # several GPUs (batch sizes are global)
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence, Set

from guided_diffusion import dist_util, logger, runtime
from guided_diffusion.commands import common
from guided_diffusion.errors import entry_point
from guided_diffusion.evaluation.settings import (
    DataSettings,
    EvaluationSettings,
    TestSettings,
    ValidationSettings,
    batches_for,
)
from guided_diffusion.flags import add_options, build, output_folder
from guided_diffusion.methods.settings import inference_from_flags

COMMAND = "evaluate"


def create_parser(method: str = "anofpdm", preset: Optional[Dict[str, Any]] = None, prog: str = "anofpdm evaluate",
                  fixed_method: bool = False) -> argparse.ArgumentParser:
    """The command's parser for ``method`` (its flags only), with the preset's values as defaults."""
    p = common.parser(prog, __doc__)
    common.add_preset_flag(p)
    if fixed_method:
        p.add_argument("--method", default=method, choices=[method], help=f"this command runs {method}")
    else:
        common.method_choice(p, method)
    known: Set[str] = {"method", "preset"}
    io = p.add_argument_group("data and output")
    add_options(io, DataSettings, known=known)
    common.add_resumable_output(io, "metrics, tables, pictures (default: $OPENAI_LOGDIR, else runs/evaluate_<method>)",
                                "reuse the finished batches of an earlier run in --output (false: recompute them)",
                                known)
    add_options(p.add_argument_group("validation (the method's hyper-parameters)"), ValidationSettings, known=known)
    add_options(p.add_argument_group("test"), TestSettings, known=known)
    common.add_inference_options(p, method, known)
    if preset:
        common.apply_defaults(p, preset)
    return p


def resolve_batches(values: Dict[str, Any], given: Set[str], world: int) -> Dict[str, Any]:
    """Global batch sizes and batch counts from ``--batch_per_process`` / ``--test_slices`` / ``--val_slices`` where
    those are set and the explicit flags are not."""
    out = dict(values)
    if out["batch_per_process"] > 0:
        for flag in ("batch_size", "batch_size_val"):
            if flag not in given:
                out[flag] = out["batch_per_process"] * world
    if out["test_slices"] > 0 and "num_batches" not in given:
        out["num_batches"] = batches_for(out["test_slices"], out["batch_size"])
    if out["val_slices"] > 0 and "num_batches_val" not in given:
        out["num_batches_val"] = batches_for(out["val_slices"], out["batch_size_val"])
    return out


def settings_from_flags(values: Dict[str, Any], given: Set[str], world: int = 1,
                        note: Any = None) -> EvaluationSettings:
    """The run's settings from the parsed flags (``given``: set on the command line or by the preset)."""
    values = resolve_batches(values, given, world)
    data = build(DataSettings, values)
    inference = inference_from_flags(values, given, method=values["method"], dataset=data.name,
                                     data_dir=data.data_dir if data.data_dir else "", note=note)
    return EvaluationSettings(
        inference=inference, data=data, validation=build(ValidationSettings, values), test=build(TestSettings, values),
        output=output_folder(values["output"], f"runs/evaluate_{values['method']}"), resume=values["resume"],
        progress=values["progress"], world_size=world)


def parse(argv: Optional[Sequence[str]] = None, *, method: Optional[str] = None, unet_ver: Optional[str] = None,
          prog: str = "anofpdm evaluate", world: int = 1, note: Any = None) -> tuple:
    """``(settings, preset name)`` of a command line. ``method`` fixes the method (the upstream-named scripts);
    ``unet_ver`` fixes the variant (the per-variant aliases), as explicit as a flag."""
    pre = common.pre_parse(argv, method="")
    preset = common.preset_values(pre.preset, COMMAND)
    chosen = method or pre.method or preset.get("method") or "anofpdm"
    p = create_parser(chosen, preset, prog, fixed_method=method is not None)
    args = p.parse_args(argv)
    given = common.given_flags(p, argv, preset)
    if unet_ver is not None:  # the per-variant aliases fix the variant, HAE blocks included
        args.unet_ver, args.use_hae = unet_ver, None
        given |= {"unet_ver"}
    return settings_from_flags(vars(args), given, world, note), pre.preset


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, method: Optional[str] = None, unet_ver: Optional[str] = None,
         prog: str = "anofpdm evaluate") -> Dict[str, Any]:
    """Command-line entry point; returns the run's summary (``Evaluation.run``)."""
    from guided_diffusion.evaluation.driver import Evaluation

    def check():
        notes = []
        settings, preset = parse(argv, method=method, unet_ver=unet_ver, prog=prog,
                                 world=dist_util.get_world_size(), note=notes.append)
        return settings, preset, notes

    def run(checked):
        settings, preset, notes = checked
        logger.configure(dir=settings.output)
        runtime.configure_threads()
        for n in notes:
            logger.log(n)
        common.prepare_output(settings.output, settings, COMMAND, preset)
        logger.log(runtime.thread_summary())
        runtime.seed_everything(settings.inference.seed)
        return Evaluation(settings).run()

    return common.run_in_process_group(check, run)
