"""Calibration slope and intercept of a frozen Cox model on any cohort.

Slope: the coefficient of the model's linear predictor refitted by a Cox model on the cohort (lifelines'
``CoxPHFitter``, Efron ties); 1 is ideal, below 1 means the predictions are too extreme (over-fitting).
Intercept: calibration-in-the-large, ``log(observed / expected events)``, where each patient's expected
count is the model's cumulative hazard at their own follow-up time. It is the intercept of the Poisson
recalibration model ``event ~ 1 + offset(log H_i(T_i))`` (Crowson, Atkinson & Therneau 2016, Stat Methods
Med Res 25:1692), whose estimate is closed-form; 0 is ideal, above 0 means the model predicts too few
recurrences on this cohort, below 0 too many.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning

if TYPE_CHECKING:
    from pathomics.survival.cox import SurvivalModel



def calibration_slope(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Cox coefficient of the linear predictor ``risk`` refitted on (time, event); NaN without events or spread."""
    if not event.any() or np.ptp(risk) == 0:
        return float("nan")
    frame = pd.DataFrame({"lp": risk, "time": time, "event": event})
    try:
        with warnings.catch_warnings():  # a refit that does not converge (a separating score) has no slope to report
            warnings.simplefilter("error", ConvergenceWarning)
            fitted = CoxPHFitter().fit(frame, duration_col="time", event_col="event", fit_options={"precision": 1e-10})
    except (ConvergenceError, ConvergenceWarning):
        return float("nan")
    return float(fitted.params_["lp"])


def calibration_intercept(expected: np.ndarray, event: np.ndarray) -> float:
    """``log(sum of events / sum of expected events)``; NaN without events or without a finite expectation."""
    observed, total = float(np.sum(event)), float(np.sum(expected))
    return float(np.log(observed / total)) if observed > 0 and 0 < total < np.inf else float("nan")


def expected_events(model: SurvivalModel, data: pd.DataFrame, chunk: int = 256) -> np.ndarray:
    """Each patient's cumulative hazard at their own follow-up time, ``-log S_i(T_i)`` from the model's own
    survival prediction (in chunks of patients, each predicted at the chunk's times)."""
    time = data["time"].to_numpy()
    expected = np.empty(len(data))
    for start in range(0, len(data), chunk):
        rows = slice(start, start + chunk)
        with np.errstate(divide="ignore"):  # a survival of exactly 0 is an infinite expected count
            expected[rows] = -np.log(np.diagonal(model.predict_survival(data.iloc[rows], list(time[rows]))))
    return expected


def baseline_cumulative_hazard(model: SurvivalModel, reference: pd.DataFrame, times: np.ndarray) -> np.ndarray:
    """``H0(t)`` such that the model's survival is ``exp(-H0(t) exp(predict_risk))``, from one reference row."""
    survival = model.predict_survival(reference, list(times))[0]
    return -np.log(survival) / float(np.exp(model.predict_risk(reference)[0]))
