"""Validation of the model set (patient-level K-fold, leave-one-group-out, external cohort) and the outputs.

``survival_fit`` and ``survival_evaluate`` are what the CLI calls; they write ``<out>/survival/``:
``metrics.json``, ``coefficients.csv``, the plots, ``report.html`` and (fit) the saved model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import LeaveOneGroupOut

from pathomics import __version__
from pathomics.errors import CohortError, ModelError, PathomicsError
from pathomics.folds import row_splits
from pathomics.io import atomic_path, load_pickle, sha256_file, write_json, writing
from pathomics.layout import OutputLayout, ResultFiles
from pathomics.survival import metrics as m
from pathomics.survival.calibration import calibration_intercept, calibration_slope, expected_events
from pathomics.survival.cohort import Cohort, TableSource, load_cohort
from pathomics.survival.config import SurvivalConfig
from pathomics.survival.cox import SurvivalModel
from pathomics.survival.decision import decision_curve, thresholds_grid
from pathomics.survival.fusion import build_models, modalities_used, usable_rows
from pathomics.survival.nomogram import Nomogram
from pathomics.survival.report import coefficients_table, write_survival_report

log = logging.getLogger(__name__)
GRID_POINTS = 50
CORE_METRICS = ("td_auc", "ibs", "n", "events", "calibration_slope", "calibration_intercept")  # and m.FOLD_METRICS


def _core(metrics: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The in-sample block: the registered fold metrics, ``CORE_METRICS`` and ``extra``."""
    keys = {*(f.key for f in m.FOLD_METRICS), *CORE_METRICS, *extra}
    return {k: v for k, v in metrics.items() if k in keys}


@dataclass(frozen=True)
class FittedStudy:
    """What ``evaluate`` needs: the models fitted on the whole cohort, its outcomes and the risk cut-points;
    with the nomogram of the combined model and each model's in-sample metrics on the training cohort."""

    config: SurvivalConfig
    models: dict[str, SurvivalModel]
    train_time: np.ndarray
    train_event: np.ndarray
    cut_points: dict[str, np.ndarray]
    nomogram: Nomogram | None = None
    training: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelResult:
    """Metrics (JSON-ready), coefficients and plot data of one model."""

    metrics: dict[str, Any]
    coefficients: pd.DataFrame
    td_auc_curve: pd.Series  # validated td-AUC over the time grid
    groups: pd.DataFrame  # time, event, group of the validated predictions
    calibration: pd.DataFrame
    predictions: pd.DataFrame  # patient_id, risk, risk_group, event probability at the stated times, modalities


@dataclass(frozen=True)
class SurvivalResult:
    """Everything written to ``<out>/survival/``."""

    config: SurvivalConfig
    validation: str
    cohort: dict[str, Any]
    encoding: dict[str, Any]
    models: dict[str, ModelResult]
    study: FittedStudy


def survival_fit(
    config: SurvivalConfig,
    clinical: TableSource,
    radiology: TableSource | None = None,
    signatures: TableSource | None = None,
    out: str | Path | None = None,
) -> SurvivalResult:
    """Load the cohort, cross-validate and fit the model set; with ``out``, write and save to ``<out>/survival/``."""
    result = cross_validate(load_cohort(config, clinical, radiology, signatures), config)
    if out is not None:
        directory = Path(out) / "survival"
        write_results(result, directory)
        save_study(result.study, directory)
    return result


def survival_evaluate(
    model: str | Path,
    clinical: TableSource,
    radiology: TableSource | None = None,
    signatures: TableSource | None = None,
    out: str | Path | None = None,
) -> SurvivalResult:
    """Apply a saved model set to an external cohort; with ``out``, write ``<out>/survival/``."""
    study = load_study(model)
    hint = (f"the model set at {model} was fitted on these columns; add them to this cohort's table (rename its "
            "columns to match)")
    cohort = load_cohort(dataclasses.replace(study.config, split_by=None), clinical, radiology, signatures, hint=hint)
    result = evaluate_external(study, cohort)
    if out is not None:
        write_results(result, Path(out) / "survival")
    return result


