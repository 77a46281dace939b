"""A synthetic cohort in which tumour grade may change how strongly the pathology score predicts recurrence.

Each patient has a true grade (low/high), a predicted probability of high grade (as a grade classifier
would give: right about 90% of the time), a standardised clinical score and a standardised pathology score.
Recurrence times are exponential with log-hazard

    0.5 · clinical + beta_p(grade) · pathology + 0.5 · [grade = high]

where ``beta_p`` is ``pathology_effect[grade]``: unequal values plant an effect modification (the seed S5
premise: pathology matters more in high-grade tumours), equal values plant none. Censoring is uniform.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pathomics.errors import ConfigError

GRADES = ("low", "high")
MODIFIED = {"low": 0.1, "high": 1.3}   # pathology log-hazard per SD, by grade: grade modifies the effect
UNMODIFIED = {"low": 0.7, "high": 0.7}


def simulate_grade_cohort(n_patients: int, pathology_effect: dict[str, float] = MODIFIED, seed: int = 0,
                          grade_noise: float = 1.0, censoring: float = 0.3) -> pd.DataFrame:
    """One row per patient: ``patient_id, time, event, grade, p_grade_high, clinical, pathology``.

    ``p_grade_high`` is a sigmoid of ±2.5 (true grade) plus Gaussian noise of SD ``grade_noise``;
    ``censoring`` is about the censored fraction (uniform censoring times)."""
    if n_patients < 10 or set(pathology_effect) != set(GRADES) or not 0 <= censoring < 1:
        raise ConfigError(f"grade cohort needs n_patients >= 10, pathology_effect for {GRADES}, censoring in [0, 1)")
    rng = np.random.default_rng(seed)
    high = rng.random(n_patients) < 0.4
    clinical, pathology = rng.standard_normal(n_patients), rng.standard_normal(n_patients)
    beta = np.where(high, pathology_effect["high"], pathology_effect["low"])
    log_hazard = 0.5 * clinical + beta * pathology + 0.5 * high
    event_time = rng.exponential(1.0 / (0.1 * np.exp(log_hazard)))
    censor_time = rng.uniform(0, np.quantile(event_time, 1 - censoring) * 2, n_patients) if censoring else np.inf
    logit = np.where(high, 2.5, -2.5) + grade_noise * rng.standard_normal(n_patients)
    return pd.DataFrame({
        "patient_id": [f"P{i:05d}" for i in range(n_patients)],
        "time": np.minimum(event_time, censor_time),
        "event": (event_time <= censor_time).astype(int),
        "grade": np.where(high, "high", "low"),
        "p_grade_high": 1 / (1 + np.exp(-logit)),
        "clinical": clinical,
        "pathology": pathology,
    })
