"""A nomogram of a fitted Cox model: points per covariate, total points to recurrence-free probability.

The model's linear predictor is written as a constant plus one linear term per covariate of the raw
tables (a categorical covariate is one term with a value per level; decision-level fusion is expanded
through the clinical linear predictor into the clinical covariates). Each term's points are its
contribution minus its smallest contribution over the training cohort, scaled so that the term with the
widest range spans 0-``max_points``; hence ``lp = lp_at_zero_points + total_points / scale_`` exactly, and
recurrence-free probability at ``t`` is ``exp(-H0(t) exp(lp))``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from pathomics.errors import ModelError
from pathomics.survival.calibration import baseline_cumulative_hazard
from pathomics.survival.cox import CLINICAL_LP, CoxModel, DecisionFusion, Design, SurvivalModel

NOMOGRAM_PROBABILITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Term:
    """One covariate's part of the linear predictor: ``sum(weights * encoded columns)``.

    ``values`` are the covariate values shown on its axis (tick values, or the levels of a categorical
    covariate, reference first) and ``contributions`` their contributions to the linear predictor.
    """

    name: str
    columns: tuple[str, ...]
    weights: tuple[float, ...]
    values: tuple[object, ...]
    contributions: tuple[float, ...]
    low: float  # smallest contribution over the training cohort (0 points)
    high: float


def linear_form(model: SurvivalModel, data: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, list[Design]]:
    """The encoded design matrix, per-unit weights and designs of the model: ``lp = const + X @ weights``."""
    fused = model
    if isinstance(fused, CoxModel):
        encoded = fused.design_.transform(data)
        return encoded, fused.cph_.params_ / fused.scale_.reindex(fused.cph_.params_.index), [fused.design_]
    if not isinstance(fused, DecisionFusion):
        raise ModelError(f"cannot draw a nomogram of a {type(fused).__name__}")
    stage_x, stage_w, designs = linear_form(fused.stage_, fused.stage_inputs(data))
    if fused.clinical_ is None or CLINICAL_LP not in stage_w.index:  # no clinical model, or stacking dropped it
        return stage_x, stage_w, designs
    clinical_x, clinical_w, clinical_designs = linear_form(fused.clinical_, data)
    weights = pd.concat([clinical_w * stage_w[CLINICAL_LP], stage_w.drop(CLINICAL_LP)])
    return pd.concat([clinical_x, stage_x.drop(columns=CLINICAL_LP)], axis=1), weights, clinical_designs + designs


class Nomogram(BaseEstimator):
    """Points of each covariate and predicted recurrence-free probability at ``times``, fitted on training data.

    Of a fusion over the modalities each patient has, the nomogram is that of its all-modality model,
    fitted on the training patients who have every modality.
    """

    def __init__(self, model: SurvivalModel, times: Sequence[float], max_points: float = 100.0) -> None:
        self.model = model
        self.times = times
        self.max_points = max_points

    def fit(self, data: pd.DataFrame) -> Nomogram:
        """Points per covariate value and the baseline at ``times``, from the model's fit on ``data``; returns self."""
        self.model_ = getattr(self.model, "complete_", self.model)
        encoded, weights, designs = linear_form(self.model_, data)
        complete = encoded.notna().all(axis=1).to_numpy()
        encoded, data = encoded[complete], data[complete]
        risk = self.model_.predict_risk(data)
        self.constant_ = float(np.mean(risk - encoded.to_numpy() @ weights.reindex(encoded.columns).to_numpy()))
        self.terms_ = _terms(encoded, weights, designs)
        self.scale_ = self.max_points / max(t.high - t.low for t in self.terms_)
        self.lp_at_zero_ = self.constant_ + sum(t.low for t in self.terms_)
        reference = data.iloc[[int(np.argsort(risk)[len(risk) // 2])]]
        self.baseline_ = baseline_cumulative_hazard(self.model_, reference, np.asarray(self.times, dtype=float))
        return self

    def points(self, data: pd.DataFrame) -> pd.DataFrame:
        """Unrounded points of each term (columns) for each patient (rows)."""
        encoded = linear_form(self.model_, data)[0]
        return pd.DataFrame(
            {t.name: (encoded[list(t.columns)].to_numpy() @ np.asarray(t.weights) - t.low) * self.scale_ for t in self.terms_},
            index=data.index,
        )

    def linear_predictor(self, total_points: np.ndarray) -> np.ndarray:
        """The model's linear predictor from total points (the inverse of the points scale)."""
        return self.lp_at_zero_ + np.asarray(total_points, dtype=float) / self.scale_

    def survival(self, total_points: np.ndarray) -> np.ndarray:
        """Recurrence-free probability at each of ``times``, shape (len(total_points), len(times))."""
        lp = self.linear_predictor(np.atleast_1d(total_points))
        return np.exp(-np.outer(np.exp(lp), self.baseline_))

    def total_points_at(self, probability: float) -> np.ndarray:
        """Total points at which the recurrence-free probability at each time equals ``probability``."""
        lp = np.log(-np.log(probability) / self.baseline_)
        return (lp - self.lp_at_zero_) * self.scale_

    @property
    def max_total(self) -> float:
        return sum(t.high - t.low for t in self.terms_) * self.scale_

    def table(self, total_step: float = 10.0, digits: int = 1) -> pd.DataFrame:
        """The by-hand table: ``variable, value, points`` per covariate value, then ``total points`` rows with
        the recurrence-free probability at each time (``rfs_at_<t>``)."""
        rows = [
            {"variable": t.name, "value": v, "points": round((c - t.low) * self.scale_, digits)}
            for t in self.terms_
            for v, c in zip(t.values, t.contributions, strict=True)
        ]
        totals = np.arange(0.0, self.max_total + total_step, total_step)
        survival = self.survival(totals)
        rows += [
            {"variable": "total points", "value": total, "points": total,
             **{f"rfs_at_{t:g}": round(float(s), 3) for t, s in zip(self.times, row, strict=True)}}
            for total, row in zip(totals, survival, strict=True)
        ]
        return pd.DataFrame(rows)

    def plot(self, path: Path, time_unit: str) -> Path:
        """The classic nomogram figure: a points ruler, one axis per covariate, total points, probabilities."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from pathomics.survival.figures import save_figure

        rows = 3 + len(self.terms_) + len(self.times)
        figure = Figure(figsize=(9.0, 0.62 * rows + 0.6), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        total_x = self.max_points / self.max_total  # total points are drawn on the 0-max_points width

        def ruler(y: int, label: str, x: Sequence[float], texts: Sequence[str]) -> None:
            x = np.asarray(x, dtype=float)
            ax.plot([x.min(), x.max()], [y, y], color="black", linewidth=1)
            shown = -np.inf
            for xi, text in sorted(zip(x, texts, strict=True)):
                ax.plot([xi, xi], [y, y + 0.12], color="black", linewidth=1)
                if xi - shown >= 1.2 * len(text):  # labels too close to the last one shown are left out
                    ax.text(xi, y + 0.18, text, ha="center", va="bottom", fontsize=7)
                    shown = xi
            ax.text(-3, y, label, ha="right", va="center", fontsize=8)

        y = rows
        ticks = np.linspace(0, self.max_points, 11)
        ruler(y, "Points", ticks, [f"{v:g}" for v in ticks])
        for term in self.terms_:
            y -= 1
            x = [(c - term.low) * self.scale_ for c in term.contributions]
            ruler(y, term.name, x, [_label(v) for v in term.values])
        y -= 1
        totals = _nice(0.0, self.max_total)
        ruler(y, "Total points", totals * total_x, [f"{v:g}" for v in totals])
        for i, t in enumerate(self.times):
            y -= 1
            marks = [(p, float(self.total_points_at(p)[i])) for p in NOMOGRAM_PROBABILITIES]
            marks = [(p, x) for p, x in marks if 0.0 <= x <= self.max_total]
            if marks:
                ruler(y, f"RFS at {t:g} {time_unit}", [x * total_x for _, x in marks], [f"{p:g}" for p, _ in marks])
        ax.set(xlim=(-35, self.max_points + 5), ylim=(y - 0.8, rows + 0.8))
        ax.axis("off")
        return save_figure(figure, path)


def _terms(encoded: pd.DataFrame, weights: pd.Series, designs: list[Design]) -> list[Term]:
    """Group encoded columns into one term per raw covariate, with axis values and training ranges."""
    levels = {c: lv for design in designs for c, lv in design.levels_.items()}
    terms = []
    for column, values in levels.items():
        columns = [f"{column}[{level}]" for level in values[1:]]
        contributions = [0.0, *(float(weights[c]) for c in columns)]
        terms.append(Term(column, tuple(columns), tuple(weights[columns]), tuple(values), tuple(contributions),
                          min(contributions), max(contributions)))
    grouped = {c for t in terms for c in t.columns}
    for column in encoded.columns:
        if column in grouped:
            continue
        weight, values = float(weights[column]), encoded[column].to_numpy()
        ticks = _nice(float(values.min()), float(values.max()))
        low, high = sorted((weight * values.min(), weight * values.max()))
        terms.append(Term(column, (column,), (weight,), tuple(ticks), tuple(weight * ticks), low, high))
    if not terms or max(t.high - t.low for t in terms) <= 0:
        raise ModelError("the model has no covariate with an effect; there is nothing to draw a nomogram of")
    return terms


def _nice(low: float, high: float) -> np.ndarray:
    """Round tick values within [low, high] (matplotlib's MaxNLocator), the ends kept when none fall there."""
    from matplotlib.ticker import MaxNLocator

    ticks = MaxNLocator(nbins=6).tick_values(low, high)
    ticks = ticks[(ticks >= low - 1e-9 * abs(low)) & (ticks <= high + 1e-9 * abs(high))]
    return ticks if len(ticks) >= 2 else np.array([low, high])


def _label(value: object) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else re.sub(r"\s+", " ", str(value))
