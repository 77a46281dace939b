"""``pathomics survival longitudinal``: repeated clinical markers in a time-varying Cox model and a landmark GRU.

Options left out keep the defaults of `LongitudinalConfig`.
Results go to ``<out>/survival/longitudinal/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import comma_list, config_from_args, config_options, registry

LONGITUDINAL_CONFIG = "pathomics.survival.longitudinal.LongitudinalConfig"


def add_action(actions: argparse._SubParsersAction) -> None:
    """The ``longitudinal`` action of ``pathomics survival``."""
    parser = actions.add_parser(
        "longitudinal",
        argument_default=argparse.SUPPRESS,
        help="repeated markers: time-varying Cox model, and a GRU on the history up to a landmark",
        description="Repeated clinical markers: a time-varying Cox model, and landmark models (snapshot Cox and a GRU "
                    "on each patient's marker history up to the landmark), optionally fused with slide signatures.",
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
        "--signatures", type=Path, metavar="PARQUET", help="slide signatures to fuse (signatures.parquet; default: none)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="results go to DIR/survival/longitudinal/"
    )
    option = config_options(parser, LONGITUDINAL_CONFIG)
    option("--landmark", type=float, required=True, metavar="T", help="landmark time, in the time unit")
    option("--marker-cols", dest="marker_columns", type=comma_list, metavar="A,B", help="marker columns (default: all others)")
    option("--marker-time-col", dest="marker_time_col", metavar="COL", help="measurement time column of --markers")
    option("--patient-col", dest="id_col", metavar="COL", help="patient id column of every table")
    option("--time-col", dest="time_col", metavar="COL", help="follow-up time column")
    option("--event-col", dest="event_col", metavar="COL", help="event column, 1 recurrence, 0 censored")
    option("--signature", choices=registry("pathomics.survival.longitudinal", "SIGNATURE_KINDS"), metavar="KIND",
           help="what of the signatures to fuse, %(choices)s: the risk column or the sig_* columns")
    option("--risk-col", dest="risk_col", metavar="COL", help="pathology risk column")
    option("--penalizer", type=float, metavar="X", help="Cox penalty of the time-varying and snapshot models")
    option("--folds", type=int, metavar="K", help="patient-level folds of the landmark models")
    option("--hidden", type=int, metavar="N", help="GRU state size = embedding size")
    option("--epochs", type=int, metavar="N", help="full-batch GRU training epochs")
    option("--lr", type=float, metavar="X", help="Adam learning rate of the GRU")
    option("--weight-decay", dest="weight_decay", type=float, metavar="X", help="Adam weight decay of the GRU")
    option("--bootstrap", dest="n_bootstrap", type=int, metavar="N", help="bootstrap resamples of the C-index CIs")
    option("--time-unit", dest="time_unit", metavar="UNIT", help="unit of the time columns")
    option("--seed", type=int, metavar="N", help="seed of the folds, the GRU and the bootstrap")
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
