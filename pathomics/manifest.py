"""Slide lists: a manifest CSV (``slide_path``, optional ``slide_id``, ``patient_id``, ``mpp``, ``tissue_geojson``) or paths."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pathomics.errors import InputError
from pathomics.slide.dicom_backend import is_dicom_slide

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".dcm")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of an archive; ``mpp`` overrides the slide's own level-0 MPP when given."""

    slide_path: Path
    slide_id: str
    patient_id: str | None = None
    mpp: float | None = None
    tissue_geojson: Path | None = None


def read_manifest(path: str | os.PathLike) -> list[SlideEntry]:
    """Entries of a manifest CSV; relative slide paths are taken relative to the manifest's folder."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the manifest ({exc})") from exc
    if "slide_path" not in table.columns:
        raise InputError(f"{path}: the manifest needs a slide_path column (found: {', '.join(table.columns)})")
    entries = []
    for i, row in enumerate(table.to_dict("records"), start=2):
        slide_path = Path(row["slide_path"])
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        mpp = _optional_float(row.get("mpp", ""), f"{path} line {i}: mpp")
        geojson = row.get("tissue_geojson") or None
        entries.append(SlideEntry(slide_path, row.get("slide_id") or default_slide_id(slide_path), row.get("patient_id") or None, mpp,
                                  (path.parent / geojson) if geojson else None))
    return check_unique(entries, str(path))


def entries_from_paths(paths: Sequence[str | os.PathLike], mpp: float | None = None) -> list[SlideEntry]:
    """Entries for slide files, DICOM slide folders, and folders of slides (searched one level deep)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not _is_dicom_slide_folder(p):
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in SLIDE_SUFFIXES or (f.is_dir() and _is_dicom_slide_folder(f)))
        else:
            found = [p]
        if not found:
            raise InputError(f"{p}: a folder without slide files ({', '.join(SLIDE_SUFFIXES)}) or DICOM slide folders; "
                             "name slide files, or folders that hold them")
        files += found
    if not files:
        raise InputError("no slides given; name slide files or folders that hold them")
    return check_unique([SlideEntry(f, default_slide_id(f), None, mpp) for f in files], "the slide list")


def patient_ids_from_names(entries: Sequence[SlideEntry], pattern: str) -> list[SlideEntry]:
    """Entries without a patient id given one from their slide file name: ``pattern``'s first group, or its match.

    ``pattern`` is a Python regular expression searched in the file name, e.g. ``^(TCGA-\\w\\w-\\w{4})`` or
    ``^([^_]+)_`` (the text before the first underscore).
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--patient-id-regex {pattern!r} is not a regular expression ({exc})") from None
    named = []
    for e in entries:
        if e.patient_id is None:
            match = regex.search(e.slide_path.name)
            if not match or not (match.group(1) if regex.groups else match.group(0)):
                raise InputError(f"{e.slide_path}: --patient-id-regex {pattern!r} finds no patient id in the file name; "
                                 "adjust the pattern or give a manifest with a patient_id column")
            e = replace(e, patient_id=match.group(1) if regex.groups else match.group(0))
        named.append(e)
    return named


def _is_dicom_slide_folder(path: Path) -> bool:
    """A folder of DICOM whole-slide-image files and no slide files of other formats (those make it an archive)."""
    return is_dicom_slide(path) and not any(f.suffix.lower() in SLIDE_SUFFIXES and f.suffix.lower() != ".dcm" for f in path.iterdir())


def default_slide_id(path: Path) -> str:
    """A slide's id when none is given: the file stem, or the folder name of a DICOM slide folder."""
    return path.name if path.is_dir() else path.stem


def check_unique(entries: list[SlideEntry], where: str) -> list[SlideEntry]:
    """Refuse two slides with the same slide_id: their outputs would overwrite each other."""
    seen: dict[str, Path] = {}
    for e in entries:
        if e.slide_id in seen:
            raise InputError(f"{where}: slide_id {e.slide_id!r} is used by both {seen[e.slide_id]} and {e.slide_path}; "
                                 "give distinct slide_id values in a manifest")
        seen[e.slide_id] = e.slide_path
    return entries


def _optional_float(text: str, what: str) -> float | None:
    if not str(text).strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{what} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{what} is {text!r}, not a finite number")
    return value
