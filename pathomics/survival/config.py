"""The one frozen, validated configuration of a survival analysis; its values go into every output."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pathomics.errors import ConfigError

FUSIONS = ("decision", "features")
MISSING_POLICIES = ("error", "drop", "impute", "available")
AGGREGATES = ("mean", "median", "max")
RISK_GROUPINGS = ("median", "tertiles")
FUSION_WEIGHTS = ("free", "non-negative")


@dataclass(frozen=True)
class SurvivalConfig:
    """Columns, models and evaluation of one survival analysis.

    ``penalizer`` holds one value (fixed) or several (chosen by inner cross-validation on Harrell's C).
    ``folds`` is the number of patient-level folds, ignored when ``split_by`` names a column whose
    values are held out one at a time. ``times`` are the td-AUC times (``None``: the quartiles of the
    event times, resolved at fit and written out). ``missing`` is the missing-modality policy: ``error``
    (default), ``drop`` the patient (counted), ``impute`` the training mean plus an indicator column, or
    ``available`` (decision fusion only): each patient is scored by the fusion of the modalities they have.
    ``fusion_weights`` of decision fusion: ``free`` second-stage Cox weights, or ``non-negative`` (stacking:
    an input whose weight comes out negative is dropped); the second stage takes the ``penalizer`` grid too.
    ``thresholds`` are the decision curves' threshold probabilities as ``(low, high, step)``.
    """

    covariates: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    id_col: str = "patient_id"
    time_col: str = "time"
    event_col: str = "event"
    radiology_col: str = "radiology_score"
    risk_col: str = "risk"
    signature_prefix: str = "sig_"
    aggregate: str = "mean"
    missing: str = "error"
    # decision by default: out-of-fold signatures come from a different MIL model per fold, so their sig_* spaces
    # do not line up across folds while the per-fold standardised risk does
    fusion: str = "decision"
    fusion_weights: str = "free"
    n_components: int = 3
    folds: int = 5
    split_by: str | None = None
    penalizer: tuple[float, ...] = (0.0,)
    l1_ratio: float = 0.0
    inner_folds: int = 3
    times: tuple[float, ...] | None = None
    time_unit: str = "days"
    calibration_time: float | None = None
    risk_groups: str = "median"
    thresholds: tuple[float, ...] = (0.01, 0.99, 0.01)
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"fusion": FUSIONS, "missing": MISSING_POLICIES, "aggregate": AGGREGATES, "risk_groups": RISK_GROUPINGS,
                   "fusion_weights": FUSION_WEIGHTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        unknown = sorted(set(self.categorical) - set(self.covariates))
        if unknown:
            raise ConfigError(f"categorical columns {unknown} are not among the covariates {list(self.covariates)}")
        if self.folds < 2 or self.inner_folds < 2:
            raise ConfigError(f"folds ({self.folds}) and inner folds ({self.inner_folds}) must each be at least 2")
        if not self.penalizer or any(not math.isfinite(p) or p < 0 for p in self.penalizer):
            raise ConfigError(f"penalizer values must be finite and >= 0, got {list(self.penalizer)}")
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ConfigError(f"l1_ratio must lie in [0, 1], got {self.l1_ratio}")
        if self.n_components < 1:
            raise ConfigError(f"n_components must be at least 1, got {self.n_components}")
        if self.times is not None and (not self.times or any(not math.isfinite(t) or t <= 0 for t in self.times)):
            raise ConfigError(f"evaluation times must be positive, got {list(self.times)}")
        if self.calibration_time is not None and not self.calibration_time > 0:
            raise ConfigError(f"calibration time must be positive, got {self.calibration_time}")
        if self.missing == "available" and self.fusion != "decision":
            raise ConfigError("--missing available scores each patient by the modalities they have: it needs --fusion decision")
        low, high, step = self.thresholds if len(self.thresholds) == 3 else (0, 0, 0)
        if not 0 < low <= high < 1 or step <= 0:
            raise ConfigError(
                f"thresholds must be LOW,HIGH,STEP with 0 < LOW <= HIGH < 1 and STEP > 0, got {list(self.thresholds)}"
            )
        if self.n_bootstrap < 0 or not 0.0 < self.ci_level < 1.0:
            raise ConfigError(f"need n_bootstrap >= 0 and 0 < ci_level < 1, got {self.n_bootstrap} and {self.ci_level}")

    def to_dict(self) -> dict[str, Any]:
        """The values as JSON-ready types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SurvivalConfig:
        """Inverse of `to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
