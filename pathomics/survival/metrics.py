"""Discrimination, calibration and risk-group metrics, computed by scikit-survival and lifelines.

Each metric takes the training outcomes (for the inverse-probability-of-censoring weights), the
test outcomes and the test predictions, and returns NaN where the test set cannot support it (no
events, no comparable pair, a time outside follow-up) rather than failing a whole cross-validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines.statistics import multivariate_logrank_test
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import CensoringDistributionEstimator, kaplan_meier_estimator
from sksurv.util import Surv

GROUP_LABELS = {"median": ("low", "high"), "tertiles": ("low", "intermediate", "high")}


@dataclass(frozen=True)
class EvalSet:
    """Predictions of one fitted model on one test set, with the outcomes of the data it was fitted on."""

    train_time: np.ndarray
    train_event: np.ndarray
    time: np.ndarray
    event: np.ndarray
    ipcw_event: np.ndarray  # events where the training censoring survival is positive (see supported_events)
    risk: np.ndarray
    survival: np.ndarray  # (patients, grid times) survival probabilities
    event_probability: np.ndarray  # 1 - S(calibration time)
    group: np.ndarray  # risk-group labels from training cut-points
    expected: np.ndarray  # the model's cumulative hazard at each patient's own follow-up time
    event_probability_at: np.ndarray  # (patients, stated times) 1 - S(t)
    patient: np.ndarray  # patient ids
    modalities: np.ndarray  # the modalities each prediction used, e.g. 'clinical+radiology'

    def resample(self, index: np.ndarray) -> EvalSet:
        """The same set restricted to (or resampled at) the given test rows."""
        training = {"train_time", "train_event"}
        return EvalSet(**{f.name: getattr(self, f.name)[index] if f.name not in training else getattr(self, f.name)
                          for f in dataclasses.fields(self)})


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index (sksurv ``concordance_index_censored``); NaN without admissible pairs."""
    if len(time) < 2 or not np.asarray(event).any():
        return float("nan")
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 when a resample has no comparable pair: NaN
            return float(concordance_index_censored(np.asarray(event).astype(bool), time, risk)[0])
    except NoComparablePairException:
        return float("nan")


def harrell_c(s: EvalSet) -> float:
    """Harrell's concordance index of an evaluation set."""
    return concordance(s.time, s.event, s.risk)


def uno_c(s: EvalSet) -> float:
    """Uno's IPCW concordance index (sksurv ``concordance_index_ipcw``, censoring from the training data)."""
    if not s.ipcw_event.any():
        return float("nan")
    try:
        test = Surv.from_arrays(s.ipcw_event, s.time)
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 when a resample has no comparable pair: NaN
            return float(concordance_index_ipcw(Surv.from_arrays(s.train_event, s.train_time), test, s.risk)[0])
    except NoComparablePairException:
        return float("nan")


@dataclass(frozen=True)
class FoldMetric:
    """A metric of one evaluation set, reported as the fold mean with a bootstrap CI: its ``metrics.json`` key,
    its report label and the function. Adding one to ``FOLD_METRICS`` puts it in metrics.json (validated,
    in-sample, per fold, external, longitudinal) and in every report table."""

    key: str
    label: str
    score: Callable[[EvalSet], float]


FOLD_METRICS = (FoldMetric("c_index_harrell", "Harrell C", harrell_c), FoldMetric("c_index_uno", "Uno C", uno_c))


def fold_metric_blocks(sets: Sequence[EvalSet], n_bootstrap: int, level: float, seed: int) -> dict[str, dict[str, float]]:
    """``{key: {"estimate", "ci_low", "ci_high"}}`` of every registered metric: fold mean and bootstrap CI."""
    blocks = {}
    for metric in FOLD_METRICS:
        low, high = bootstrap_ci(metric.score, sets, n_bootstrap, level, seed)
        blocks[metric.key] = {"estimate": fold_mean([metric.score(s) for s in sets]), "ci_low": low, "ci_high": high}
    return blocks


def td_auc(s: EvalSet, times: Sequence[float]) -> np.ndarray:
    """Cumulative/dynamic AUC at each time (sksurv ``cumulative_dynamic_auc``); NaN where not estimable."""
    times = np.asarray(times, dtype=float)
    out = np.full(times.shape, np.nan)
    valid = np.array([_has_cases_and_controls(s, t) for t in times], dtype=bool)
    if valid.any():
        train = Surv.from_arrays(s.train_event, s.train_time)
        out[valid] = cumulative_dynamic_auc(train, Surv.from_arrays(s.ipcw_event, s.time), s.risk, times[valid])[0]
    return out


