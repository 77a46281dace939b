"""Longitudinal clinical markers: a time-varying Cox model and a landmark sequence encoder (the S1 design).

A long table (``patient_id, time, marker...``, one row per measurement) joins the clinical follow-up in two ways:

- **time-varying Cox** (lifelines ``CoxTimeVaryingFitter``) in counting-process form: each measurement holds
  from its time until the next one or the end of follow-up, giving (start, stop] intervals; a patient whose
  first measurement is after time 0 enters the risk set then (delayed entry).
- **landmark sequence model**: for the patients still at risk at the landmark time (follow-up beyond it), a
  GRU encodes the measurements made at or before the landmark, optionally fused with the slide signature,
  and is trained with the Cox loss on the time from the landmark (`pathomics.survival.sequence`).
  Patient-level cross-validation compares it with Cox models on the baseline (first) measurements and on the
  last measurements before the landmark (the classic landmark model).
  Nothing measured after the landmark reaches the landmark models, in training or prediction.

Outputs (``<out>/survival/longitudinal/``, each written atomically): ``metrics.json``, ``coefficients.csv``
(time-varying hazard ratios), ``intervals.csv`` (the counting-process table) and ``predictions.csv``
(out-of-fold landmark risks and embeddings).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxTimeVaryingFitter

from pathomics import __version__
from pathomics.errors import CohortError, ConfigError
from pathomics.folds import patient_folds
from pathomics.io import atomic_path, write_json
from pathomics.layout import OutputLayout, ResultFiles
from pathomics.survival import metrics as m
from pathomics.survival.cohort import InputTable, TableSource, clinical_frame, signature_frame
from pathomics.survival.config import SurvivalConfig
from pathomics.survival.cox import CoxModel, Design
from pathomics.survival.sequence import SequenceConfig, fit_sequence, predict_sequence

log = logging.getLogger(__name__)
SIGNATURE_KINDS = ("risk", "embedding")


@dataclass(frozen=True)
class LongitudinalConfig:
    """Columns, landmark and models of one longitudinal analysis (its values are written into metrics.json).

    ``marker_columns`` empty means every column of the long table other than the id and ``marker_time_col``.
    ``signature`` chooses what of the slide signatures joins the models: the pathology ``risk`` column or
    the ``sig_*`` embedding (patients' slides averaged). The GRU trains for a fixed number of full-batch
    ``epochs`` (no early stopping); the defaults held out best on the synthetic slope cohort of the tests.
    """

    landmark: float
    marker_columns: tuple[str, ...] = ()
    id_col: str = "patient_id"
    time_col: str = "time"
    event_col: str = "event"
    marker_time_col: str = "time"
    signature: str = "risk"
    risk_col: str = "risk"
    signature_prefix: str = "sig_"
    penalizer: float = 0.0
    folds: int = 5
    hidden: int = 8
    epochs: int = 60
    lr: float = 0.01
    weight_decay: float = 1e-3
    n_bootstrap: int = 200
    ci_level: float = 0.95
    time_unit: str = "days"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.landmark) and self.landmark > 0):
            raise ConfigError(f"the landmark time must be positive, got {self.landmark}")
        if self.signature not in SIGNATURE_KINDS:
            raise ConfigError(f"signature must be one of {', '.join(SIGNATURE_KINDS)}, not {self.signature!r}")
        self.survival_config()  # validates the fields shared with survival fit (folds, penalty, bootstrap)
        if self.hidden < 1 or self.epochs < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(
                f"need hidden >= 1, epochs >= 1, lr > 0 and weight_decay >= 0, got {self.hidden}, {self.epochs}, "
                f"{self.lr} and {self.weight_decay}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def survival_config(self) -> SurvivalConfig:
        """The settings shared with ``survival fit``: table columns (to read the clinical and signature tables
        as it does), folds, penalty and bootstrap."""
        fusion = "decision" if self.signature == "risk" else "features"
        return SurvivalConfig(
            id_col=self.id_col,
            time_col=self.time_col,
            event_col=self.event_col,
            risk_col=self.risk_col,
            signature_prefix=self.signature_prefix,
            fusion=fusion,
            n_components=1,
            folds=self.folds,
            penalizer=(self.penalizer,),
            n_bootstrap=self.n_bootstrap,
            ci_level=self.ci_level,
            seed=self.seed,
        )


@dataclass(frozen=True)
class LongitudinalData:
    """Validated inputs: per-patient outcomes (and signature columns), measurements sorted by patient and time."""

    patients: pd.DataFrame  # index patient_id; time, event, signature columns
    markers: pd.DataFrame  # patient_id, time, one column per marker
    marker_names: tuple[str, ...]
    signature_columns: tuple[str, ...]


@dataclass(frozen=True)
class LandmarkSet:
    """The patients at risk at the landmark with their measurements at or before it (nothing later)."""

    patients: pd.DataFrame  # index patient_id; time (from the landmark), event, signature columns
    histories: list[np.ndarray]  # per patient (visits, 1 + markers): time, marker values
    snapshots: dict[str, pd.DataFrame]  # baseline (first) and last_value (latest) measurements, index patient_id
    excluded_before: int  # event or censoring at or before the landmark
    excluded_no_history: int  # at risk, but first measured after the landmark


def load_longitudinal(
    config: LongitudinalConfig, clinical: TableSource, markers: TableSource, signatures: TableSource | None = None
) -> LongitudinalData:
    """Read and validate the clinical, long marker and (optional) signature tables; errors name the file and row."""
    survival = config.survival_config()
    clinical_table = InputTable.read(clinical, "clinical", config.id_col)
    patients, _ = clinical_frame(clinical_table, survival)
    signature_columns: tuple[str, ...] = ()
    if signatures is not None:
        slides, _ = signature_frame(signatures, patients.index, survival)
        absent = patients.index.difference(slides.index)
        if len(absent):
            raise CohortError(
                f"{len(absent)} patient(s) of {clinical_table.name} have no slide signature ({_listed(absent)}); "
                "supply them or leave out --signatures"
            )
        signature_columns = tuple(slides.columns)
        patients = patients.join(slides)
    table = InputTable.read(markers, "markers", config.id_col)
    names = config.marker_columns or tuple(
        str(c) for c in table.frame.columns if c not in (config.id_col, config.marker_time_col)
    )
    if not names:
        raise CohortError(f"{table.name}: no marker columns besides {config.id_col!r} and {config.marker_time_col!r}")
    table.require(
        [config.id_col, config.marker_time_col, *names], "name them with --patient-col, --marker-time-col and --marker-cols"
    )
    long = pd.DataFrame(
        {"patient_id": table.ids(config.id_col), "time": table.numeric(config.marker_time_col, config.id_col, False)}
    )
    for name in names:
        long[name] = table.numeric(name, config.id_col, allow_missing=False)
    _check_markers(long, table, patients, clinical_table.name, config)
    long = long.sort_values(["patient_id", "time"], kind="stable").reset_index(drop=True)
    return LongitudinalData(patients, long, names, signature_columns)


def _check_markers(
    long: pd.DataFrame, table: InputTable, patients: pd.DataFrame, clinical_name: str, config: LongitudinalConfig
) -> None:
    """Measurement times within follow-up, every id a known patient, every patient measured, no repeated visit."""
    negative = np.flatnonzero((long["time"] < 0).to_numpy())
    if negative.size:
        raise CohortError(
            f"{table.where(int(negative[0]), config.id_col)}: measured at {long['time'].iloc[negative[0]]:g}, "
            "before time 0 "
            f"({negative.size} such row(s)); times count from the start of follow-up, so put pre-operative values at 0"
        )
    unknown = ~long["patient_id"].isin(patients.index)
    if unknown.any():
        raise CohortError(
            f"{table.name}: {int(unknown.sum())} row(s) of patient(s) not in {clinical_name} "
            f"({_listed(long.loc[unknown, 'patient_id'].unique())}); remove them or add the patients' follow-up"
        )
    follow_up = patients["time"].reindex(long["patient_id"]).to_numpy()
    late = np.flatnonzero(long["time"].to_numpy() > follow_up)
    if late.size:
        i = int(late[0])
        raise CohortError(
            f"{table.where(i, config.id_col)}: measured at {long['time'].iloc[i]:g}, "
            "after the patient's follow-up ends "
            f"({follow_up[i]:g} {config.time_unit} in {clinical_name}; {late.size} such row(s)); "
            "check both tables use the same time origin and unit"
        )
    repeated = np.flatnonzero(long.duplicated(["patient_id", "time"]).to_numpy())
    if repeated.size:
        raise CohortError(
            f"{table.where(int(repeated[0]), config.id_col)}: a second row at time {long['time'].iloc[repeated[0]]:g} "
            f"({repeated.size} repeated visit(s)); keep one row per patient and time"
        )
    unmeasured = patients.index.difference(long["patient_id"].unique())
    if len(unmeasured):
        raise CohortError(
            f"{len(unmeasured)} patient(s) of {clinical_name} have no rows in {table.name} ({_listed(unmeasured)}); "
            "add their measurements or remove them from the clinical table"
        )


def _listed(ids: Any) -> str:
    ids = [str(i) for i in ids]
    return ", ".join(map(repr, ids[:5])) + (", ..." if len(ids) > 5 else "")


def counting_process(data: LongitudinalData) -> pd.DataFrame:
    """(start, stop] intervals: each measurement holds until the next one or the end of follow-up.

    Columns ``patient_id, start, stop, event`` (1 only on a patient's last interval, if it ends in an event),
    the markers and the signature columns. Measurements at the end of follow-up carry no time at risk and are left out.
    """
    follow_up = data.patients["time"].reindex(data.markers["patient_id"]).to_numpy()
    visits = data.markers[data.markers["time"].to_numpy() < follow_up]
    end = data.patients["time"].reindex(visits["patient_id"]).to_numpy()
    stop = visits.groupby("patient_id", sort=False)["time"].shift(-1).to_numpy()
    last = np.isnan(stop)
    event = data.patients["event"].reindex(visits["patient_id"]).to_numpy() * last
    intervals = pd.DataFrame(
        {
            "patient_id": visits["patient_id"].to_numpy(),
            "start": visits["time"].to_numpy(),
            "stop": np.where(last, end, stop),
            "event": event,
        }
    )
    for name in data.marker_names:
        intervals[name] = visits[name].to_numpy()
    static = data.patients[list(data.signature_columns)].reindex(visits["patient_id"]).to_numpy()
    intervals[list(data.signature_columns)] = static
    return intervals


def fit_time_varying(
    intervals: pd.DataFrame, covariates: tuple[str, ...], penalizer: float, alpha: float
) -> CoxTimeVaryingFitter:
    """lifelines' time-varying Cox model on the counting-process table."""
    constant = [c for c in covariates if intervals[c].nunique() < 2]
    if constant:
        raise CohortError(f"covariate(s) {constant} never vary; leave them out of --marker-cols")
    fitter = CoxTimeVaryingFitter(penalizer=penalizer, alpha=alpha)
    columns = ["patient_id", "start", "stop", "event", *covariates]
    return fitter.fit(intervals[columns], id_col="patient_id", event_col="event", start_col="start", stop_col="stop")


def hazard_ratios(fitter: CoxTimeVaryingFitter) -> pd.DataFrame:
    """Per-unit coefficients, hazard ratios with confidence interval, Wald p-values (``coefficients.csv``)."""
    summary = fitter.summary
    level = f"{100 * (1 - fitter.alpha):g}%"
    return pd.DataFrame(
        {
            "model": "time_varying",
            "covariate": summary.index,
            "coef": summary["coef"].to_numpy(),
            "hr": summary["exp(coef)"].to_numpy(),
            "hr_low": summary[f"exp(coef) lower {level}"].to_numpy(),
            "hr_high": summary[f"exp(coef) upper {level}"].to_numpy(),
            "p": summary["p"].to_numpy(),
        }
    )


def landmark_set(data: LongitudinalData, landmark: float) -> LandmarkSet:
    """The patients with follow-up beyond ``landmark``, their time from it, and what was measured at or before it."""
    at_risk = data.patients[data.patients["time"] > landmark]
    early = data.markers[(data.markers["time"] <= landmark) & data.markers["patient_id"].isin(at_risk.index)]
    measured = at_risk.index.isin(early["patient_id"])
    patients = at_risk[measured].assign(time=lambda frame: frame["time"] - landmark)
    groups = early.groupby("patient_id", sort=False)
    columns = ["time", *data.marker_names]
    histories = [groups.get_group(p)[columns].to_numpy(dtype=np.float64) for p in patients.index]
    markers = groups[list(data.marker_names)]
    snapshots = {
        "baseline": markers.first().reindex(patients.index),
        "last_value": markers.last().reindex(patients.index),
    }
    return LandmarkSet(patients, histories, snapshots, int(len(data.patients) - len(at_risk)), int((~measured).sum()))


@dataclass(frozen=True)
class LongitudinalResult:
    """Everything written to ``<out>/survival/longitudinal/``."""

    config: LongitudinalConfig
    metrics: dict[str, Any]
    coefficients: pd.DataFrame
    intervals: pd.DataFrame
    predictions: pd.DataFrame


def longitudinal_fit(
    config: LongitudinalConfig,
    clinical: TableSource,
    markers: TableSource,
    signatures: TableSource | None = None,
    out: str | Path | None = None,
) -> LongitudinalResult:
    """Validate the tables, fit the time-varying Cox model and cross-validate the landmark models; with ``out``,
    write them to ``<out>/survival/longitudinal/``."""
    data = load_longitudinal(config, clinical, markers, signatures)
    intervals = counting_process(data)
    fitter = fit_time_varying(
        intervals, data.marker_names + data.signature_columns, config.penalizer, 1 - config.ci_level
    )
    coefficients = hazard_ratios(fitter)
    landmark = landmark_set(data, config.landmark)
    predictions, landmark_metrics = cross_validate_landmark(landmark, data.marker_names, data.signature_columns, config)
    metrics = {
        "pathomics_version": __version__,
        "config": config.to_dict(),
        "cohort": {
            "patients": len(data.patients),
            "events": int(data.patients["event"].sum()),
            "marker_rows": len(data.markers),
            "markers": list(data.marker_names),
            "signature_columns": list(data.signature_columns),
            "time_unit": config.time_unit,
        },
        "time_varying": {
            "patients": int(intervals["patient_id"].nunique()),
            "intervals": len(intervals),
            "events": int(intervals["event"].sum()),
            "delayed_entry": int((intervals.groupby("patient_id")["start"].min() > 0).sum()),
            "log_likelihood": float(fitter.log_likelihood_),
            "coefficients": coefficients.drop(columns="model").to_dict(orient="records"),
        },
        "landmark": landmark_metrics,
    }
    result = LongitudinalResult(config, metrics, coefficients, intervals, predictions)
    if out is not None:
        write_longitudinal(result, OutputLayout(out).longitudinal)
    return result


def cross_validate_landmark(
    landmark: LandmarkSet, marker_names: tuple[str, ...], signature_columns: tuple[str, ...], config: LongitudinalConfig
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Out-of-fold landmark predictions of the sequence model and of Cox models on each snapshot of the markers
    (baseline, last value), and their C-indices."""
    patients = landmark.patients
    time, event = patients["time"].to_numpy(), patients["event"].to_numpy()
    if event.sum() < config.folds:
        raise CohortError(
            f"{int(event.sum())} events after the landmark {config.landmark:g} cannot fill {config.folds} folds; "
            "choose an earlier --landmark or fewer --folds"
        )
    folds = patient_folds(patients.index.to_numpy(), event, config.folds, config.seed)
    static = patients[list(signature_columns)].to_numpy(dtype=np.float64)
    settings = SequenceConfig(config.hidden, config.epochs, config.lr, config.weight_decay, config.seed)
    risks = {name: np.empty(len(patients)) for name in ("sequence", *landmark.snapshots)}
    # a marker that is the same for every patient in a snapshot (e.g. a treatment nobody has had yet at the
    # first visit) carries no information there and would make the Cox fit singular: left out, and named
    constant = {name: [c for c in marker_names if snapshot[c].nunique() < 2] for name, snapshot in landmark.snapshots.items()}
    embedding = np.empty((len(patients), config.hidden))
    sets: dict[str, list[m.EvalSet]] = {name: [] for name in risks}
    for fold in range(config.folds):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        log.info(
            "longitudinal: landmark fold %d of %d (%d train, %d test patients)",
            fold + 1,
            config.folds,
            len(train),
            len(test),
        )
        model = fit_sequence(
            [landmark.histories[i] for i in train], static[train], time[train], event[train], config.landmark, settings
        )
        risks["sequence"][test], embedding[test] = predict_sequence(
            model, [landmark.histories[i] for i in test], static[test]
        )
        for name, snapshot in landmark.snapshots.items():
            frame = snapshot.join(patients)
            covariates = tuple(c for c in marker_names if c not in constant[name]) + signature_columns
            if not covariates:  # nothing varies at the landmark: every patient gets the same risk
                risks[name][test] = 0.0
                continue
            cox = CoxModel(Design(numeric=covariates), penalizer=config.penalizer)
            risks[name][test] = cox.fit(frame.iloc[train]).predict_risk(frame.iloc[test])
        for name, values in risks.items():
            sets[name].append(_eval_set(time[train], event[train], time[test], event[test], values[test]))
    predictions = pd.DataFrame(
        {
            "patient_id": patients.index.to_numpy(),
            "fold": folds,
            "time_from_landmark": time,
            "event": event,
            "visits": [len(h) for h in landmark.histories],
            "risk": risks.pop("sequence"),
            **{f"{name}_risk": values for name, values in risks.items()},
        }
    )
    predictions[[f"emb_{k}" for k in range(config.hidden)]] = embedding
    metrics = {
        "time": config.landmark,
        "at_risk": len(patients),
        "events_after": int(event.sum()),
        "excluded_event_or_censored_before": landmark.excluded_before,
        "excluded_no_measurement_before": landmark.excluded_no_history,
        "folds": config.folds,
        "constant_markers": {name: markers for name, markers in constant.items() if markers},
        "models": {name: _concordance(s, config) for name, s in sets.items()},
        "sequence_gain": {name: _gain(sets["sequence"], sets[name], config) for name in landmark.snapshots},
    }
    return predictions, metrics


def _eval_set(
    train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray, event: np.ndarray, risk: np.ndarray
) -> m.EvalSet:
    """A test set for the concordance metrics (the landmark models predict risks, not survival curves)."""
    n = len(time)
    return m.EvalSet(
        train_time,
        train_event,
        time,
        event,
        m.supported_events(train_time, train_event, time, event),
        risk,
        survival=np.empty((n, 0)),
        event_probability=np.full(n, np.nan),
        group=np.zeros(n),
        expected=np.full(n, np.nan),
        event_probability_at=np.empty((n, 0)),
        patient=np.arange(n),
        modalities=np.full(n, "longitudinal"),
    )


def _concordance(sets: list[m.EvalSet], config: LongitudinalConfig) -> dict[str, Any]:
    """Fold means of the registered metrics with percentile bootstrap CIs, and the per-fold Harrell C."""
    result: dict[str, Any] = m.fold_metric_blocks(sets, config.n_bootstrap, config.ci_level, config.seed)
    result["folds"] = [m.harrell_c(s) for s in sets]
    return result


def _gain(sequence: list[m.EvalSet], other: list[m.EvalSet], config: LongitudinalConfig) -> dict[str, float]:
    """Harrell C of the sequence model minus that of ``other`` on the same test patients, with a paired bootstrap
    CI (both models' risks resampled together, as one set with two risk columns)."""
    paired = [
        dataclasses.replace(s, risk=np.column_stack([s.risk, o.risk])) for s, o in zip(sequence, other, strict=True)
    ]

    def gain(s: m.EvalSet) -> float:
        return m.concordance(s.time, s.event, s.risk[:, 0]) - m.concordance(s.time, s.event, s.risk[:, 1])

    low, high = m.bootstrap_ci(gain, paired, config.n_bootstrap, config.ci_level, config.seed)
    return {"estimate": m.fold_mean([gain(s) for s in paired]), "ci_low": low, "ci_high": high}


def write_longitudinal(result: LongitudinalResult, directory: str | Path) -> Path:
    """Write ``metrics.json``, ``coefficients.csv``, ``intervals.csv`` and ``predictions.csv``, each atomically."""
    directory = Path(directory)
    files = ResultFiles(directory)
    write_json(files.metrics, result.metrics)
    for name, frame in (
        ("coefficients", result.coefficients),
        ("intervals", result.intervals),
        ("predictions", result.predictions),
    ):
        with atomic_path(files.table(name)) as tmp:
            frame.to_csv(tmp, index=False)
    return directory
