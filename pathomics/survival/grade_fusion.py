"""Grade-guided fusion (seed S5): a Cox model whose modality weights depend on the (predicted) tumour grade.

Plain fusion is a Cox model on the modality scores s_m plus grade as a covariate:

    eta = sum_g alpha_g pi_g + sum_m beta_m s_m

Grade-guided fusion adds grade x modality interactions, so the weight of modality m for a patient is gated
by that patient's grade probabilities pi_g (the MIL grade head's softmax, or a one-hot observed grade):

    eta = sum_g alpha_g pi_g + sum_m (beta_m + sum_g gamma_mg pi_g) s_m

(g runs over the non-reference grades). Why a Cox model with interactions rather than a learned gating
network: the two are nested, so whether grade modifies the modality effects is one likelihood-ratio test of
gamma = 0 (df = modalities x (grades - 1)); every weight has a hazard ratio and a confidence interval; the
hierarchy principle holds (grade main effects stay in both models); and with soft pi the grade classifier's
uncertainty shrinks a patient's weights toward the mixture, instead of a hard wrong grade picking the
wrong weights. Fits are lifelines' CoxPHFitter (Efron ties).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from scipy.stats import chi2

from pathomics.errors import CohortError
from pathomics.folds import row_splits
from pathomics.io import write_json
from pathomics.layout import OutputLayout
from pathomics.survival.metrics import concordance


@dataclass(frozen=True)
class GradeFusionConfig:
    """Which columns are modality scores and which are grade probabilities (non-reference grades only)."""

    modalities: tuple[str, ...]
    grades: tuple[str, ...]
    time: str = "time"
    event: str = "event"
    penalizer: float = 0.0

    def design(self, table: pd.DataFrame, gated: bool) -> pd.DataFrame:
        """Covariates of plain (``gated=False``) or grade-guided fusion; interactions are named ``m:g``."""
        missing = [c for c in (*self.modalities, *self.grades, self.time, self.event) if c not in table.columns]
        if missing:
            raise CohortError(f"grade fusion: the table lacks column(s) {missing} (has {list(table.columns)})")
        columns = {c: table[c].astype(float) for c in (*self.grades, *self.modalities)}
        if gated:
            columns.update({f"{m}:{g}": columns[m] * columns[g] for m in self.modalities for g in self.grades})
        frame = pd.DataFrame(columns, index=table.index)
        if frame.isna().any(axis=None):
            raise CohortError(f"grade fusion: missing values in {frame.columns[frame.isna().any()].tolist()}; "
                              "drop or impute those patients first")
        return frame


@dataclass(frozen=True)
class FittedFusion:
    """A fitted plain or grade-guided fusion model."""

    spec: GradeFusionConfig
    gated: bool
    cph: CoxPHFitter

    def risk(self, table: pd.DataFrame) -> np.ndarray:
        """Linear predictor (log relative hazard), higher = worse."""
        design = self.spec.design(table, self.gated)
        return design.to_numpy() @ self.cph.params_[design.columns].to_numpy()

    def modality_weights(self, table: pd.DataFrame) -> pd.DataFrame:
        """Each patient's log-hazard per unit of each modality: beta_m + sum_g gamma_mg pi_g."""
        params = self.cph.params_
        weights = {m: params[m] + sum((params[f"{m}:{g}"] * table[g] for g in self.spec.grades if self.gated),
                                      start=pd.Series(0.0, index=table.index)) for m in self.spec.modalities}
        return pd.DataFrame(weights, index=table.index)

    def weights_by_grade(self) -> dict[str, dict[str, float]]:
        """Modality log-hazard weights for a patient certainly of the reference grade and of each other grade."""
        params = self.cph.params_
        out = {"reference": {m: float(params[m]) for m in self.spec.modalities}}
        for g in self.spec.grades:
            out[g] = {m: float(params[m] + (params[f"{m}:{g}"] if self.gated else 0.0)) for m in self.spec.modalities}
        return out


def fit_fusion(table: pd.DataFrame, spec: GradeFusionConfig, gated: bool) -> FittedFusion:
    """Fit plain or grade-guided fusion on ``table`` (one row per patient)."""
    frame = spec.design(table, gated).assign(_time=table[spec.time].to_numpy(float),
                                             _event=table[spec.event].to_numpy(int))
    if frame["_event"].sum() < 2:
        raise CohortError("grade fusion needs at least two events")
    cph = CoxPHFitter(penalizer=spec.penalizer).fit(frame, "_time", "_event", fit_options={"precision": 1e-10})
    return FittedFusion(spec, gated, cph)


