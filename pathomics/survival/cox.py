"""Cox models of recurrence: design encoding, penalised Cox fits and decision-level fusion.

Estimators follow the scikit-learn contract (hyper-parameters in the constructor, ``fit()`` returns
self, fitted attributes end in ``_``); the Cox fits themselves are lifelines' ``CoxPHFitter`` (Efron
ties, its only method), never re-implemented here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning
from sklearn.base import BaseEstimator, clone
from sklearn.decomposition import PCA
from sksurv.metrics import concordance_index_censored

from pathomics.errors import CohortError, FitWarning
from pathomics.folds import row_splits

MODEL_NAMES = ("clinical", "radiology", "pathology", "combined")
CLINICAL_LP = "clinical_lp"
# Newton-Raphson tolerance tighter than lifelines' default, so coefficients agree with a direct fit to 1e-6.
_FIT_OPTIONS = {"precision": 1e-10}
# A standardised coefficient this large (HR > 20,000 per SD) means the covariate separates events: the
# unpenalised likelihood has no finite maximum. Such a fit is redone with a small ridge penalty and flagged.
SEPARATION_COEF = 10.0
STABILISING_PENALIZER = 0.1


class Design(BaseEstimator):
    """Raw cohort columns to the Cox design matrix on the covariates' original scale.

    Categorical covariates are one-hot encoded against the first level in sorted order (the stated
    reference level), ``sig_*`` columns are reduced to their first ``n_components`` principal
    components, and with ``impute`` missing numeric values take the training mean plus an indicator.
    """

    def __init__(
        self,
        numeric: tuple[str, ...] = (),
        categorical: tuple[str, ...] = (),
        signature_columns: tuple[str, ...] = (),
        n_components: int = 0,
        impute: bool = False,
    ) -> None:
        self.numeric = numeric
        self.categorical = categorical
        self.signature_columns = signature_columns
        self.n_components = n_components
        self.impute = impute

    def fit(self, data: pd.DataFrame) -> Design:
        """Learn the categorical levels, the imputation means and the signature components from ``data``."""
        self.levels_ = {c: sorted(data[c].dropna().unique()) for c in self.categorical}
        self.fill_ = data[list(self.numeric)].mean()
        self.indicators_ = [c for c in self.numeric if self.impute and data[c].isna().any()]
        if self.signature_columns:
            signatures = data[list(self.signature_columns)]
            self.signature_fill_ = signatures.mean()
            self.signature_indicator_ = bool(self.impute and signatures.isna().any(axis=None))
            self.pca_ = PCA(n_components=self.n_components).fit(signatures.fillna(self.signature_fill_).to_numpy())
        self.columns_ = list(self.transform(data).columns)
        return self

    def transform(self, data: pd.DataFrame) -> pd.DataFrame:
        """The encoded design matrix (unstandardised), one row per patient."""
        parts = [data[list(self.numeric)].fillna(self.fill_) if self.impute else data[list(self.numeric)]]
        parts += [data[c].isna().astype(float).rename(f"{c}[missing]") for c in self.indicators_]
        for column, levels in self.levels_.items():
            unseen = sorted(set(data[column].dropna()) - set(levels))
            if unseen:
                raise CohortError(
                    f"covariate {column!r} has level(s) {unseen} not seen in the training data (levels {levels}); "
                    "merge rare levels or recode the column"
                )
            parts += [(data[column] == level).astype(float).rename(f"{column}[{level}]") for level in levels[1:]]
        if self.signature_columns:
            signatures = data[list(self.signature_columns)]
            scores = self.pca_.transform(signatures.fillna(self.signature_fill_).to_numpy())
            parts.append(pd.DataFrame(scores, index=data.index, columns=[f"sig_pc{i + 1}" for i in range(scores.shape[1])]))
            if self.signature_indicator_:
                parts.append(signatures.isna().all(axis=1).astype(float).rename("sig[missing]"))
        return pd.concat(parts, axis=1).astype(float)

    def encoding(self) -> dict[str, dict[str, Any]]:
        """Reference level and levels of each categorical covariate, for the outputs."""
        return {c: {"reference": levels[0], "levels": list(levels)} for c, levels in self.levels_.items()}


class CoxModel(BaseEstimator):
    """Cox proportional-hazards model on a `Design`, standardised on the training data.

    ``penalizer`` is one value or a sequence; with several, the value with the best mean Harrell C over
    ``inner_folds`` inner folds of the training data is chosen (ties: the larger penalty). Reported
    coefficients are per unit of the encoded covariates (standardisation undone).
    """

    def __init__(
        self,
        design: Design,
        penalizer: float | Sequence[float] = 0.0,
        l1_ratio: float = 0.0,
        inner_folds: int = 3,
        alpha: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.design = design
        self.penalizer = penalizer
        self.l1_ratio = l1_ratio
        self.inner_folds = inner_folds
        self.alpha = alpha
        self.seed = seed

    def fit(self, data: pd.DataFrame) -> CoxModel:
        """Fit on ``data`` (the covariate columns, ``time`` and ``event``); returns the fitted model."""
        grid = [float(p) for p in np.atleast_1d(self.penalizer)]
        self.inner_scores_ = {p: self._inner_score(data, p) for p in grid} if len(grid) > 1 else {}
        self.penalizer_ = max(self.inner_scores_, key=lambda p: (self.inner_scores_[p], p)) if self.inner_scores_ else grid[0]
        self.design_ = clone(self.design).fit(data)
        encoded = self.design_.transform(data)
        self.mean_, self.scale_ = encoded.mean(), encoded.std(ddof=0)
        constant = list(self.scale_.index[~(self.scale_ > 1e-12 * (1 + self.mean_.abs()))])
        if constant:
            raise CohortError(f"covariate column(s) {constant} are constant in the training data; remove or recode them")
        frame = self._standardise(data).assign(time=data["time"].to_numpy(), event=data["event"].to_numpy())
        self.cph_ = self._fit_cph(frame, self.penalizer_)
        self.separating_: tuple[str, ...] = ()
        self.stabilised_ = False
        if self.penalizer_ < STABILISING_PENALIZER:
            self.separating_ = self._diverging(frame) if self.cph_ is None else tuple(
                self.cph_.params_.index[self.cph_.params_.abs().to_numpy() > SEPARATION_COEF])
            if self.separating_ or self.cph_ is None:
                reason = (f"covariate(s) {', '.join(self.separating_)} separate events: the unpenalised Cox model has "
                          "no finite estimate" if self.separating_ else
                          f"the unpenalised Cox model on {len(frame)} patients, {int(frame['event'].sum())} events, "
                          "does not converge")
                warnings.warn(f"{reason}; refitted with ridge penalizer {STABILISING_PENALIZER} and flagged in "
                              "the coefficients table", FitWarning, stacklevel=2)
                self.cph_, self.stabilised_ = self._fit_cph(frame, STABILISING_PENALIZER), True
        if self.cph_ is None:
            raise CohortError("the Cox model does not converge; check the covariates for collinearity or too few "
                              "events, or raise --penalizer")
        return self

    def _fit_cph(self, frame: pd.DataFrame, penalizer: float) -> CoxPHFitter | None:
        """A lifelines fit, or None when Newton-Raphson does not converge."""
        cph = CoxPHFitter(penalizer=penalizer, l1_ratio=self.l1_ratio, alpha=self.alpha)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                return cph.fit(frame, duration_col="time", event_col="event", fit_options=_FIT_OPTIONS)
        except (ConvergenceError, ConvergenceWarning):
            return None

    def _diverging(self, frame: pd.DataFrame) -> tuple[str, ...]:
        """Covariates whose coefficients keep growing as a small ridge penalty shrinks tenfold: under separation
        a coefficient grows by about log(10) each time, a finite estimate barely moves."""
        fits = [self._fit_cph(frame, penalizer) for penalizer in (1e-3, 1e-4)]
        if fits[0] is None or fits[1] is None:
            return ()
        growth = fits[1].params_.abs() - fits[0].params_.abs()
        return tuple(growth.index[growth.to_numpy() > 0.5])

    def _standardise(self, data: pd.DataFrame) -> pd.DataFrame:
        return (self.design_.transform(data) - self.mean_) / self.scale_

    def _inner_score(self, data: pd.DataFrame, penalizer: float) -> float:
        """Mean Harrell C of a fixed-penalty model over inner folds of ``data``."""
        model = clone(self).set_params(penalizer=penalizer)
        splits = row_splits(data["event"].to_numpy(), self.inner_folds, self.seed)
        scores = [
            concordance_index_censored(
                data["event"].iloc[test].astype(bool).to_numpy(),
                data["time"].iloc[test].to_numpy(),
                model.fit(data.iloc[train]).predict_risk(data.iloc[test]),
            )[0]
            for train, test in splits
        ]
        return float(np.mean(scores))

    def predict_risk(self, data: pd.DataFrame) -> np.ndarray:
        """Linear predictor (log partial hazard): higher means earlier recurrence."""
        return self.cph_.predict_log_partial_hazard(self._standardise(data)).to_numpy()

    def predict_survival(self, data: pd.DataFrame, times: Sequence[float]) -> np.ndarray:
        """Survival probabilities, shape (patients, times), from the Breslow baseline."""
        return self.cph_.predict_survival_function(self._standardise(data), times=list(times)).to_numpy().T

    def coefficients(self) -> pd.DataFrame:
        """Per-unit coefficients, hazard ratios with confidence interval, and Wald p-values."""
        summary = self.cph_.summary
        scale = self.scale_.reindex(summary.index).to_numpy()
        low, high = (summary[f"coef {side} {100 * (1 - self.alpha):g}%"].to_numpy() / scale for side in ("lower", "upper"))
        coef = summary["coef"].to_numpy() / scale
        with np.errstate(over="ignore"):  # per unit of a covariate with a tiny spread the HR is honestly inf
            hr, hr_low, hr_high = np.exp(coef), np.exp(low), np.exp(high)
        flag = ["separates events; ridge-stabilised" if c in self.separating_ else
                "ridge-stabilised (no unpenalised convergence)" if self.stabilised_ and not self.separating_ else ""
                for c in summary.index]
        return pd.DataFrame(
            {"covariate": summary.index, "coef": coef, "hr": hr, "hr_low": hr_low, "hr_high": hr_high,
             "p": summary["p"].to_numpy(), "flag": flag}
        )

    def encoding(self) -> dict[str, dict[str, Any]]:
        """Reference level and levels of each categorical covariate."""
        return self.design_.encoding()


class DecisionFusion(BaseEstimator):
    """Decision-level fusion: a second-stage Cox on the clinical linear predictor and the modality scores.

    ``clinical`` (optional) is fitted first on the training data; its in-sample linear predictor joins
    the ``scores`` columns (radiology score, pathology risk) in a second-stage Cox model with ``penalizer``
    (one value, or several chosen by inner cross-validation). With ``non_negative`` the second stage is a
    stacking with non-negative weights: an input whose weight comes out negative (a modality that, given the
    others, ranks patients backwards on the training data) is dropped and the stage refitted, so that a
    noisy modality cannot pull the fusion below its best input.
    """

    def __init__(
        self,
        clinical: CoxModel | None,
        scores: tuple[str, ...],
        impute: bool = False,
        alpha: float = 0.05,
        penalizer: float | Sequence[float] = 0.0,
        non_negative: bool = False,
        inner_folds: int = 3,
        seed: int = 0,
    ) -> None:
        self.clinical = clinical
        self.scores = scores
        self.impute = impute
        self.alpha = alpha
        self.penalizer = penalizer
        self.non_negative = non_negative
        self.inner_folds = inner_folds
        self.seed = seed

    def fit(self, data: pd.DataFrame) -> DecisionFusion:
        """Fit the clinical model, then the second stage on its linear predictor and the scores; returns self."""
        self.clinical_ = clone(self.clinical).fit(data) if self.clinical is not None else None
        inputs = self.stage_inputs(data)
        kept = [*((CLINICAL_LP,) if self.clinical_ is not None else ()), *self.scores]
        while True:
            self.stage_ = CoxModel(Design(numeric=tuple(kept), impute=self.impute), penalizer=self.penalizer,
                                   inner_folds=self.inner_folds, alpha=self.alpha, seed=self.seed).fit(inputs)
            weights = self.stage_.cph_.params_.reindex(kept)  # the inputs' weights, not imputation indicators'
            if not self.non_negative or len(kept) == 1 or weights.min() >= 0:
                break
            kept.remove(str(weights.idxmin()))
        self.penalizer_ = self.stage_.penalizer_
        return self

    def stage_inputs(self, data: pd.DataFrame) -> pd.DataFrame:
        """The second stage's columns: ``time``, ``event``, the scores and the clinical linear predictor."""
        inputs = data[["time", "event", *self.scores]]
        if self.clinical_ is None:
            return inputs
        return inputs.assign(**{CLINICAL_LP: self.clinical_.predict_risk(data)})

    def predict_risk(self, data: pd.DataFrame) -> np.ndarray:
        """The second stage's linear predictor: higher means earlier recurrence."""
        return self.stage_.predict_risk(self.stage_inputs(data))

    def predict_survival(self, data: pd.DataFrame, times: Sequence[float]) -> np.ndarray:
        """Survival probabilities, shape (patients, times), from the second stage's Breslow baseline."""
        return self.stage_.predict_survival(self.stage_inputs(data), times)

    def coefficients(self) -> pd.DataFrame:
        """The second stage's hazard ratios: per unit of the clinical linear predictor and of each score."""
        return self.stage_.coefficients()

    def encoding(self) -> dict[str, dict[str, Any]]:
        """The clinical model's categorical encoding (empty without one)."""
        return self.clinical_.encoding() if self.clinical_ is not None else {}


SurvivalModel = CoxModel | DecisionFusion
