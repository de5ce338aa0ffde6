"""``anofpdm synth``: a BraTS-2021-like synthetic data set (flair/t1/t1ce/t2/seg NIfTI per subject).

Subjects are built from nilearn's MNI152 templates (needs the ``demo`` extra: pip install ".[demo]") with tumours of
a preset's size and contrast; a quarter have none by default. Rerun: existing subjects are kept. Example:

    anofpdm synth --output raw --num_subjects 24 --preset small --seed 3
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence

from guided_diffusion.commands import common
from guided_diffusion.data.synthetic import BRATS_SHAPE, PRESETS
from guided_diffusion.errors import entry_point
from guided_diffusion.flags import add_options, build, option, output_folder


@dataclass(frozen=True)
class SynthFlags:
    """The generator's flags (checked by ``data.synthetic``)."""

    num_subjects: int = option(24, "subjects to write")
    healthy_fraction: float = option(0.25, "share of subjects without a tumour")
    seed: int = option(0, "seed of the subjects")
    workers: int = option(1, "parallel worker processes")
    shape: List[int] = option(list(BRATS_SHAPE), "volume size X Y Z (smaller volumes cover the same field of view)")
    preset: str = option("default", "lesion preset: " + "; ".join(
        f"{n}: radius {s.radius_mm[0]:g}-{s.radius_mm[1]:g} mm, contrast {s.contrast:g}, {s.lesions[0]}-"
        f"{s.lesions[1]} lesion(s)" for n, s in PRESETS.items()), choices=sorted(PRESETS))
    lesion_radius_mm: Optional[List[float]] = option(None, "outer lesion radius range LOW HIGH in mm (overrides the "
                                                     "preset)")
    lesion_contrast: Optional[float] = option(None, "lesion conspicuity, 1 = the default contrasts (overrides the "
                                              "preset)")
    lesions_per_subject: Optional[List[int]] = option(None, "lesions per tumour subject, LOW HIGH (overrides the "
                                                      "preset)")


def create_parser(prog: str = "anofpdm synth") -> argparse.ArgumentParser:
    p = common.parser(prog, __doc__)
    common.add_output_flag(p, "the subject folders (BraTS raw layout); required")
    add_options(p, SynthFlags)
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm synth") -> int:
    from guided_diffusion import runtime
    from guided_diffusion.data.synthetic import lesion_settings, make_synthetic_brats

    args = create_parser(prog).parse_args(argv)
    f = build(SynthFlags, args)
    output = output_folder(args.output, None, env=None)
    if not output:
        raise ValueError("--output is required: the folder for the synthetic subjects")
    for flag in ("shape", "lesion_radius_mm", "lesions_per_subject"):
        value = getattr(f, flag)
        if value is not None and len(value) != (3 if flag == "shape" else 2):
            raise ValueError(f"--{flag} takes {3 if flag == 'shape' else 2} values, got {list(value)}")
    runtime.configure_threads(f.workers)
    lesions = lesion_settings(f.preset, f.lesion_radius_mm, f.lesion_contrast, f.lesions_per_subject)
    names = make_synthetic_brats(output, num_subjects=f.num_subjects, healthy_fraction=f.healthy_fraction,
                                 seed=f.seed, workers=f.workers, shape=tuple(f.shape), lesions=lesions)
    print(f"{len(names)} subjects in {output}")
    return 0
