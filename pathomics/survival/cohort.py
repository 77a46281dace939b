"""Cohort join: clinical, radiology and slide-signature tables validated and joined on the patient id.

Every rejected input raises `CohortError` naming the table, column and row;
every patient left out under the ``drop`` policy, and every radiology or signature row that matches no
clinical record, is counted in `Cohort.dropped` / `Cohort.unmatched` for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from pathomics.errors import CohortError
from pathomics.survival.config import SurvivalConfig

log = logging.getLogger(__name__)
COLUMNS_HINT = "name the columns with --patient-col, --time-col, --event-col, --covariates and --split-by"
TableSource = str | Path | pd.DataFrame


@dataclass(frozen=True)
class Cohort:
    """One row per patient (id, time, event, covariates, radiology score, pathology risk and ``sig_*``)."""

    data: pd.DataFrame
    modalities: tuple[str, ...]
    categorical: tuple[str, ...]
    signature_columns: tuple[str, ...] = ()
    clinical_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    unmatched: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def events(self) -> int:
        return int(self.data["event"].sum())

    def availability(self, config: SurvivalConfig) -> dict[str, int]:
        """Patients per combination of modalities they have ('clinical+pathology': 34, ...), most common first."""
        columns = {
            "clinical": list(config.covariates),
            "radiology": [config.radiology_col],
            "pathology": [config.risk_col, *self.signature_columns],
        }
        present = pd.DataFrame({
            name: self.data[[c for c in columns[name] if c in self.data]].notna().any(axis=1)
            for name in self.modalities
        })
        combinations = present.apply(lambda row: "+".join(row.index[row.to_numpy()]) or "none", axis=1)
        return {str(k): int(v) for k, v in combinations.value_counts().items()}


@dataclass(frozen=True)
class InputTable:
    """A named input table, so that messages can say which file is wrong."""

    name: str
    frame: pd.DataFrame

    @classmethod
    def read(cls, source: TableSource, kind: str, id_col: str) -> InputTable:
        if isinstance(source, pd.DataFrame):
            return cls(f"{kind} table", source.reset_index(drop=True))
        path = Path(source)
        if not path.is_file():
            raise CohortError(f"{kind} table {path} does not exist; check the path")
        try:
            frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path, dtype={id_col: str})
        except (ValueError, OSError, pd.errors.ParserError) as exc:
            raise CohortError(f"{path.name}: cannot be read as a {kind} table ({exc})") from exc
        return cls(path.name, frame)

    def where(self, position: int, id_col: str) -> str:
        """'clinical.csv row 3 (patient_id 'P3')' for the row at ``position`` (0-based)."""
        row = f"{self.name} row {position + 1}"
        if id_col in self.frame.columns:
            row += f" ({id_col} {self.frame[id_col].iloc[position]!r})"
        return row

    def require(self, columns: list[str], hint: str) -> None:
        absent = [c for c in columns if c not in self.frame.columns]
        if absent:
            raise CohortError(
                f"{self.name}: missing column(s) {', '.join(map(repr, absent))} "
                f"(present: {', '.join(map(str, self.frame.columns))}); {hint}"
            )

    def ids(self, id_col: str) -> pd.Series:
        ids = self.frame[id_col]
        blank = np.flatnonzero(ids.isna().to_numpy())
        if blank.size:
            raise CohortError(f"{self.where(int(blank[0]), id_col)}: empty {id_col!r}; every row needs a patient id")
        return ids.astype(str)

    def numeric(self, column: str, id_col: str, allow_missing: bool) -> pd.Series:
        """The column as floats; a value that is not a number (or is missing, unless allowed) is an error."""
        raw = self.frame[column]
        values = pd.to_numeric(raw, errors="coerce").astype(float)
        bad = values.isna() & (raw.notna() | (not allow_missing)) | np.isinf(values)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise CohortError(
                f"{self.where(i, id_col)}: column {column!r} holds {_show(raw.iloc[i])}, not a finite number "
                f"({int(bad.sum())} such row(s)); fix or remove them"
            )
        return values

    def unique_ids(self, id_col: str) -> pd.Series:
        ids = self.ids(id_col)
        duplicated = ids.duplicated(keep=False).to_numpy()
        if duplicated.any():
            first = ids[duplicated].iloc[0]
            rows = [str(i + 1) for i in np.flatnonzero((ids == first).to_numpy())]
            raise CohortError(
                f"{self.name}: duplicate {id_col} {first!r} in rows {', '.join(rows)} "
                f"({int(ids[duplicated].nunique())} duplicated id(s)); keep one row per patient"
            )
        return ids


def _show(value: object) -> str:
    """A cell value for a message: strings quoted, numbers plain."""
    return repr(value) if isinstance(value, str) else str(value)


def load_cohort(
    config: SurvivalConfig,
    clinical: TableSource,
    radiology: TableSource | None = None,
    signatures: TableSource | None = None,
    hint: str = COLUMNS_HINT,
) -> Cohort:
    """Validate the tables and join them on the patient id (several slides per patient aggregated).

    ``hint``: what to do about a missing clinical column (the options of the verb that reads the table).
    """
    table = InputTable.read(clinical, "clinical", config.id_col)
    data, categorical = clinical_frame(table, config, hint)
    clinical_ids = data.index
    dropped: dict[str, int] = {}
    unmatched: dict[str, int] = {}
    modalities = ["clinical"] if config.covariates else []
    absent = data[list(config.covariates)].isna()
    named = ", ".join(repr(c) for c in absent.columns[absent.any().to_numpy()])
    what = f"value of covariate(s) {named}"
    data, dropped_now = _apply_policy(data, absent.any(axis=1), what, table.name, config, _covariate_policy(config))
    dropped.update(dropped_now)

    if radiology is not None:
        scores, unmatched["radiology rows without a clinical record"] = _radiology_frame(radiology, clinical_ids, config)
        data = data.join(scores)
        data, dropped_now = _apply_policy(data, data[config.radiology_col].isna(), "radiology score", table.name, config)
        dropped.update(dropped_now)
        modalities.append("radiology")
    signature_columns: tuple[str, ...] = ()
    if signatures is not None:
        slides, unmatched["signature rows (slides) without a clinical record"] = signature_frame(
            signatures, clinical_ids, config
        )
        signature_columns = tuple(c for c in slides.columns if c.startswith(config.signature_prefix))
        data = data.join(slides)
        data, dropped_now = _apply_policy(data, data[list(slides.columns)].isna().all(axis=1), "slide", table.name, config)
        dropped.update(dropped_now)
        modalities.append("pathology")
    if not modalities:
        raise CohortError("nothing to model: give clinical covariates, a radiology table or slide signatures")
    if config.missing == "impute":
        impute_levels(data, categorical)
    if data["event"].sum() == 0:
        reason = f" after dropping {sum(dropped.values())} patient(s)" if dropped else ""
        raise CohortError(
            f"{table.name}: no events in column {config.event_col!r}{reason} ({len(data)} patients, all censored); "
            "a Cox model needs recurrences"
        )
    return Cohort(
        data=data.reset_index(),
        modalities=tuple(modalities),
        categorical=categorical,
        signature_columns=signature_columns,
        clinical_rows=len(clinical_ids),
        dropped={k: v for k, v in dropped.items() if v},
        unmatched={k: v for k, v in unmatched.items() if v},
    )


def check_tables(config: SurvivalConfig, clinical: TableSource, radiology: TableSource | None = None) -> pd.Index:
    """Validate the clinical (and radiology) table as ``load_cohort`` will, before any slide is processed.

    Returns the clinical patient ids. Raises the same CohortError ``load_cohort`` would for a missing column,
    a malformed value or, under the ``error`` policy, a missing covariate or score.
    """
    table = InputTable.read(clinical, "clinical", config.id_col)
    data, _ = clinical_frame(table, config)
    absent = data[list(config.covariates)].isna()
    named = ", ".join(repr(c) for c in absent.columns[absent.any().to_numpy()])
    _apply_policy(data, absent.any(axis=1), f"value of covariate(s) {named}", table.name, config, _covariate_policy(config))
    if radiology is not None:
        scores, _ = _radiology_frame(radiology, data.index, config)
        joined = data.join(scores)
        _apply_policy(joined, joined[config.radiology_col].isna(), "radiology score", table.name, config)
    return data.index


def clinical_frame(table: InputTable, config: SurvivalConfig, hint: str = COLUMNS_HINT) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Id-indexed frame with float ``time``, int ``event``, the covariates and the split column."""
    extra = [config.split_by] if config.split_by else []
    table.require([config.id_col, config.time_col, config.event_col, *config.covariates, *extra], hint)
    ids = table.unique_ids(config.id_col)
    time = table.numeric(config.time_col, config.id_col, allow_missing=False)
    if (time <= 0).any():
        i = int(np.flatnonzero((time <= 0).to_numpy())[0])
        raise CohortError(
            f"{table.where(i, config.id_col)}: {config.time_col!r} is {time.iloc[i]:g}; "
            f"follow-up times must be positive ({int((time <= 0).sum())} row(s) are not)"
        )
    event = table.numeric(config.event_col, config.id_col, allow_missing=False)
    if not event.isin([0.0, 1.0]).all():
        i = int(np.flatnonzero((~event.isin([0.0, 1.0])).to_numpy())[0])
        raise CohortError(
            f"{table.where(i, config.id_col)}: {config.event_col!r} is {_show(table.frame[config.event_col].iloc[i])}; "
            "events must be 1 (recurrence) or 0 (censored)"
        )
    frame = pd.DataFrame({"time": time.to_numpy(), "event": event.astype(int).to_numpy()}, index=pd.Index(ids, name="patient_id"))
    categorical = tuple(
        c
        for c in config.covariates
        if c in config.categorical or not is_numeric_dtype(table.frame[c]) or table.frame[c].dtype == bool
    )
    for column in config.covariates:
        values = table.frame[column]
        if column in categorical:
            frame[column] = values.where(values.isna(), values.astype(str)).to_numpy()
        else:
            frame[column] = table.numeric(column, config.id_col, allow_missing=True).to_numpy()
    if config.split_by:
        frame[config.split_by] = table.frame[config.split_by].astype(str).to_numpy()
    return frame, categorical


