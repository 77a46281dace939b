"""Prognosis: clinical, radiology and pathology scores in Cox models of recurrence.

``survival_fit`` / ``survival_evaluate`` are the library functions behind ``pathomics survival fit|evaluate``;
the pieces (cohort join, Cox models, metrics) are importable for finer use. Names load on first use, so
importing the light ``pathomics.survival.config`` does not pull in lifelines and scikit-survival.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SurvivalConfig": "config",
    "Cohort": "cohort",
    "load_cohort": "cohort",
    "check_tables": "cohort",
    "Design": "cox",
    "CoxModel": "cox",
    "DecisionFusion": "cox",
    "build_models": "fusion",
    "FittedStudy": "analysis",
    "ModelResult": "analysis",
    "SurvivalResult": "analysis",
    "coefficients_table": "report",
    "cross_validate": "analysis",
    "evaluate_external": "analysis",
    "load_study": "analysis",
    "save_study": "analysis",
    "survival_evaluate": "analysis",
    "survival_fit": "analysis",
    "write_results": "analysis",
    "LongitudinalConfig": "longitudinal",
    "longitudinal_fit": "longitudinal",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pathomics.survival' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pathomics.survival.{module}"), name)


__all__ = sorted(_EXPORTS)
