"""The whole-volume segmentation command line (``scripts/segment.py``): flags, checks, main."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from guided_diffusion import dist_util, fileio, logger, runtime
from guided_diffusion.data import geometry as geo
from guided_diffusion.data import preprocess as pp
from guided_diffusion.errors import entry_point
from guided_diffusion.evaluation import translation
from guided_diffusion.evaluation.volumes.run import run
from guided_diffusion.evaluation.volumes.subjects import _SAFE_ID, channel_names, collect_subjects
from guided_diffusion.methods import base

# ------------------------------------------------------------------------------------------------------------
# Flags


def segment_defaults() -> dict:
    """This command's own flags (the model, method and validation flags are translation's and the methods')."""
    return dict(
        output="",
        id="",
        subjects_csv="",
        method="anofpdm",
        mod="all",
        first=0,
        last=0,
        zero_healthy_slices=True,
        overlay_slices=4,
        orientation="",  # orientation scans are sliced in, as preprocessing's (empty: BraTS LPS, ATLAS RAS)
        raw_map=False,  # True: write the model's map everywhere (upstream), not zero outside the brain
    )


def method_flags() -> dict:
    """Flags of every registered method beyond translation's (``<name>_flags()`` of each method's module)."""
    import importlib

    from guided_diffusion.methods.reconstruction import ReconstructionMethod, reconstruction_flags

    flags: dict = {}
    for name in base.METHODS:
        cls = base.method_class(name)
        module = importlib.import_module(cls.__module__)
        flags.update(getattr(module, f"{name}_flags", dict)())
        if issubclass(cls, ReconstructionMethod):
            flags.update(reconstruction_flags())
    return flags


def create_argparser() -> argparse.ArgumentParser:
    from guided_diffusion.script_util import add_dict_to_argparser

    parser = translation.create_argparser(__doc__)
    parser.set_defaults(batch_size=16)  # here: slices per forward, per process
    known = {a.dest for a in parser._actions}
    add_dict_to_argparser(parser, {k: v for k, v in segment_defaults().items() if k not in known})
    add_dict_to_argparser(parser, {k: v for k, v in method_flags().items() if k not in known})
    parser.add_argument("--input", nargs="+", default=[],
                        help="subject folders (BraTS <P>/<P>_flair.nii.gz ..., ATLAS <P>/<P>_T1w.nii.gz or a BIDS "
                             "sub-* folder) or data set roots holding them")
    parser.add_argument("--files", nargs="+", default=[], metavar="KEY=PATH",
                        help="one subject as explicit files: flair=F t1=F t1ce=F t2=F [seg=F] (ATLAS: t1=F [seg=F]); "
                             "its name is --id")
    return parser