def _radiology_frame(source: TableSource, patients: pd.Index, config: SurvivalConfig) -> tuple[pd.DataFrame, int]:
    """Radiology scores indexed by patient, and how many rows match no clinical patient."""
    table = InputTable.read(source, "radiology", config.id_col)
    table.require([config.id_col, config.radiology_col], "name the score column with --radiology-col")
    ids = table.unique_ids(config.id_col)
    scores = table.numeric(config.radiology_col, config.id_col, allow_missing=True)
    frame = pd.DataFrame({config.radiology_col: scores.to_numpy()}, index=pd.Index(ids, name="patient_id"))
    return frame, int((~frame.index.isin(patients)).sum())


def signature_frame(source: TableSource, patients: pd.Index, config: SurvivalConfig) -> tuple[pd.DataFrame, int]:
    """Per-patient aggregate of the slides' risk and ``sig_*`` columns, and the slide rows matching no patient."""
    table = InputTable.read(source, "signatures", config.id_col)
    signature_columns = [c for c in table.frame.columns if str(c).startswith(config.signature_prefix)]
    if config.fusion == "decision":
        table.require([config.id_col, config.risk_col], "decision fusion needs the slides' pathology risk; see --risk-col")
        columns = [config.risk_col]
    else:
        table.require([config.id_col], "the signatures need a patient id column")
        if len(signature_columns) < config.n_components:
            raise CohortError(
                f"{table.name}: feature fusion needs at least {config.n_components} {config.signature_prefix}* columns, "
                f"found {len(signature_columns)}; lower --components or use --fusion decision"
            )
        columns = signature_columns
    ids = table.ids(config.id_col)
    values = pd.DataFrame(
        {c: table.numeric(c, config.id_col, allow_missing=False).to_numpy() for c in columns}, index=ids.to_numpy()
    )
    aggregated = values.groupby(level=0).agg(config.aggregate)
    aggregated.index.name = "patient_id"
    return aggregated, int((~ids.isin(patients)).sum())


