"""The train / validation / test split of a data set's subjects: upstream's seeded split, recorded in
``data_splits/`` and reused, optionally with subjects with a lesion moved into validation."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence


from guided_diffusion import fileio
from guided_diffusion.data.loaders import SPLITS
from guided_diffusion.errors import SettingsMismatchError
from guided_diffusion.data.raw import _warn

SPLIT_SEED = 10
SPLIT_FRACTIONS = (0.75, 0.05)  # train, val; test gets the rest
SPLIT_RECORD = "split.json"  # in data_splits/: the subjects the split was made from (absent: an older split)


def _give_validation_lesions(parts: Dict[str, List[int]], names: Sequence[str], wanted: int,
                             has_lesion: Callable[[str], bool], warnings: List[str]) -> None:
    """Move lesion subjects from train into val (in place) until val has ``wanted`` of them."""
    have = sum(has_lesion(names[i]) for i in parts["val"])
    donors = [i for i in parts["train"] if has_lesion(names[i])]
    while have < wanted and donors:
        donor = donors.pop(0)
        parts["train"].remove(donor)
        healthy_val = [i for i in parts["val"] if not has_lesion(names[i])]
        if healthy_val:  # swap, so the split sizes stay upstream's
            parts["val"].remove(healthy_val[-1])
            parts["train"].append(healthy_val[-1])
        parts["val"].append(donor)
        have += 1
    if have < wanted:
        _warn(f"only {have} subject(s) with a lesion could be put into validation (wanted {wanted})", warnings)


def seeded_split(names: Sequence[str], min_val_lesion: int = 0, has_lesion: Optional[Callable[[str], bool]] = None,
                 warnings: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """Upstream's split of the sorted ``names``: random.seed(10) shuffle, int(75 %) / int(5 %) / rest (see make_splits)."""
    names = sorted(names)
    indices = list(range(len(names)))
    random.Random(SPLIT_SEED).shuffle(indices)  # same permutation as upstream's random.seed(10); random.shuffle
    n_train = int(len(indices) * SPLIT_FRACTIONS[0])
    n_val = int(len(indices) * SPLIT_FRACTIONS[1])
    parts = {"train": indices[:n_train], "val": indices[n_train:n_train + n_val], "test": indices[n_train + n_val:]}
    if min_val_lesion > 0:
        _give_validation_lesions(parts, names, min_val_lesion, has_lesion, [] if warnings is None else warnings)
    return {split: [names[i] for i in parts[split]] for split in SPLITS}


def make_splits(names: Sequence[str], splits_dir: Path, warnings: Optional[List[str]] = None,
                min_val_lesion: int = 0, has_lesion: Optional[Callable[[str], bool]] = None) -> Dict[str, List[str]]:
    """Per-subject split as upstream (random.seed(10) shuffle of the sorted listing, 75% / 5% / rest).

    ``names`` are the subjects (folders that are not subjects take no part, see ``discover_subjects``). An existing
    ``data_splits`` folder is reused as is, so reruns and added subjects never reshuffle; one made by an older
    version (no ``split.json``) whose seeded split included folders that were not subjects is refused when that
    changed the real subjects' assignment (``_check_older_split``).
    ``min_val_lesion > 0`` (off by default, so upstream's split stays the default) makes sure validation holds at
    least that many subjects with a lesion (``has_lesion(name)``): M_max, one of AnoFPDM's hyper-parameters, can
    only be estimated from unhealthy validation slices, and small data sets often get none. Lesion subjects move
    from train to validation in the shuffled order, replacing validation subjects without a lesion.
    """
    warnings = [] if warnings is None else warnings
    if splits_dir.exists():
        splits = {}
        for split in SPLITS:
            csv = splits_dir / split / "scans.csv"
            if not csv.exists():
                raise FileNotFoundError(f"{csv} is missing; delete {splits_dir} to re-create the splits")
            splits[split] = [line.strip() for line in csv.read_text().splitlines() if line.strip()]
        if not (splits_dir / SPLIT_RECORD).exists():
            splits = _check_older_split(splits, names, splits_dir, min_val_lesion, has_lesion, warnings)
        listed = {n for names_ in splits.values() for n in names_}
        for n in names:
            if n not in listed:
                _warn(f"subject {n} is not in {splits_dir}; ignored (delete data_splits to re-split)", warnings)
        if min_val_lesion > 0 and sum(has_lesion(n) for n in splits["val"]) < min_val_lesion:
            raise ValueError(f"the existing split in {splits_dir} has fewer than {min_val_lesion} validation "
                             f"subject(s) with a lesion; delete {splits_dir} (and the npy_* folders) to re-split")
        return splits
    splits = seeded_split(names, min_val_lesion, has_lesion, warnings)
    record = {"seed": SPLIT_SEED, "fractions": list(SPLIT_FRACTIONS), "min_val_lesion_subjects": min_val_lesion,
              "subjects": sorted(names)}
    with fileio.atomic_dir(splits_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
            (tmp / split / "scans.csv").write_text("\n".join(splits[split]))
        (tmp / SPLIT_RECORD).write_text(json.dumps(record, indent=1))
    return splits


def _check_older_split(splits: Dict[str, List[str]], names: Sequence[str], splits_dir: Path, min_val_lesion: int,
                       has_lesion: Optional[Callable[[str], bool]], warnings: List[str]) -> Dict[str, List[str]]:
    """A split made before non-subject folders were left out may hold such a folder, which shifted the seeded split.

    Names in the split that are neither subjects now nor preprocessed (no ``npy_*/patient_<name>``) are taken for
    such folders. When the split is the seeded split of its own listing and leaving them out assigns the real
    subjects differently, this is an error saying how to re-split or keep it; otherwise they are dropped (warning).
    A hand-made split (not the seeded one of its listing) is kept as it is.
    """
    root = splits_dir.parent
    subjects = set(names)
    listed = [n for split in SPLITS for n in splits[split]]
    strays = sorted(n for n in listed if n not in subjects
                    and not any((root / f"npy_{split}" / f"patient_{n}").is_dir() for split in SPLITS))
    if not strays:
        return splits
    seeded = [seeded_split(listed)] + ([seeded_split(listed, min_val_lesion, has_lesion)] if min_val_lesion > 0 else [])
    if splits not in seeded:
        return splits  # not the seeded split of its listing: made by hand, kept as it is
    kept = {split: [n for n in splits[split] if n not in strays] for split in SPLITS}
    made_with = min_val_lesion if splits == seeded[-1] and splits != seeded[0] else 0
    without = seeded_split([n for n in listed if n not in strays], made_with, has_lesion)
    if without == kept:
        _warn(f"{splits_dir} lists {', '.join(strays)}, which is not a subject in --source (left out; the split of "
              "the subjects is the same without it)", warnings)
        return kept
    where = {n: s for s in SPLITS for n in kept[s]}
    moved = sum(where[n] != s for s in SPLITS for n in without[s])
    raise SettingsMismatchError(
        f"{splits_dir} was made by an older version from a listing that included {', '.join(strays[:5])}: "
        f"{'folders that are' if len(strays) > 1 else 'a folder that is'} not a subject (no subject files, never "
        f"preprocessed). Without {'them' if len(strays) > 1 else 'it'} the seeded split assigns {moved} of the "
        f"{len(where)} subjects differently. To re-split: delete {splits_dir} and {root}/npy_train, npy_val, npy_test "
        f"and rerun (the subjects are preprocessed again). To keep this assignment (e.g. models were trained on it): "
        f"delete {'those names' if len(strays) > 1 else 'that name'} from {splits_dir}/*/scans.csv")