def check_args(args: argparse.Namespace, explicit: Optional[set] = None) -> None:
    """Validate the flags in place; a ValueError names the flag.

    The model flags come from ``--model_dir``'s config.json when it has one (``explicit``: the flags given on the
    command line; one that contradicts the record is a ``fileio.RunConfigError``), else from the command line
    (upstream checkpoint folders)."""
    if args.name not in pp.DATASETS:
        raise ValueError(f"--name must be one of {', '.join(pp.DATASETS)}, got {args.name!r}")
    if args.mod not in ("all",) + pp.MODALITIES:
        raise ValueError(f"--mod must be one of all, {', '.join(pp.MODALITIES)}; got {args.mod!r}")
    if args.name == "atlas" and args.mod not in ("all", "t1"):
        raise ValueError(f"ATLAS has only T1w images: --mod must be t1 (or all), got {args.mod!r}")
    if not args.output:
        raise ValueError("--output is required: the folder the NIfTI results, JSON and pictures go to")
    if not (args.input or args.files or args.subjects_csv):
        raise ValueError("no subjects: pass --input FOLDER..., --files KEY=PATH... or --subjects_csv FILE")
    if args.files and not args.id:
        raise ValueError("--files needs --id NAME (the subject's name, used for the output file names)")
    if args.id and not _SAFE_ID.match(args.id):
        raise ValueError(f"--id {args.id!r}: use letters, digits and . _ + - only (it names the output files)")
    if not args.model_dir or not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir!r} is not a folder holding the checkpoints")
    base.method_class(args.method)  # a ValueError listing the known methods
    from guided_diffusion.script_util import (
        UNET_VERSIONS,
        apply_run_config,
        args_to_dict,
        check_model_flags,
        model_and_diffusion_defaults,
    )

    args.config_recorded = apply_run_config(args, args.model_dir, explicit) is not None
    check_model_flags(args_to_dict(args, model_and_diffusion_defaults().keys()))

    if args.unet_ver not in UNET_VERSIONS:
        raise ValueError(f"unknown --unet_ver {args.unet_ver!r}; valid: {', '.join(UNET_VERSIONS)}")
    if args.unet_ver not in ("v1", "v2") and not args.use_hae:
        raise ValueError(f"--unet_ver {args.unet_ver} needs --use_hae True (as upstream's configs pass it)")
    n = len(channel_names(args))
    if args.in_channels != n:
        raise ValueError(f"the model takes --in_channels {args.in_channels} channels but --name {args.name} "
                         f"--mod {args.mod} gives {n} ({', '.join(channel_names(args))}): pass the --mod the model "
                         "was trained on")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size (slices per forward) must be >= 1, got {args.batch_size}")
    if args.first < 0 or args.last < 0:
        raise ValueError(f"--first/--last must be >= 0, got {args.first}/{args.last}")
    args.orientation = geo.resolve_orientation(args.orientation, args.name)
    if args.overlay_slices < 0:
        raise ValueError(f"--overlay_slices must be >= 0, got {args.overlay_slices}")
    if args.hyperparams_file and not os.path.isfile(args.hyperparams_file):
        raise ValueError(f"--hyperparams_file {args.hyperparams_file!r} does not exist")
    if not args.hyperparams_file and args.num_batches_val != 0:
        if not args.data_dir or not os.path.isdir(os.path.join(args.data_dir, "npy_val")):
            raise ValueError("the hyper-parameters come from --hyperparams_file (a translation run's "
                             "hyperparams.json) or from a validation pass on --data_dir (a preprocessed folder with "
                             f"npy_val/); got --data_dir {args.data_dir!r}")
    if args.use_fp16 and args.precision == "fp32":
        args.precision = "fp16"
    args.use_fp16 = False
    runtime.check_precision(args.precision)
    if args.panel_modality == -1:
        args.panel_modality = args.modality[0]
    if not 0 <= args.panel_modality < args.in_channels:
        raise ValueError(f"--panel_modality {args.panel_modality} out of range for --in_channels {args.in_channels}")


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; the exit code is 0 when every subject was segmented, 1 when some failed, 2 for a
    user error (one message, ``errors.entry_point``)."""
    from guided_diffusion.script_util import explicit_flags

    parser = create_argparser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    dist_util.setup_dist()
    try:
        try:
            check_args(args, explicit)
            subjects = collect_subjects(args)  # bad --input / --files / --subjects_csv: before any model is loaded
        except fileio.RunConfigError as e:  # not a usage problem: no usage dump
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        except (ValueError, OSError) as e:
            parser.error(str(e))
        rank = dist_util.get_rank()
        try:
            logger.configure(dir=args.output, format_strs=["stdout", "log"] if rank == 0 else ["log"])
        except OSError as e:
            parser.error(f"--output {args.output} cannot be written: {e}")
        runtime.configure_threads()
        logger.log(f"args: {vars(args)}")
        logger.log(runtime.thread_summary())
        runtime.seed_everything(args.seed)
        summary = run(args, subjects)
        return 1 if summary.get("failed") or any(s.get("status") == "failed" for s in summary.get("statuses", [])) \
            else 0
    finally:
        dist_util.cleanup_dist()
