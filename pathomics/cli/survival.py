"""``pathomics survival fit|evaluate|longitudinal|grade-fusion``: Cox models of recurrence from clinical, radiology and slide-signature tables.

Options left out keep the defaults of `SurvivalConfig` (shown in --help).
Results go to ``<out>/survival/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pathomics.cli.common import comma_list, config_from_args, config_options
from pathomics.cli.grade_fusion import add_action as add_grade_fusion
from pathomics.cli.longitudinal import add_action as add_longitudinal
from pathomics.survival.config import AGGREGATES, FUSIONS, MISSING_POLICIES, RISK_GROUPINGS, SurvivalConfig

SURVIVAL_CONFIG = "pathomics.survival.config.SurvivalConfig"


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(",") if value.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _option(parser: argparse._ActionsContainer, flag: str, field: str, help: str, **kwargs: Any) -> None:
    """An option filling config ``field``; absent from the namespace unless given, so the config's default applies
    (and --help shows it)."""
    config_options(parser, SURVIVAL_CONFIG)(flag, dest=field, default=argparse.SUPPRESS, help=help, **kwargs)


def _add_tables(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clinical", type=Path, required=True, metavar="CSV", help="clinical table: patient id, time, event, covariates"
    )
    parser.add_argument("--radiology", type=Path, metavar="CSV", help="radiology table: patient id, radiology score (default: none)")
    parser.add_argument("--signatures", type=Path, metavar="PARQUET", help="slide signatures (signatures.parquet; default: none)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder; results go to DIR/survival/")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("survival", help="Cox models of recurrence: fit and validate, or evaluate a saved model",
                                   description="Cox models of recurrence from clinical, radiology and slide-signature "
                                               "tables: fit, evaluate, longitudinal markers, grade-guided fusion.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = actions.add_parser("fit", help="cross-validate and fit the clinical/radiology/pathology/combined models",
                             description="Cross-validate and fit a Cox model per modality and their fusion; write "
                                         "metrics, figures, a report and the fitted models to OUT/survival/.")
    _add_tables(fit)
    add_survival_options(fit)
    evaluate = actions.add_parser("evaluate", help="apply a saved model set to another cohort",
                                  description="Apply the models of `pathomics survival fit` to another cohort "
                                              "(external validation): metrics and figures in OUT/survival/.")
    evaluate.add_argument("--model-dir", type=Path, required=True, metavar="DIR",
                          help="the --out folder of 'pathomics survival fit'")
    _add_tables(evaluate)
    add_longitudinal(actions)
    add_grade_fusion(actions)
    parser.set_defaults(run=run)


def add_survival_options(fit: argparse._ActionsContainer, folds_help: str = "patient-level cross-validation folds") -> None:
    """The model options of `survival fit`, shared with `pathomics run`."""
    _option(fit, "--time-col", "time_col", "follow-up time column", metavar="COL")
    _option(fit, "--event-col", "event_col", "event column (1 recurrence, 0 censored)", metavar="COL")
    _option(fit, "--patient-col", "id_col", "patient id column of every table", metavar="COL")
    _option(fit, "--covariates", "covariates", "clinical covariates, comma-separated", type=comma_list, metavar="A,B,C")
    _option(
        fit,
        "--categorical",
        "categorical",
        "covariates to one-hot encode even if numeric (non-numeric ones always are)",
        type=comma_list,
        metavar="A,B",
    )
    _option(fit, "--radiology-col", "radiology_col", "radiology score column", metavar="COL")
    _option(fit, "--risk-col", "risk_col", "pathology risk column of the signatures", metavar="COL")
    _option(fit, "--aggregate", "aggregate", "how several slides of a patient are combined", choices=AGGREGATES)
    _option(
        fit,
        "--missing",
        "missing",
        "patients lacking a modality or covariate: error, drop (counted), impute (+ indicator), "
        "available (decision fusion of the modalities each patient has)",
        choices=MISSING_POLICIES,
    )
    _option(
        fit,
        "--fusion",
        "fusion",
        "decision: second-stage Cox on modality scores; features: covariates + signature PCs",
        choices=FUSIONS,
    )
    _option(fit, "--components", "n_components", "principal components of sig_* in feature fusion", type=int, metavar="K")
    split = fit.add_mutually_exclusive_group()
    _option(split, "--folds", "folds", folds_help, type=int, metavar="K")
    _option(
        split,
        "--split-by",
        "split_by",
        "hold out each value of this clinical column in turn, e.g. centre (default: none, --folds)",
        metavar="COL",
    )
    _option(
        fit,
        "--penalizer",
        "penalizer",
        "Cox penalty; several comma-separated values are chosen by inner CV",
        type=_numbers,
        metavar="X[,X...]",
    )
    _option(fit, "--l1-ratio", "l1_ratio", "share of L1 in the penalty (1 = LASSO-Cox)", type=float, metavar="Y")
    _option(fit, "--inner-folds", "inner_folds", "inner folds for choosing the penalty", type=int, metavar="K")
    _option(
        fit,
        "--times",
        "times",
        "td-AUC times, in the time unit (default: event-time quartiles)",
        type=_numbers,
        metavar="T[,T...]",
    )
    _option(fit, "--time-unit", "time_unit", "unit of the time column, stated in the report", metavar="UNIT")
    _option(
        fit,
        "--calibration-time",
        "calibration_time",
        "time of the calibration plot (default: middle td-AUC time)",
        type=float,
        metavar="T",
    )
    _option(
        fit,
        "--thresholds",
        "thresholds",
        "decision-curve threshold probabilities of recurrence, at the --times",
        type=_numbers,
        metavar="LOW,HIGH,STEP",
    )
    _option(fit, "--risk-groups", "risk_groups", "Kaplan-Meier risk groups, cut at training quantiles", choices=RISK_GROUPINGS)
    _option(fit, "--bootstrap", "n_bootstrap", "bootstrap resamples of the C-index CIs", type=int, metavar="N")
    _option(fit, "--seed", "seed", "seed of the folds and the bootstrap", type=int, metavar="N")


def survival_config(args: argparse.Namespace) -> SurvivalConfig:
    """The SurvivalConfig the options describe (options not given keep its defaults)."""
    return config_from_args(SurvivalConfig, args)


def run(args: argparse.Namespace) -> int:
    from pathomics.survival import survival_evaluate, survival_fit
    from pathomics.survival.figures import format_ci

    tables = (args.clinical, args.radiology, args.signatures)
    if args.action == "fit":
        result = survival_fit(survival_config(args), *tables, out=args.out)
    else:
        result = survival_evaluate(args.model_dir, *tables, out=args.out)
    cohort = result.cohort
    print(f"{cohort['n']} patients, {cohort['events']} events, {cohort['dropped_total']} dropped; {result.validation}")
    for name, model in result.models.items():
        harrell, uno = format_ci(model.metrics["c_index_harrell"]), format_ci(model.metrics["c_index_uno"])
        slope, intercept = model.metrics["calibration_slope"], model.metrics["calibration_intercept"]
        print(f"  {name:<10} Harrell C {harrell}  Uno C {uno}  calibration slope {slope:.3f} intercept {intercept:+.3f}")
    print(f"results in {args.out / 'survival'}")
    return 0