def impute_levels(data: pd.DataFrame, categorical: Sequence[str]) -> None:
    """Fill blank categorical covariates in place with the column's most frequent level, and log which.

    A level of its own would be unseen by the folds that trained without it; the most frequent one never is.
    """
    for column in categorical:
        blank = data[column].isna()
        if blank.all():
            raise CohortError(f"covariate {column!r} is blank for every patient; nothing to impute it from: drop it from --covariates")
        if blank.any():
            level = data.loc[~blank, column].mode().sort_values().iloc[0]
            data[column] = data[column].fillna(level)
            log.warning("--missing impute: %d blank value(s) of %r set to its most frequent level %r", int(blank.sum()), column, level)


def _covariate_policy(config: SurvivalConfig) -> str:
    """The policy for missing clinical covariates: a fusion over the available modalities still needs them all."""
    return "error" if config.missing == "available" else config.missing


def _apply_policy(
    data: pd.DataFrame, missing: pd.Series, what: str, clinical_name: str, config: SurvivalConfig, policy: str | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply the missing-modality policy (``config.missing`` unless ``policy``) to the patients flagged in ``missing``."""
    policy = policy or config.missing
    if not missing.any() or policy in ("impute", "available"):
        return data, {}
    if policy == "drop":
        return data[~missing], {f"no {what}": int(missing.sum())}
    ids = missing.index[missing.to_numpy()]
    shown = ", ".join(map(repr, ids[:5])) + (", ..." if len(ids) > 5 else "")
    raise CohortError(
        f"{len(ids)} patient(s) of {clinical_name} have no {what} ({config.id_col} {shown}); "
        "supply them, or pass --missing drop (counted in the report) or --missing impute"
    )
