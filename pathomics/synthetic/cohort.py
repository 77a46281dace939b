"""Synthetic cohort tables with planted clinical, radiology and pathology effects of known strength.

Recurrence times follow a Weibull proportional-hazards model whose linear predictor is the sum of three
independent standardised components (clinical, radiology, pathology) times their strengths, so a Cox
model on each modality recovers that modality's component and the combined model all three. The tables
follow the cohort contracts of DESIGN.md (``clinical.csv``, ``radiology.csv``, ``signatures.parquet``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pathomics.errors import ConfigError

DEFAULT_STRENGTHS = {"clinical": 0.6, "radiology": 1.2, "pathology": 2.0}
STAGE_EFFECT = {"I": 0.0, "II": 0.5, "III": 1.1, "IV": 1.8}
N_LATENT = 4  # pathology signal + three nuisance directions of the slide embedding


@dataclass(frozen=True)
class PlantedTruth:
    """The generating model: per-modality strengths (log-hazard per SD) and each patient's components."""

    strengths: dict[str, float]
    components: pd.DataFrame  # index patient_id; columns clinical, radiology, pathology (standardised)
    weibull_shape: float
    weibull_scale: float
    censored_fraction: float

    @property
    def linear_predictor(self) -> pd.Series:
        return sum(self.components[k] * v for k, v in self.strengths.items())


def simulate_cohort_tables(
    n_patients: int,
    seed: int,
    strengths: Mapping[str, float] | None = None,
    n_signature: int = 16,
    max_slides: int = 3,
    weibull_shape: float = 1.5,
    weibull_scale: float = 1200.0,
    follow_up: float = 2500.0,
    embedding_seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, PlantedTruth]:
    """Clinical, radiology and slide-signature tables of ``n_patients`` patients, and the planted truth.

    Clinical: ``age`` (years), ``stage`` (I–IV, categorical), ``tumour_size`` (mm), ``centre`` (A/B/C);
    time in days, censored by uniform accrual over ``follow_up`` days and a 10%-a-year loss to follow-up.
    Radiology: a noisy reading of the radiology component. Signatures: 1 to ``max_slides`` slides per
    patient, each with a noisy ``risk`` and ``sig_*`` embedding whose leading principal direction
    carries the pathology component (three weaker nuisance directions and isotropic noise besides).
    The embedding directions depend on ``embedding_seed`` only, so cohorts of different ``seed`` share
    one embedding space, as slides embedded by one backbone do.
    """
    if n_signature < N_LATENT:
        raise ConfigError(f"n_signature must be at least {N_LATENT}, got {n_signature}")
    rng = np.random.default_rng(seed)
    strengths = dict(DEFAULT_STRENGTHS if strengths is None else strengths)
    ids = [f"P{i:04d}" for i in range(n_patients)]
    age = np.clip(rng.normal(62, 10, n_patients), 30, 90).round()
    stage = rng.choice(list(STAGE_EFFECT), n_patients, p=[0.3, 0.3, 0.25, 0.15])
    size = np.exp(rng.normal(np.log(25), 0.4, n_patients)).round(1)
    clinical_raw = 0.03 * (age - 62) + np.vectorize(STAGE_EFFECT.get)(stage) + 0.02 * (size - 25)
    components = pd.DataFrame(
        {
            "clinical": _standardise(clinical_raw),
            "radiology": rng.standard_normal(n_patients),
            "pathology": rng.standard_normal(n_patients),
        },
        index=pd.Index(ids, name="patient_id"),
    )
    lp = sum(components[k].to_numpy() * strengths.get(k, 0.0) for k in components)
    recurrence = weibull_scale * (-np.log(rng.uniform(size=n_patients)) / np.exp(lp)) ** (1 / weibull_shape)
    censoring = np.minimum(rng.uniform(0.3, 1.0, n_patients) * follow_up, rng.exponential(3652.5, n_patients))
    time = np.ceil(np.minimum(recurrence, censoring))
    event = (recurrence <= censoring).astype(int)
    clinical = pd.DataFrame(
        {
            "patient_id": ids,
            "time": time,
            "event": event,
            "age": age,
            "stage": stage,
            "tumour_size": size,
            "centre": rng.choice(["A", "B", "C"], n_patients),
        }
    )
    radiology = pd.DataFrame(
        {
            "patient_id": ids,
            "radiology_score": (components["radiology"] + 0.3 * rng.standard_normal(n_patients)).round(4).to_numpy(),
        }
    )
    mixing = np.linalg.qr(np.random.default_rng(embedding_seed).standard_normal((n_signature, N_LATENT)))[0].T
    signatures = latent_signatures(components["pathology"], mixing, max_slides, rng)
    truth = PlantedTruth(strengths, components, weibull_shape, weibull_scale, float(1 - event.mean()))
    return clinical, radiology, signatures, truth


def _standardise(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / values.std()


def latent_signatures(pathology: pd.Series, mixing: np.ndarray, max_slides: int, rng: np.random.Generator) -> pd.DataFrame:
    """Per-slide rows ``slide_id, patient_id, risk, sig_0..sig_{K-1}, model, fold``; ``mixing`` maps latents to K dims."""
    n_latent, n_signature = mixing.shape
    slides = rng.integers(1, max_slides + 1, len(pathology))
    patient = np.repeat(pathology.index.to_numpy(), slides)
    signal = np.repeat(pathology.to_numpy(), slides)
    nuisance = np.repeat(rng.standard_normal((len(pathology), n_latent - 1)), slides, axis=0)
    latent = np.column_stack([2.0 * signal, nuisance]) + 0.3 * rng.standard_normal((len(patient), n_latent))
    embedding = latent @ mixing + 0.1 * rng.standard_normal((len(patient), n_signature))
    frame = pd.DataFrame(embedding.astype(np.float32), columns=[f"sig_{i}" for i in range(n_signature)])
    frame.insert(0, "risk", (signal + 0.3 * rng.standard_normal(len(patient))).astype(np.float32))
    frame.insert(0, "patient_id", patient)
    frame.insert(0, "slide_id", [f"{p}-S{k}" for p, k in zip(patient, _slide_numbers(slides), strict=True)])
    return frame.assign(model="synthetic", fold=-1)


def _slide_numbers(slides: np.ndarray) -> np.ndarray:
    """0, 1, ... within each patient's run of slides."""
    starts = np.repeat(np.cumsum(slides) - slides, slides)
    return np.arange(int(slides.sum())) - starts