def integrated_brier(s: EvalSet, grid: Sequence[float]) -> float:
    """Integrated Brier score over the grid points inside the test follow-up (sksurv ``integrated_brier_score``)."""
    grid = np.asarray(grid, dtype=float)
    # sksurv's censoring estimate ends at the last training time; a test patient followed past it counts only as
    # a control at every grid time below it, so capping their time there leaves the score unchanged.
    time = np.minimum(s.time, s.train_time.max())
    inside = (grid >= time.min()) & (grid < time.max())
    if inside.sum() < 2:
        return float("nan")
    train = Surv.from_arrays(s.train_event, s.train_time)
    return float(integrated_brier_score(train, Surv.from_arrays(s.event.astype(bool), time), s.survival[:, inside], grid[inside]))


def _has_cases_and_controls(s: EvalSet, t: float) -> bool:
    return bool(s.time.min() <= t < s.time.max() and (s.event.astype(bool) & (s.time <= t)).any())


def supported_events(train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """The test events at which the training censoring survival is positive; the rest count as censored.

    IPCW weights are undefined where that survival is zero (sksurv refuses them); this only happens
    for test events at or beyond the last training follow-up, and never in-sample.
    """
    censoring = CensoringDistributionEstimator().fit(Surv.from_arrays(train_event, train_time))
    within = time < censoring.unique_time_[-1]  # sksurv refuses to extrapolate past the last training time
    positive = np.zeros(len(time), dtype=bool)
    if within.any():
        positive[within] = censoring.predict_proba(time[within]) > 0.0
    return event.astype(bool) & positive


def fold_mean(values: Sequence[float]) -> float:
    """Mean over folds of the estimable values (NaN when none is)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def bootstrap_ci(
    metric: Callable[[EvalSet], float], sets: Sequence[EvalSet], n_resamples: int, level: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the fold mean of ``metric``, resampling patients within each test set."""
    if n_resamples == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = [fold_mean([metric(s.resample(rng.integers(0, len(s.time), len(s.time)))) for s in sets]) for _ in range(n_resamples)]
    finite = np.asarray([v for v in stats if np.isfinite(v)])
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def risk_cut_points(train_risk: np.ndarray, grouping: str) -> np.ndarray:
    """Cut-points of the risk groups (median or tertiles), from training risks only."""
    quantiles = {"median": [0.5], "tertiles": [1 / 3, 2 / 3]}[grouping]
    return np.quantile(train_risk, quantiles)


def assign_groups(risk: np.ndarray, cut_points: np.ndarray, grouping: str) -> np.ndarray:
    """Risk-group label of each patient (a risk equal to a cut-point goes to the lower group)."""
    return np.asarray(GROUP_LABELS[grouping])[np.searchsorted(cut_points, risk, side="left")]


def logrank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """Log-rank p-value across the risk groups present (lifelines), NaN with fewer than two groups."""
    if len(np.unique(group)) < 2:
        return float("nan")
    return float(multivariate_logrank_test(time, group, event).p_value)


def km_at(time: np.ndarray, event: np.ndarray, t: float) -> float:
    """Kaplan–Meier survival at ``t`` (sksurv), the last estimate if ``t`` is past follow-up."""
    times, survival = kaplan_meier_estimator(event.astype(bool), time)
    before = np.searchsorted(times, t, side="right")
    return float(survival[before - 1]) if before else 1.0


def calibration_table(
    time: np.ndarray, event: np.ndarray, event_probability: np.ndarray, t: float, n_groups: int = 5
) -> pd.DataFrame:
    """Mean predicted vs observed event probability at time ``t`` in quantile groups of the prediction.

    ``event_probability`` is 1 - S(t) from the model; the observed value is 1 - Kaplan–Meier(t) of the group,
    with its 95% log-log confidence interval (``observed_low``, ``observed_high``).
    """
    order = np.argsort(event_probability, kind="stable")
    groups = np.array_split(order, min(n_groups, len(order)))
    observed = [_observed_with_ci(time[g], event[g], t) for g in groups]
    return pd.DataFrame(
        {
            "group": np.arange(1, len(groups) + 1),
            "n": [len(g) for g in groups],
            "predicted": [float(event_probability[g].mean()) for g in groups],
            "observed": [o[0] for o in observed],
            "observed_low": [o[1] for o in observed],
            "observed_high": [o[2] for o in observed],
        }
    )


def _observed_with_ci(time: np.ndarray, event: np.ndarray, t: float) -> tuple[float, float, float]:
    """1 - Kaplan–Meier at ``t`` and its 95% log-log interval (sksurv); the interval is NaN where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a group without events has no log-log interval
        times, survival, ci = kaplan_meier_estimator(event.astype(bool), time, conf_type="log-log")
    before = np.searchsorted(times, t, side="right")
    if not before:
        return 0.0, 0.0, 0.0
    low, high = ci[:, before - 1]
    return 1.0 - float(survival[before - 1]), 1.0 - float(high), 1.0 - float(low)
