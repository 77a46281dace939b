"""Bags: feature files matched to a labels table (slide, patient, label or time/event), validated for a task."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathomics.errors import CohortError, DataWarning, StoreError
from pathomics.layout import feature_file_in
from pathomics.mil.config import MILConfig
from pathomics.mil.train import Targets
from pathomics.store import read_feature_file

CACHE_BYTES = 4 << 30  # feature files are kept in memory for training up to this total, then re-read per epoch


@dataclass(frozen=True, eq=False)
class Bag:
    """One slide's feature file; its arrays are kept when they fit the training cache, else re-read."""

    slide_id: str
    patient_id: str
    path: Path
    cached: tuple[np.ndarray, np.ndarray] | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D) float32, coords (N, 2) int64)."""
        if self.cached is not None:
            return self.cached
        return read_bag(self.path)


def read_bag(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and coords of a feature file, refusing non-finite features."""
    ff = read_feature_file(path)
    bad = ~np.isfinite(ff.features).all(axis=1)
    if bad.any():
        raise StoreError(f"{path}: {int(bad.sum())} of {len(bad)} patches have NaN or infinite features; "
                         "re-run `pathomics embed` for this slide (fp16 overflow?) or drop it")
    return ff.features, ff.coords


@dataclass(frozen=True, eq=False)
class LabelledBags:
    """Bags with their targets, in one order."""

    bags: tuple[Bag, ...]
    targets: Targets
    classes: tuple[str, ...]  # empty for survival
    in_dim: int
    grades: tuple[str, ...] = ()  # the auxiliary grade's classes (sorted), when the config names a grade column

    @property
    def slide_ids(self) -> np.ndarray:
        return np.array([b.slide_id for b in self.bags])

    @property
    def patient_ids(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags])


def read_labels(path: str | os.PathLike, config: MILConfig) -> pd.DataFrame:
    """The labels table with canonical columns ``slide_id``, ``patient_id`` and ``label`` or ``time``, ``event``."""
    path = Path(path)
    columns = {config.slide_col: "slide_id", config.patient_col: "patient_id"}
    if config.task == "classification":
        columns[config.label_col] = "label"
    else:
        columns.update({config.time_col: "time", config.event_col: "event"})
    if config.grade_col is not None:
        columns[config.grade_col] = "grade"
    try:
        table = pd.read_csv(path, dtype={config.slide_col: str, config.patient_col: str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{path}: cannot read labels table ({exc})") from exc
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, table.columns))}); "
                          "name yours with --slide-col/--patient-col/--label-col/--time-col/--event-col")
    table = table[list(columns)].rename(columns=columns)
    empty = table.columns[table.isna().any()].tolist()
    if empty:
        raise CohortError(f"{path}: empty values in column(s) {', '.join(empty)}; fill or drop those rows")
    duplicated = table["slide_id"][table["slide_id"].duplicated()].unique()
    if len(duplicated):
        raise CohortError(f"{path}: slide(s) listed more than once: {_some(duplicated)}")
    if config.task == "survival":
        table["time"] = pd.to_numeric(table["time"], errors="coerce")
        table["event"] = pd.to_numeric(table["event"].replace({True: 1, False: 0}), errors="coerce")
        if table["time"].isna().any() or (table["time"] < 0).any():
            raise CohortError(f"{path}: column {config.time_col!r} must hold non-negative numbers")
        if not table["event"].isin([0, 1]).all():
            raise CohortError(f"{path}: column {config.event_col!r} must be 1 (event) or 0 (censored)")
        table["event"] = table["event"].astype(np.int64)
    return table


