"""``pathomics survival longitudinal``: repeated clinical markers in a time-varying Cox model and a landmark GRU.

Options left out keep the defaults of :class:`~pathomics.survival.longitudinal.LongitudinalConfig`.
Results go to ``<out>/survival/longitudinal/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import config_from_args


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_action(actions: argparse._SubParsersAction) -> None:
    """The ``longitudinal`` action of ``pathomics survival``."""
    parser = actions.add_parser(
        "longitudinal",
        argument_default=argparse.SUPPRESS,
        help="repeated markers: time-varying Cox model, and a GRU on the history up to a landmark",
    )
    parser.add_argument(
        "--clinical", type=Path, required=True, metavar="CSV", help="clinical table: patient id, time, event"
    )
    parser.add_argument(
        "--markers",
        type=Path,
        required=True,
        metavar="CSV",
        help="long table: patient id, measurement time, markers (one row per visit)",
    )
    parser.add_argument(
        "--signatures", type=Path, metavar="PARQUET", help="slide signatures to fuse (signatures.parquet)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="results go to DIR/survival/longitudinal/"
    )
    parser.add_argument("--landmark", type=float, required=True, metavar="T", help="landmark time, in the time unit")
    parser.add_argument(
        "--marker-cols", dest="marker_columns", type=_names, metavar="A,B", help="marker columns (default: all others)"
    )
    parser.add_argument(
        "--marker-time", dest="marker_time_col", metavar="COL", help="measurement time column (default time)"
    )
    parser.add_argument(
        "--patient-col", dest="id_col", metavar="COL", help="patient id column of every table (default patient_id)"
    )
    parser.add_argument("--time", dest="time_col", metavar="COL", help="follow-up time column (default time)")
    parser.add_argument(
        "--event", dest="event_col", metavar="COL", help="event column, 1 recurrence, 0 censored (default event)"
    )
    parser.add_argument(
        "--signature",
        choices=("risk", "embedding"),
        help="what of the signatures to fuse: risk column or sig_* (default risk)",
    )
    parser.add_argument("--risk-col", dest="risk_col", metavar="COL", help="pathology risk column (default risk)")
    parser.add_argument(
        "--penalizer", type=float, metavar="X", help="Cox penalty of the time-varying and snapshot models (default 0)"
    )
    parser.add_argument("--folds", type=int, metavar="K", help="patient-level folds of the landmark models (default 5)")
    parser.add_argument("--hidden", type=int, metavar="N", help="GRU state size = embedding size (default 8)")
    parser.add_argument("--epochs", type=int, metavar="N", help="full-batch training epochs (default 60)")
    parser.add_argument("--lr", type=float, metavar="X", help="Adam learning rate (default 0.01)")
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, metavar="X", help="(default 0.001)")
    parser.add_argument(
        "--bootstrap",
        dest="n_bootstrap",
        type=int,
        metavar="N",
        help="bootstrap resamples of the C-index CIs (default 200)",
    )
    parser.add_argument("--time-unit", dest="time_unit", metavar="UNIT", help="unit of the time columns (default days)")
    parser.add_argument(
        "--seed", type=int, metavar="N", help="seed of the folds, the GRU and the bootstrap (default 0)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics.layout import OutputLayout
    from pathomics.survival.longitudinal import LongitudinalConfig, longitudinal_fit
    from pathomics.survival.figures import format_ci

    config = config_from_args(LongitudinalConfig, args)
    result = longitudinal_fit(config, args.clinical, args.markers, getattr(args, "signatures", None), args.out)
    metrics = result.metrics
    cohort, landmark = metrics["cohort"], metrics["landmark"]
    print(
        f"{cohort['patients']} patients, {cohort['events']} events, "
        f"{cohort['marker_rows']} measurements of {', '.join(cohort['markers'])}"
    )
    print(f"time-varying Cox ({metrics['time_varying']['intervals']} intervals):")
    for row in result.coefficients.itertuples():
        print(f"  {row.covariate:<14} HR {row.hr:.4g} ({row.hr_low:.4g}-{row.hr_high:.4g})  p {row.p:.3g}")
    print(
        f"landmark {landmark['time']:g}: {landmark['at_risk']} at risk, {landmark['events_after']} events after; "
        f"{landmark['excluded_event_or_censored_before']} excluded (event or censoring before)"
    )
    for name, model in landmark["models"].items():
        harrell, uno = format_ci(model["c_index_harrell"]), format_ci(model["c_index_uno"])
        print(f"  {name:<10} Harrell C {harrell}  Uno C {uno}")
    print(f"results in {OutputLayout(args.out).longitudinal}")
    return 0
