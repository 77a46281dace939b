"""Checks of an archive run made before any slide is opened: each failure is one line saying what to do.

A run that would fail on its inputs fails here, in seconds, with nothing written under ``<out>/tiles``:
the encoder (name, weights file, weights against the architecture), the device and precision (resolved
once for the whole run), the clinical and radiology tables, the patient ids of the slides against the
clinical table (both ways), and slide files listed twice under different slide ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from pathomics.device import resolve_device, resolve_precision
from pathomics.embed import EmbedConfig, config_backbone
from pathomics.errors import CohortError, InputError
from pathomics.manifest import SlideEntry
from pathomics.survival.config import SurvivalConfig

log = logging.getLogger(__name__)
HEAD_BYTES = 1 << 20  # duplicate slide files are told apart by size and a hash of their first MiB


@dataclass(frozen=True)
class EncoderIdentity:
    """What a feature file of this run must record: the encoder, its weights' hash and the precision."""

    model: str
    weights_sha256: str
    precision: str

    def mismatch(self, attrs: dict) -> str | None:
        """Why a feature file with ``attrs`` was not computed by this encoder (None when it was)."""
        for key, value in vars(self).items():
            if str(attrs.get(key, "")) != value:
                return f"its {key} is {attrs.get(key, '(none)')!r}, this run's is {value!r}"
        return None


def resolve_encoder(config: EmbedConfig) -> tuple[EmbedConfig, EncoderIdentity]:
    """``config`` with its device and precision resolved once, and the identity of the encoder it loads.

    Loads the encoder as a worker will (name, weights file, keys against the architecture) so that an unusable
    model or weights file is a ModelError before any slide is tiled.
    """
    device = resolve_device(config.device)
    resolved = replace(config, device=str(device), precision=resolve_precision(config.precision, device))
    backbone = config_backbone(resolved)
    return resolved, EncoderIdentity(backbone.name, backbone.weights_sha256, resolved.precision)


def check_patient_ids(entries: Sequence[SlideEntry]) -> None:
    """Every slide needs a patient id to be joined with the clinical table."""
    missing = [e for e in entries if not e.patient_id]
    if missing:
        raise CohortError(
            f"{len(missing)} slide(s) have no patient id (e.g. {missing[0].slide_path}); give a manifest CSV "
            "(--manifest, columns slide_path,patient_id) or --patient-id-regex PATTERN to take it from the file name")


def match_patients(entries: Sequence[SlideEntry], patients: pd.Index, clinical: Path,
                   survival: SurvivalConfig) -> list[SlideEntry]:
    """The slides of clinical patients, checked both ways against the clinical table before slide work.

    Slides whose patient is not in the table, and clinical patients without slides, are an error under
    ``--missing error`` naming them and the option that resolves it; under another policy the slides are
    left out (logged) and the patients go on as the survival stage's policy says.
    """
    known = set(map(str, patients))
    orphans = [e for e in entries if e.patient_id not in known]
    if len(orphans) == len(entries):
        shown = ", ".join(sorted({e.patient_id for e in entries})[:3])
        raise CohortError(f"{clinical}: none of the slides' patient ids ({shown}, ...) is in its "
                          f"{survival.id_col!r} column; check the manifest's patient_id values")
    with_slides = {e.patient_id for e in entries}
    unslided = sorted(known - with_slides)
    if survival.missing == "error" and (orphans or unslided):
        problems = []
        if orphans:
            problems.append(f"{len(orphans)} slide(s) of patients not in {clinical} ({_show([e.slide_id for e in orphans])})")
        if unslided:
            problems.append(f"{len(unslided)} patient(s) of {clinical} without a slide ({_show(unslided)})")
        raise CohortError(f"{' and '.join(problems)}; correct the manifest or the clinical table, or pass "
                          "--missing drop to leave them out (or impute/available for patients without slides)")
    if orphans:
        log.warning("%d slide(s) of patients not in %s left out: %s", len(orphans), clinical, _show([e.slide_id for e in orphans]))
    return [e for e in entries if e.patient_id in known]


def check_duplicate_files(entries: Sequence[SlideEntry]) -> None:
    """Refuse one slide file listed under two slide ids: its patient would get the same bag twice.

    Files of equal size are compared by a hash of their first MiB (slide files of one scanner rarely share
    a size, so few are read).
    """
    by_size: dict[int, list[SlideEntry]] = {}
    for e in entries:
        if e.slide_path.is_file():
            by_size.setdefault(e.slide_path.stat().st_size, []).append(e)
    for same_size in (group for group in by_size.values() if len(group) > 1):
        seen: dict[str, SlideEntry] = {}
        for e in same_size:
            key = _head_digest(e.slide_path)
            if key in seen:
                first = seen[key]
                raise InputError(f"{first.slide_path} (slide_id {first.slide_id}) and {e.slide_path} (slide_id "
                                 f"{e.slide_id}) are the same slide file; list each slide once")
            seen[key] = e


def _head_digest(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            return hashlib.sha256(fh.read(HEAD_BYTES)).hexdigest()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the slide file ({exc.strerror or exc}); check the path and its permissions") from exc


def _show(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
