"""The subjects of a whole-volume segmentation run: ``--input`` folders, ``--files`` and ``--subjects_csv``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from guided_diffusion import logger
from guided_diffusion.data import preprocess as pp
from guided_diffusion.evaluation.volumes.settings import SAFE_ID, VolumeSettings, channel_names

def _is_subject_folder(folder: Path) -> bool:
    """A subject's own folder (else a data set root holding subject folders): a BIDS ``sub-*`` folder, one holding
    ``<folder name>_*.nii[.gz]`` files (BraTS, flattened ATLAS), or one with NIfTI files and no subfolder. A root with
    a stray NIfTI file beside its subject folders stays a root (the file is skipped with a warning)."""
    if folder.name.startswith("sub-"):
        return True
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    scans = [p for p in entries if p.is_file() and p.name.endswith((".nii", ".nii.gz"))]
    if any(p.name.startswith(f"{folder.name}_") for p in scans):
        return True
    return bool(scans) and not any(p.is_dir() for p in entries)


def _subject_from_files(name: str, entries: Dict[str, str], mods: Sequence[str], where: str,
                        base_dir: Optional[Path] = None) -> pp.Subject:
    unknown = sorted(set(entries) - set(mods) - {"seg"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(mods)} and optionally seg")

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path

    images = {m: resolve(entries[m]) if entries.get(m) else None for m in mods}  # a missing one fails by name
    seg = resolve(entries["seg"]) if entries.get("seg") else None
    problem = None
    absent = [m for m in mods if images[m] is None]
    if absent:
        problem = f"subject {name}: no {', '.join(absent)} file given ({where})"
    return pp.Subject(name, images, seg, problem)


def collect_subjects(v: VolumeSettings, dataset: str, warn=logger.warn) -> List[pp.Subject]:
    """Every subject of ``--input``, ``--files`` and ``--subjects_csv``, sorted by name (names must be unique)."""
    mods = channel_names(dataset, v.mod)
    mod = "t1" if dataset == "atlas" else v.mod
    found: List[Tuple[pp.Subject, str]] = []
    for entry in v.input:
        folder = Path(entry)
        if not folder.is_dir():
            raise ValueError(f"--input {entry}: not a folder")
        sink: List[str] = []
        if _is_subject_folder(folder):
            subjects = [pp.subject_from_folder(folder, dataset, mod, sink, require_mask=False)]
        else:
            subjects = pp.discover_subjects(folder, dataset, mod, sink, require_mask=False)
        found += [(s, f"--input {entry}") for s in subjects]
    if v.files:
        entries = {}
        for item in v.files:
            key, sep, path = item.partition("=")
            if not sep or not path:
                raise ValueError(f"--files {item!r}: expected KEY=PATH, e.g. flair=scan_flair.nii.gz")
            entries[key.strip().lower()] = path
        found.append((_subject_from_files(v.id, entries, mods, "--files"), "--files"))
    if v.subjects_csv:
        csv_path = Path(v.subjects_csv)
        try:
            with open(csv_path, newline="") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"--subjects_csv {csv_path}: {e}") from None
        header = text.splitlines()[0] if text.strip() else ""
        # comma, or the semicolon / tab that spreadsheets write where the comma is the decimal mark
        delimiter = max(",;\t", key=header.count)
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
        columns = {(k or "").strip().lower() for k in (rows[0] if rows else {})}
        if "id" not in columns:
            raise ValueError(f"--subjects_csv {csv_path}: the header {header!r} has no id column; expected a header "
                             f"such as id,{','.join(mods)}[,seg] (separated by commas, semicolons or tabs)")
        for i, row in enumerate(rows, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            name = row.pop("id", "")
            where = f"--subjects_csv {csv_path} line {i}"
            if not SAFE_ID.match(name):
                raise ValueError(f"{where}: id {name!r} must be letters, digits and . _ + - (it names output files)")
            found.append((_subject_from_files(name, row, mods, where, csv_path.parent), where))
    by_name: Dict[str, str] = {}
    for subject, where in found:
        if subject.name in by_name:
            raise ValueError(f"subject {subject.name} is given twice ({by_name[subject.name]} and {where}); "
                             "output files are named by subject, so names must be unique")
        by_name[subject.name] = where
    return sorted((s for s, _ in found), key=lambda s: s.name)