def cross_validate(cohort: Cohort, config: SurvivalConfig) -> SurvivalResult:
    """Validate each model (K-fold or leave-one-group-out), then refit on all patients for the in-sample block."""
    config = resolve_config(config, cohort)
    data, grid = cohort.data, _grid(config)
    splits, validation = _splits(data, config)
    results: dict[str, ModelResult] = {}
    fitted: dict[str, SurvivalModel] = {}
    cut_points: dict[str, np.ndarray] = {}
    training: dict[str, dict[str, Any]] = {}
    for name, model in build_models(config, cohort).items():
        log.info("survival: %s model, %s", name, validation)
        used = _modalities(name, cohort.modalities)
        # a model of one modality under --missing available may find no patient to score in a small fold
        scored = [
            (label, _fit_and_predict(clone(model), data.iloc[train], data.iloc[test], config, grid, used))
            for label, train, test in splits
            if len(usable_rows(model, data.iloc[test]))
        ]
        sets = [s for _, s in scored]
        rows = usable_rows(model, data)
        fitted[name] = clone(model).fit(rows)
        cut_points[name] = m.risk_cut_points(fitted[name].predict_risk(rows), config.risk_groups)
        in_sample_set = _predict(fitted[name], rows, cut_points[name], rows, config, grid, used)
        in_sample = _assess([in_sample_set], fitted[name], config, grid)
        folds = [_fold_summary(label, s) for label, s in scored]
        validated = _assess(sets, fitted[name], config, grid)
        training[name] = _core(in_sample.metrics, ("decision_curve",))
        train_block = _core(training[name])
        results[name] = dataclasses.replace(validated, metrics={**validated.metrics, "folds": folds, "train": train_block})
    study = FittedStudy(
        config, fitted, data["time"].to_numpy(), data["event"].to_numpy(), cut_points, _nomogram(fitted, data, config), training
    )
    return SurvivalResult(config, validation, _cohort_summary(cohort, config), _encoding(fitted), results, study)


def _nomogram(fitted: dict[str, SurvivalModel], data: pd.DataFrame, config: SurvivalConfig) -> Nomogram | None:
    """The nomogram of the combined model (of the only model when there is one); None, logged, if it has no effect."""
    name = "combined" if "combined" in fitted else next(iter(fitted))
    try:
        return Nomogram(fitted[name], config.times).fit(usable_rows(fitted[name], data))
    except ModelError as exc:
        log.warning("survival: no nomogram of the %s model: %s", name, exc)
        return None


def _fold_summary(label: str | int, s: m.EvalSet) -> dict[str, Any]:
    return {
        "fold": label,
        "n": len(s.time),
        "events": int(s.event.sum()),
        **{metric.key: metric.score(s) for metric in m.FOLD_METRICS},
    }


def evaluate_external(study: FittedStudy, cohort: Cohort) -> SurvivalResult:
    """Metrics of the saved models on another cohort (risk groups with the training cut-points)."""
    absent = sorted({"clinical", "radiology", "pathology"} & set(study.models) - set(cohort.modalities))
    if absent:
        raise CohortError(f"the saved model set uses {', '.join(absent)} data; give the matching table(s) for this cohort")
    config, grid = study.config, _grid(study.config)
    train = pd.DataFrame({"time": study.train_time, "event": study.train_event})
    results = {}
    for name, model in study.models.items():
        rows = usable_rows(model, cohort.data)
        predicted = _predict(model, train, study.cut_points[name], rows, config, grid, _modalities(name, cohort.modalities))
        assessed = _assess([predicted], model, config, grid)
        train_block = _core(study.training.get(name, {}))
        results[name] = dataclasses.replace(assessed, metrics={**assessed.metrics, "train": train_block})
    validation = f"external cohort ({cohort.n} patients), models fitted on {len(study.train_time)} patients"
    return SurvivalResult(config, validation, _cohort_summary(cohort, config), _encoding(study.models), results, study)


