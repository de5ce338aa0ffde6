"""``anofpdm segment``: whole NIfTI volumes in, the anomaly map and mask as NIfTI on each scan's own grid out.

For every subject (a BraTS 2021 / ATLAS subject folder, a folder of such subjects, --files, or --subjects_csv) the
slices are prepared as training data were, segmented by the method, and written back as <id>_anomaly_map.nii.gz,
<id>_anomaly_mask.nii.gz, <id>_segmentation.json (slices classified unhealthy, lesion volume, metrics when a
ground truth is given) and <id>_overlay.png; then subjects.csv and summary.json. The hyper-parameters come from an
evaluation run's hyperparams.json (--hyperparams_file) or from a validation pass on --data_dir. A rerun into the same
folder skips finished subjects. Examples:

    anofpdm segment --preset quickstart --input runs/quickstart/raw/BraTS2021_00000 --hyperparams_file \\
        runs/quickstart/results/hyperparams.json --output runs/segment
    torchrun --nproc-per-node 2 -m guided_diffusion segment ...        # subjects spread over processes

Exit code: 0 when every subject was segmented, 1 when some failed (named in summary.json), 2 for a user error.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence, Set

from guided_diffusion import dist_util, logger, runtime
from guided_diffusion.commands import common
from guided_diffusion.errors import entry_point
from guided_diffusion.evaluation.settings import DataSettings, ValidationSettings
from guided_diffusion.evaluation.volumes.settings import SegmentSettings, VolumeSettings
from guided_diffusion.flags import add_options, build, output_folder
from guided_diffusion.methods.settings import inference_from_flags

COMMAND = "segment"


def create_parser(method: str = "anofpdm", preset: Optional[Dict[str, Any]] = None,
                  prog: str = "anofpdm segment") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    common.add_preset_flag(p)
    common.method_choice(p, method)
    known: Set[str] = {"method", "preset"}
    add_options(p.add_argument_group("subjects and output"), VolumeSettings, known=known)
    common.add_resumable_output(p.add_argument_group("output"), "NIfTI results, records and pictures (default: "
                                "$OPENAI_LOGDIR, else runs/segment_<method>)", "skip subjects finished by an earlier "
                                "run with the same settings (false: redo them)", known)
    val = p.add_argument_group("hyper-parameters: a file, or a validation pass on preprocessed data")
    add_options(val, ValidationSettings, known=known)
    add_options(val, DataSettings, known=known)
    common.add_inference_options(p, method, known)
    if preset:
        common.apply_defaults(p, preset)
    return p


def settings_from_flags(values: Dict[str, Any], given: Set[str], note: Any = None) -> SegmentSettings:
    data = build(DataSettings, values)
    inference = inference_from_flags(values, given, method=values["method"], dataset=data.name,
                                     data_dir=data.data_dir, note=note)
    return SegmentSettings(volumes=build(VolumeSettings, values), inference=inference, data=data,
                           validation=build(ValidationSettings, values),
                           output=output_folder(values["output"], f"runs/segment_{values['method']}"),
                           resume=values["resume"], progress=values["progress"])


def parse(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm segment", note: Any = None) -> tuple:
    pre = common.pre_parse(argv, method="")
    preset = common.preset_values(pre.preset, COMMAND)
    p = create_parser(pre.method or preset.get("method") or "anofpdm", preset, prog)
    args = p.parse_args(argv)
    return settings_from_flags(vars(args), common.given_flags(p, argv, preset), note), pre.preset


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm segment") -> int:
    """Command-line entry point; the exit code (0: every subject segmented, 1: some failed)."""
    from guided_diffusion.evaluation.volumes.run import run
    from guided_diffusion.evaluation.volumes.subjects import collect_subjects

    def check():
        notes = []
        settings, preset = parse(argv, prog=prog, note=notes.append)
        # bad --input / --files / --subjects_csv: reported before any model is loaded
        return settings, preset, notes, collect_subjects(settings.volumes, settings.data.name)

    def execute(checked) -> int:
        settings, preset, notes, subjects = checked
        rank = dist_util.get_rank()
        try:
            logger.configure(dir=settings.output, format_strs=["stdout", "log"] if rank == 0 else ["log"])
        except OSError as e:
            raise ValueError(f"--output {settings.output} cannot be written: {e}") from None
        runtime.configure_threads()
        for n in notes:
            logger.log(n)
        common.prepare_output(settings.output, settings, COMMAND, preset)
        logger.log(runtime.thread_summary())
        runtime.seed_everything(settings.inference.seed)
        summary = run(settings, subjects)
        failed = summary.get("failed") or any(s.get("status") == "failed" for s in summary.get("statuses", []))
        return 1 if failed else 0

    return common.run_in_process_group(check, execute)
