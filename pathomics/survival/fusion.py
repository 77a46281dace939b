"""The model set (``build_models``: one Cox model per modality and the combined model) and decision-level
fusion over the modalities each patient has (``--missing available``).

One `DecisionFusion` is fitted per combination of modalities, on every
training patient who has at least those (available-case fitting), and each patient is scored by the model
of the modalities they have. So a patient without a radiology score or a slide still gets a prediction,
patients with all modalities get the all-modality model, and the modalities used are recorded per patient.
Risks of different combinations are put on one scale, the log cumulative hazard at a reference time (the
median event time of the training patients with every modality), so that they can be ranked together.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone

from pathomics.errors import CohortError
from pathomics.survival.calibration import baseline_cumulative_hazard
from pathomics.survival.cohort import Cohort
from pathomics.survival.config import SurvivalConfig
from pathomics.survival.cox import CoxModel, DecisionFusion, Design, SurvivalModel


class AvailableFusion(BaseEstimator):
    """Decision fusion of the clinical model and the ``scores`` columns (named ``modalities``) each patient has;
    ``stage`` is the unfitted fusion whose second-stage settings every combination's fusion takes."""

    def __init__(
        self, clinical: CoxModel | None, scores: tuple[str, ...], modalities: tuple[str, ...], stage: DecisionFusion
    ) -> None:
        self.clinical = clinical
        self.scores = scores
        self.modalities = modalities
        self.stage = stage

    def fit(self, data: pd.DataFrame) -> AvailableFusion:
        """Fit one decision fusion per combination of modalities the training patients have; returns self."""
        # Every combination is fitted on a superset of the complete cases, so at their median event time each
        # combination's baseline cumulative hazard is positive and finite.
        complete = data[data[list(self.scores)].notna().all(axis=1)]
        if not complete["event"].any():
            raise CohortError("no training patient with every modality had a recurrence; the fusion cannot be fitted")
        self.reference_time_ = float(np.median(complete.loc[complete["event"] == 1, "time"]))
        self.fusions_: dict[tuple[str, ...], DecisionFusion] = {}
        self.offsets_: dict[tuple[str, ...], float] = {}
        sizes = range(0 if self.clinical is not None else 1, len(self.scores) + 1)
        for pattern in (p for k in sizes for p in itertools.combinations(self.scores, k)):
            rows = data[data[list(pattern)].notna().all(axis=1)]
            if rows.empty or not rows["event"].any():
                continue
            fusion = clone(self.stage).set_params(clinical=self.clinical, scores=pattern).fit(rows)
            self.fusions_[pattern] = fusion
            reference = rows.iloc[[len(rows) // 2]]
            baseline = baseline_cumulative_hazard(fusion, reference, np.array([self.reference_time_]))
            self.offsets_[pattern] = float(np.log(baseline[0]))
        self.complete_ = self.fusions_[tuple(self.scores)]
        return self

    def patterns(self, data: pd.DataFrame) -> list[tuple[str, ...]]:
        """The score columns each patient has."""
        present = data[list(self.scores)].notna().to_numpy()
        return [tuple(s for s, has in zip(self.scores, row, strict=True) if has) for row in present]

    def _groups(self, data: pd.DataFrame) -> dict[tuple[str, ...], np.ndarray]:
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, pattern in enumerate(self.patterns(data)):
            groups.setdefault(pattern, []).append(i)
        unknown = sorted(set(groups) - set(self.fusions_), key=len)
        if unknown:
            raise CohortError(
                f"{len(groups[unknown[0]])} patient(s) have only {list(unknown[0]) or 'no'} modality scores, a combination "
                "the training cohort had no recurrences for; supply their missing modalities"
            )
        return {pattern: np.asarray(rows) for pattern, rows in groups.items()}

    def predict_risk(self, data: pd.DataFrame) -> np.ndarray:
        """Log cumulative hazard at the reference time, from each patient's own modality combination."""
        risk = np.empty(len(data))
        for pattern, rows in self._groups(data).items():
            risk[rows] = self.fusions_[pattern].predict_risk(data.iloc[rows]) + self.offsets_[pattern]
        return risk

    def predict_survival(self, data: pd.DataFrame, times: Sequence[float]) -> np.ndarray:
        """Survival probabilities, shape (patients, times), each from the patient's own modality combination."""
        survival = np.empty((len(data), len(times)))
        for pattern, rows in self._groups(data).items():
            survival[rows] = self.fusions_[pattern].predict_survival(data.iloc[rows], times)
        return survival

    def modalities_used(self, data: pd.DataFrame) -> np.ndarray:
        """'clinical+radiology', 'clinical+pathology', ... per patient."""
        names = dict(zip(self.scores, self.modalities, strict=True))
        lead = ["clinical"] if self.clinical is not None else []
        return np.array(["+".join(lead + [names[s] for s in pattern]) for pattern in self.patterns(data)])

    def coefficients(self) -> pd.DataFrame:
        """The all-modality model's second-stage coefficients."""
        return self.complete_.coefficients()

    def encoding(self) -> dict[str, dict[str, Any]]:
        return self.complete_.encoding()


def modalities_used(model: SurvivalModel | AvailableFusion, data: pd.DataFrame, modalities: Sequence[str]) -> np.ndarray:
    """The modalities behind each patient's prediction: the model's own for one with fixed inputs."""
    if isinstance(model, AvailableFusion):
        return model.modalities_used(data)
    return np.full(len(data), "+".join(modalities), dtype=object)


def usable_rows(model: SurvivalModel | AvailableFusion, data: pd.DataFrame) -> pd.DataFrame:
    """The patients a model can score: for a model of fixed inputs without imputation, those who have them all."""
    if not isinstance(model, CoxModel) or model.design.impute:
        return data
    design = model.design
    return data[data[[*design.numeric, *design.categorical, *design.signature_columns]].notna().all(axis=1)]


def build_models(config: SurvivalConfig, cohort: Cohort) -> dict[str, SurvivalModel]:
    """The unfitted model set: one model per modality present, plus ``combined`` when there are two or more."""
    impute = config.missing == "impute"
    blocks: dict[str, dict[str, Any]] = {}
    if "clinical" in cohort.modalities:
        numeric = tuple(c for c in config.covariates if c not in cohort.categorical)
        blocks["clinical"] = {"numeric": numeric, "categorical": cohort.categorical}
    if "radiology" in cohort.modalities:
        blocks["radiology"] = {"numeric": (config.radiology_col,)}
    if "pathology" in cohort.modalities:
        features = {"signature_columns": cohort.signature_columns, "n_components": config.n_components}
        blocks["pathology"] = features if config.fusion == "features" else {"numeric": (config.risk_col,)}

    penalizer = config.penalizer if len(config.penalizer) > 1 else config.penalizer[0]

    def cox(block: dict[str, Any]) -> CoxModel:
        return CoxModel(
            Design(**block, impute=impute),
            penalizer=penalizer,
            l1_ratio=config.l1_ratio,
            inner_folds=config.inner_folds,
            alpha=1 - config.ci_level,
            seed=config.seed,
        )

    models: dict[str, SurvivalModel] = {name: cox(block) for name, block in blocks.items()}
    if len(blocks) < 2:
        return models
    if config.fusion == "features":
        merged: dict[str, Any] = {}
        for block in blocks.values():
            for key, value in block.items():
                merged[key] = merged.get(key, ()) + value if isinstance(value, tuple) else value
        models["combined"] = cox(merged)
    else:
        scores = tuple(block["numeric"][0] for name, block in blocks.items() if name != "clinical")
        clinical = models.get("clinical")
        fusion = DecisionFusion(clinical, scores, impute=impute, alpha=1 - config.ci_level, penalizer=penalizer,
                                non_negative=config.fusion_weights == "non-negative", inner_folds=config.inner_folds,
                                seed=config.seed)
        if config.missing == "available":
            names = tuple(name for name in blocks if name != "clinical")
            models["combined"] = AvailableFusion(clinical, scores, names, fusion)
        else:
            models["combined"] = fusion
    return models