def resolve_config(config: SurvivalConfig, cohort: Cohort) -> SurvivalConfig:
    """The configuration with evaluation times, calibration time and categorical columns made explicit."""
    event_times = cohort.data.loc[cohort.data["event"] == 1, "time"]
    times = config.times or tuple(float(t) for t in np.quantile(event_times, [0.25, 0.5, 0.75]))
    times = tuple(sorted(set(times)))
    last = float(cohort.data["time"].max())
    if times[-1] >= last:
        raise CohortError(
            f"evaluation time {times[-1]:g} is not before the last follow-up ({last:g} {config.time_unit}); "
            "choose earlier --times"
        )
    calibration_time = config.calibration_time or times[len(times) // 2]
    return dataclasses.replace(config, times=times, calibration_time=calibration_time, categorical=cohort.categorical)


Splits = list[tuple[str | int, np.ndarray, np.ndarray]]


def _splits(data: pd.DataFrame, config: SurvivalConfig) -> tuple[Splits, str]:
    """(label, train rows, test rows) of patient-level folds (stratified by event where possible), or of one
    held-out group per value of ``split_by``; and the scheme in words."""
    if config.split_by:
        groups = data[config.split_by]
        if groups.nunique() < 2:
            raise CohortError(f"--split-by {config.split_by!r} has a single value; it needs two or more groups to hold out")
        splits = [(groups.iloc[test[0]], train, test) for train, test in LeaveOneGroupOut().split(data, groups=groups)]
        return splits, f"leave-one-{config.split_by}-out ({len(splits)} groups)"
    if data["event"].sum() < config.folds:
        raise CohortError(f"{int(data['event'].sum())} events cannot fill {config.folds} folds; use fewer --folds")
    folds = row_splits(data["event"].to_numpy(), config.folds, config.seed)
    return [(i, train, test) for i, (train, test) in enumerate(folds)], f"{config.folds}-fold patient-level cross-validation"


def _grid(config: SurvivalConfig) -> np.ndarray:
    """Time grid of the integrated Brier score and the td-AUC curve: the span of the evaluation times."""
    times = config.times or ()
    return np.linspace(times[0], times[-1], GRID_POINTS) if len(times) > 1 else np.asarray(times, dtype=float)


def _modalities(name: str, present: Sequence[str]) -> tuple[str, ...]:
    """The modalities a model of the set uses: its own, or all of them for ``combined``."""
    return tuple(present) if name == "combined" else (name,)


def _fit_and_predict(
    model: SurvivalModel,
    train: pd.DataFrame,
    test: pd.DataFrame,
    config: SurvivalConfig,
    grid: np.ndarray,
    used: Sequence[str],
) -> m.EvalSet:
    """Fit on ``train``; predict ``test`` with risk groups cut at the training risks' quantiles (the patients the
    model can score, in both)."""
    train, test = usable_rows(model, train), usable_rows(model, test)
    model.fit(train)
    cut_points = m.risk_cut_points(model.predict_risk(train), config.risk_groups)
    return _predict(model, train, cut_points, test, config, grid, used)


def _predict(
    model: SurvivalModel,
    train: pd.DataFrame,
    cut_points: np.ndarray,
    test: pd.DataFrame,
    config: SurvivalConfig,
    grid: np.ndarray,
    used: Sequence[str],
) -> m.EvalSet:
    risk = model.predict_risk(test)
    times = config.times or ()
    survival = model.predict_survival(test, [*grid, *times, config.calibration_time])
    train_time, train_event, time, event = (frame[c].to_numpy() for frame in (train, test) for c in ("time", "event"))
    return m.EvalSet(
        train_time=train_time,
        train_event=train_event,
        time=time,
        event=event,
        ipcw_event=m.supported_events(train_time, train_event, time, event),
        risk=risk,
        survival=survival[:, : len(grid)],
        event_probability=1.0 - survival[:, -1],
        group=m.assign_groups(risk, cut_points, config.risk_groups),
        expected=expected_events(model, test),
        event_probability_at=1.0 - survival[:, len(grid) : -1],
        patient=test["patient_id"].to_numpy() if "patient_id" in test else np.arange(len(test)).astype(str),
        modalities=modalities_used(model, test, used),
    )


def _assess(sets: Sequence[m.EvalSet], model: SurvivalModel, config: SurvivalConfig, grid: np.ndarray) -> ModelResult:
    """Fold-mean metrics with bootstrap CIs, and risk groups and calibration on the pooled test predictions."""
    concordance = m.fold_metric_blocks(sets, config.n_bootstrap, config.ci_level, config.seed)
    auc = np.array([m.td_auc(s, config.times) for s in sets])
    curve = np.array([m.td_auc(s, grid) for s in sets])
    pooled = m.EvalSet(sets[0].train_time, sets[0].train_event, **{
        f.name: np.concatenate([getattr(s, f.name) for s in sets])
        for f in dataclasses.fields(m.EvalSet) if f.name not in ("train_time", "train_event")
    })
    time, event, probability, group = pooled.time, pooled.event, pooled.event_probability, pooled.group
    calibration = m.calibration_table(time, event, probability, config.calibration_time)
    groups = pd.DataFrame(
        {"time": time, "event": event, "group": pd.Categorical(group, categories=m.GROUP_LABELS[config.risk_groups])}
    )
    metrics = {
        **concordance,
        "td_auc": {_time_key(t): m.fold_mean(auc[:, i]) for i, t in enumerate(config.times)},
        "ibs": m.fold_mean([m.integrated_brier(s, grid) for s in sets]),
        "n": len(time),
        "events": int(event.sum()),
        "risk_groups": {
            "method": config.risk_groups,
            "n": groups["group"].value_counts(sort=False).to_dict(),
            "logrank_p": m.logrank_p(time, event, group),
        },
        "calibration": {"time": config.calibration_time, "groups": calibration.to_dict(orient="records")},
        # pooled over the test sets, like the grouped calibration
        "calibration_slope": calibration_slope(pooled.risk, time, event),
        "calibration_intercept": calibration_intercept(pooled.expected, event),
        "decision_curve": decision_curve(
            time, event, pooled.event_probability_at, config.times, thresholds_grid(config.thresholds)
        ),
        "penalizer": getattr(model, "penalizer_", None),
    }
    curve_series = pd.Series([m.fold_mean(curve[:, i]) for i in range(len(grid))], index=grid, name="td_auc")
    predictions = pd.DataFrame({"patient_id": pooled.patient, "risk": pooled.risk, "risk_group": group})
    for i, t in enumerate(config.times):
        predictions[f"recurrence_by_{t:g}"] = pooled.event_probability_at[:, i]
    predictions["modalities"] = pooled.modalities
    return ModelResult(metrics, model.coefficients(), curve_series, groups, calibration, predictions)


def _time_key(t: float) -> str:
    return f"{t:.10g}"


def _cohort_summary(cohort: Cohort, config: SurvivalConfig) -> dict[str, Any]:
    return {
        "clinical_rows": cohort.clinical_rows,
        "n": cohort.n,
        "events": cohort.events,
        "dropped": dict(cohort.dropped),
        "dropped_total": sum(cohort.dropped.values()),
        "unmatched": dict(cohort.unmatched),
        "modalities": list(cohort.modalities),
        "availability": cohort.availability(config),
        "missing_policy": config.missing,
        "time_unit": config.time_unit,
    }


def _encoding(models: dict[str, SurvivalModel]) -> dict[str, Any]:
    return next((model.encoding() for model in models.values() if model.encoding()), {})


def write_results(result: SurvivalResult, directory: str | Path) -> Path:
    """Write ``metrics.json``, ``coefficients.csv``, the plots and ``report.html`` into ``directory``."""
    directory = Path(directory)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    document = {
        "pathomics_version": __version__,
        "config": result.config.to_dict(),
        "validation": result.validation,
        "cohort": result.cohort,
        "encoding": result.encoding,
        "models": {name: r.metrics for name, r in result.models.items()},
    }
    files = ResultFiles(directory)
    write_json(files.metrics, document)
    _write_csv(coefficients_table(result), files.table("coefficients"))
    predictions = pd.concat([r.predictions.assign(model=name) for name, r in result.models.items()], ignore_index=True)
    _write_csv(predictions[["model", *predictions.columns.drop("model")]], files.table("predictions"))
    if result.study.nomogram is not None:
        _write_csv(result.study.nomogram.table(), files.table("nomogram"))
    write_survival_report(result, directory)  # the figures, nomogram.png among them, and report.html
    return directory


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_study(study: FittedStudy, directory: str | Path) -> None:
    """``model.pkl`` (the fitted models, pickled) and ``model.json`` (their configuration and library versions)."""
    import lifelines
    import sksurv

    directory = Path(directory)
    files = ResultFiles(directory)
    with atomic_path(files.model) as tmp:
        with open(tmp, "wb") as file:
            pickle.dump(study, file, protocol=pickle.HIGHEST_PROTOCOL)
        model_sha256 = sha256_file(tmp)
    provenance = {
        "model_sha256": model_sha256,
        "pathomics_version": __version__,
        "lifelines_version": lifelines.__version__,
        "sksurv_version": sksurv.__version__,
        "config": study.config.to_dict(),
        "models": list(study.models),
        "n": len(study.train_time),
        "events": int(study.train_event.sum()),
        "cut_points": study.cut_points,
    }
    write_json(files.model_provenance, provenance)


def _recorded_sha256(provenance: Path) -> str | None:
    """The model file's SHA-256 that ``save_study`` recorded in ``model.json``."""
    try:
        return json.loads(provenance.read_text()).get("model_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        raise PathomicsError(f"{provenance} cannot be read ({exc}); re-run 'pathomics survival fit'") from exc


def load_study(directory: str | Path) -> FittedStudy:
    """The model set saved by ``survival fit``; ``directory`` is its ``--out`` or the ``survival/`` folder in it.

    The file is a pickle: load only models you made or trust, as unpickling can run code.
    """
    directory = Path(directory)
    path = next((p for p in (ResultFiles(directory).model, OutputLayout(directory).survival_files.model) if p.is_file()), None)
    if path is None:
        raise PathomicsError(f"no saved survival model in {directory}; pass the --out folder of 'pathomics survival fit'")
    recorded = ResultFiles(path.parent).model_provenance
    expected = _recorded_sha256(recorded) if recorded.is_file() else None  # folders saved before the hash was recorded
    if expected is not None and sha256_file(path) != expected:
        raise PathomicsError(f"{path} is damaged or was changed after it was saved (its SHA-256 differs from the one in "
                             f"{recorded}); re-run 'pathomics survival fit'")
    study = load_pickle(path, "re-run 'pathomics survival fit'")
    if not isinstance(study, FittedStudy):
        raise PathomicsError(f"{path} is not a pathomics survival model; re-run 'pathomics survival fit'")
    return study