def read_patients(path: str | os.PathLike, slide_col: str = "slide_id", patient_col: str = "patient_id") -> dict[str, str]:
    """slide_id → patient_id from a CSV (for ``predict_mil``'s ``patients``)."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{path}: cannot read the patients table ({exc})") from exc
    missing = [c for c in (slide_col, patient_col) if c not in table.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {', '.join(missing)}; name them with --slide-col/--patient-col")
    return dict(zip(table[slide_col], table[patient_col]))


def load_bags(features_dir: str | os.PathLike, labels: str | os.PathLike, config: MILConfig,
              cache_bytes: int = CACHE_BYTES) -> LabelledBags:
    """Match the labels table to ``<features_dir>/<slide_id>.h5`` and validate the cohort for ``config.task``.

    Labelled slides without a (non-empty) feature file are dropped with a warning; feature files of
    different dimensions, non-finite features, a single class or no events are errors.
    """
    table = read_labels(labels, config)
    features_dir = Path(features_dir)
    paths = {sid: feature_file_in(features_dir, sid) for sid in table["slide_id"]}
    absent = [sid for sid, p in paths.items() if not p.is_file()]
    if absent:
        warnings.warn(f"{len(absent)} labelled slide(s) have no feature file in {features_dir} and are left out: "
                      f"{_some(absent)}", DataWarning, stacklevel=2)
    bags, dims, used = [], {}, 0
    for row in table.itertuples(index=False):
        if row.slide_id in absent:
            continue
        features, coords = read_bag(paths[row.slide_id])
        if len(features) == 0:
            warnings.warn(f"{paths[row.slide_id]}: no patches; slide {row.slide_id} is left out", DataWarning, stacklevel=2)
            continue
        dims.setdefault(features.shape[1], []).append(row.slide_id)
        keep = used + features.nbytes <= cache_bytes
        used += features.nbytes if keep else 0
        bags.append(Bag(row.slide_id, row.patient_id, paths[row.slide_id], (features, coords) if keep else None))
    if not bags:
        raise CohortError(f"{labels}: none of its slides has a feature file in {features_dir}")
    if len(dims) > 1:
        found = "; ".join(f"{d} ({len(s)} files, e.g. {_some(s, 3)})" for d, s in sorted(dims.items()))
        raise StoreError(f"feature files in {features_dir} differ in embedding dimension: {found}; "
                         "embed all slides with one backbone")
    table = table.set_index("slide_id").loc[[b.slide_id for b in bags]]
    if config.task == "classification":
        classes, labels_idx = _encode_classes(table["label"], config.classes, labels)
        targets = Targets(label=labels_idx)
    else:
        if not table["event"].any():
            raise CohortError(f"{labels}: every slide with features is censored (no events); "
                              "a survival model needs events")
        classes, targets = (), Targets(time=table["time"].to_numpy(float), event=table["event"].to_numpy(np.int64))
    grades: tuple[str, ...] = ()
    if config.grade_col is not None:
        grades, grade = _encode_classes(table["grade"], None, labels)
        targets = replace(targets, grade=grade)
    if config.aggregate != "none":
        _check_patient_targets(table, labels)
    return LabelledBags(tuple(bags), targets, classes, next(iter(dims)), grades)


def _encode_classes(labels: pd.Series, order: Sequence[str] | None, path: Any) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names (given order, else sorted values) and each slide's class index."""
    names = labels.astype(str)
    classes = tuple(order) if order is not None else tuple(str(v) for v in sorted(labels.unique()))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise CohortError(f"{path}: labels {unknown} are not among the given classes {list(classes)}")
    present = sorted(set(names))
    if len(present) < 2:
        raise CohortError(f"{path}: every slide with features has the same label {present[0]!r}; "
                          "classification needs at least two classes")
    return classes, names.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)


def _check_patient_targets(table: pd.DataFrame, path: Any) -> None:
    """Patient-level aggregation needs one label (or time and event) per patient."""
    target_cols = [c for c in ("label", "time", "event", "grade") if c in table.columns]
    varying = table.groupby("patient_id")[target_cols].nunique().gt(1).any(axis=1)
    if varying.any():
        raise CohortError(f"{path}: patient(s) {_some(varying.index[varying])} have slides with different "
                          "targets; fix the table or use --aggregate none for slide-level targets")


def _some(items: Iterable[Any], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, with a count of the rest."""
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