def likelihood_ratio_test(gated: FittedFusion, plain: FittedFusion) -> dict[str, float]:
    """LR test of gamma = 0 (no grade x modality interaction); valid for unpenalised fits on the same patients."""
    statistic = 2 * (gated.cph.log_likelihood_ - plain.cph.log_likelihood_)
    df = len(gated.cph.params_) - len(plain.cph.params_)
    return {"statistic": float(statistic), "df": int(df), "p_value": float(chi2.sf(max(statistic, 0.0), df))}


def compare_fusion(table: pd.DataFrame, spec: GradeFusionConfig, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Plain vs grade-guided fusion: K-fold cross-validated Harrell C of each (folds stratified by event, the
    same folds for both) and their paired per-fold difference; on all patients, the LR test of the
    interactions, the coefficients and the modality weights per grade."""
    time, event = table[spec.time].to_numpy(float), table[spec.event].to_numpy(int)
    c = {"plain": [], "gated": []}
    for train, test in row_splits(event, folds, seed):
        for name, gated in (("plain", False), ("gated", True)):
            model = fit_fusion(table.iloc[train], spec, gated)
            c[name].append(concordance(time[test], event[test], model.risk(table.iloc[test])))
    plain, gated = fit_fusion(table, spec, False), fit_fusion(table, spec, True)
    difference = np.subtract(c["gated"], c["plain"])
    return {
        "n": len(table), "events": int(event.sum()), "folds": folds,
        "c_index": {name: {"mean": float(np.mean(v)), "per_fold": [float(x) for x in v]} for name, v in c.items()},
        "c_index_gain": {"mean": float(difference.mean()), "sd": float(difference.std(ddof=1))},
        "interaction_test": likelihood_ratio_test(gated, plain),
        "weights_by_grade": {"plain": plain.weights_by_grade(), "gated": gated.weights_by_grade()},
        "coefficients": {"plain": _coefficients(plain), "gated": _coefficients(gated)},
    }


def _coefficients(model: FittedFusion) -> dict[str, dict[str, float]]:
    summary = model.cph.summary
    return {str(name): {"coef": float(row["coef"]), "se": float(row["se(coef)"]), "p": float(row["p"]),
                        "ci_lower": float(row["coef lower 95%"]), "ci_upper": float(row["coef upper 95%"])}
            for name, row in summary.iterrows()}


def grade_columns(table: pd.DataFrame, prefix: str, reference: str | None = None) -> tuple[str, ...]:
    """The grade-probability columns ``<prefix><grade>`` of ``table``, less the reference grade's
    (the first in sorted order unless given): probabilities sum to one, so one grade is the baseline."""
    found = sorted(c for c in table.columns if str(c).startswith(prefix))
    if not found:
        raise CohortError(f"grade fusion: no column starts with {prefix!r} (columns {list(table.columns)})")
    if len(found) == 1:
        return tuple(found)  # one probability column: its complement is the reference grade
    drop = f"{prefix}{reference}" if reference is not None else found[0]
    if drop not in found:
        raise CohortError(f"grade fusion: reference grade column {drop!r} is not among {found}")
    return tuple(c for c in found if c != drop)


def modality_names(values: Sequence[str]) -> tuple[str, ...]:
    names = tuple(v for v in values if v)
    if not names:
        raise CohortError("grade fusion needs at least one modality score column")
    return names


@dataclass(frozen=True)
class GradeFusionStudy:
    """A finished comparison: the results (as written) and where they were written."""

    result: dict[str, Any]
    path: Path


def grade_fusion_study(table_path: str | os.PathLike, modalities: Sequence[str], out_dir: str | os.PathLike,
                       grade_prefix: str = "grade_prob_", reference_grade: str | None = None, time: str = "time",
                       event: str = "event", penalizer: float = 0.0, folds: int = 5, seed: int = 0) -> GradeFusionStudy:
    """Read a per-patient table (time, event, modality scores, ``<grade_prefix><grade>`` probabilities), compare
    plain with grade-guided fusion (`compare_fusion`) and write the result to ``<out>/survival/grade_fusion.json``."""
    try:
        table = pd.read_csv(table_path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{table_path}: cannot read the table ({exc})") from exc
    spec = GradeFusionConfig(modality_names(modalities), grade_columns(table, grade_prefix, reference_grade),
                             time, event, penalizer)
    result = {"table": str(table_path), **compare_fusion(table, spec, folds, seed)}
    path = OutputLayout(out_dir).grade_fusion
    write_json(path, result)
    return GradeFusionStudy(result, path)
