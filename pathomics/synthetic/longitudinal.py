"""Synthetic nephrectomy cohort with repeated renal-function markers and planted effects of known strength.

Each patient has visits at day 0 and about every ``visit_every`` days until recurrence or censoring, where
two markers are measured: ``egfr`` (mL/min/1.73 m², a patient-specific line plus measurement noise) and
``haemoglobin`` (g/dL, no effect on recurrence). The recurrence hazard is piecewise constant between visits:

    h_i(t) = exp(value_effect · z_i(t) + slope_effect · s_i + pathology_effect · p_i) / baseline_scale

where ``z_i(t)`` is the standardised eGFR *last recorded* at or before ``t`` (so the time-varying Cox model in
counting-process form is exactly the generating model), ``s_i`` the patient's standardised eGFR decline
(slope, positive = falling faster) and ``p_i`` a standardised pathology component carried by the slide
signatures. With ``value_effect`` 0 and a ``slope_effect``, the baseline eGFR says nothing of the hazard
while the trajectory up to a landmark does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pathomics.synthetic.cohort import N_LATENT, latent_signatures

EGFR_MEAN, EGFR_SD = 70.0, 15.0  # population eGFR at surgery
SLOPE_MEAN, SLOPE_SD = -2.0, 6.0  # eGFR change per year
EGFR_NOISE = 2.0  # measurement SD
YEAR = 365.25


@dataclass(frozen=True)
class LongitudinalTruth:
    """The generating model: effects (log-hazard per SD) and each patient's latent slope and pathology."""

    value_effect: float
    slope_effect: float
    pathology_effect: float
    components: pd.DataFrame  # index patient_id; columns slope, pathology (standardised)

    @property
    def egfr_per_unit(self) -> float:
        """The planted time-varying log hazard ratio per 1 mL/min/1.73 m² of recorded eGFR."""
        return self.value_effect / EGFR_SD


def simulate_longitudinal(
    n_patients: int,
    seed: int,
    value_effect: float = 0.0,
    slope_effect: float = 0.0,
    pathology_effect: float = 0.0,
    visit_every: float = 90.0,
    baseline_scale: float = 1500.0,
    follow_up: float = 5 * YEAR,
    n_signature: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, LongitudinalTruth]:
    """Clinical (``patient_id, time, event``), long marker (``patient_id, time, egfr, haemoglobin``) and
    slide-signature tables, in days, and the planted truth. Censoring is uniform over the last half of
    ``follow_up``; visits are jittered by up to a sixth of ``visit_every`` and none is at or after follow-up."""
    if n_signature < N_LATENT:
        raise ValueError(f"n_signature must be at least {N_LATENT}, got {n_signature}")
    rng = np.random.default_rng(seed)
    ids = [f"N{i:04d}" for i in range(n_patients)]
    intercept = rng.normal(EGFR_MEAN, EGFR_SD, n_patients)
    slope = rng.normal(SLOPE_MEAN, SLOPE_SD, n_patients)
    pathology = rng.standard_normal(n_patients)
    haemoglobin = rng.normal(13.0, 1.5, n_patients)
    censoring = rng.uniform(0.5, 1.0, n_patients) * follow_up
    static = slope_effect * (SLOPE_MEAN - slope) / SLOPE_SD + pathology_effect * pathology
    clinical_rows, marker_rows = [], []
    for i, patient in enumerate(ids):
        steps = np.arange(0.0, follow_up, visit_every)
        visits = np.maximum(
            steps + rng.uniform(-visit_every / 6, visit_every / 6, len(steps)) * (steps > 0), 0.0
        ).round()
        egfr = intercept[i] + slope[i] * visits / YEAR + rng.normal(0.0, EGFR_NOISE, len(visits))
        hazard = np.exp(value_effect * (egfr - EGFR_MEAN) / EGFR_SD + static[i]) / baseline_scale
        time, event = _first_event(visits, hazard, rng.exponential(), censoring[i])
        time = np.ceil(time)
        kept = visits < time
        clinical_rows.append((patient, time, event))
        marker_rows.append(
            pd.DataFrame(
                {
                    "patient_id": patient,
                    "time": visits[kept],
                    "egfr": egfr[kept].round(2),
                    "haemoglobin": (haemoglobin[i] + rng.normal(0.0, 0.5, int(kept.sum()))).round(2),
                }
            )
        )
    clinical = pd.DataFrame(clinical_rows, columns=["patient_id", "time", "event"])
    markers = pd.concat(marker_rows, ignore_index=True)
    components = pd.DataFrame(
        {"slope": (SLOPE_MEAN - slope) / SLOPE_SD, "pathology": pathology}, index=pd.Index(ids, name="patient_id")
    )
    mixing = np.linalg.qr(np.random.default_rng(0).standard_normal((n_signature, N_LATENT)))[0].T
    signatures = latent_signatures(components["pathology"], mixing, 1, rng)
    truth = LongitudinalTruth(value_effect, slope_effect, pathology_effect, components)
    return clinical, markers, signatures, truth


def _first_event(visits: np.ndarray, hazard: np.ndarray, budget: float, censor_at: float) -> tuple[float, int]:
    """(time, event): where the cumulative piecewise-constant hazard reaches ``budget`` (an Exp(1) draw),
    or censoring first. ``hazard[k]`` holds from ``visits[k]`` to the next visit (the last one onwards)."""
    ends = np.append(visits[1:], np.inf)
    cumulative = np.concatenate([[0.0], np.cumsum(hazard * (ends - visits))[:-1]])
    k = int(np.searchsorted(cumulative, budget, side="right") - 1)
    recurrence = visits[k] + (budget - cumulative[k]) / hazard[k]
    return (recurrence, 1) if recurrence <= censor_at else (censor_at, 0)
