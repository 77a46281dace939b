"""`pathomics survival grade-fusion`: plain vs grade-guided fusion of modality scores (seed S5)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_action(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "grade-fusion", help="compare plain fusion with fusion whose modality weights are gated by predicted grade")
    parser.add_argument("--table", type=Path, required=True, metavar="CSV",
                        help="one row per patient: time, event, modality scores and grade probabilities")
    parser.add_argument("--modalities", required=True, metavar="COLS",
                        help="comma-separated modality score columns, e.g. clinical_lp,pathology_risk,radiology")
    parser.add_argument("--grade-prefix", default="grade_prob_", metavar="PREFIX",
                        help="grade probability columns start with this (default grade_prob_, as mil writes them)")
    parser.add_argument("--reference-grade", default=None, metavar="GRADE",
                        help="baseline grade (default: the first in sorted order)")
    parser.add_argument("--time-col", default="time")
    parser.add_argument("--event-col", default="event")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds for the C-index comparison")
    parser.add_argument("--penalizer", type=float, default=0.0, help="ridge penalty of the Cox fits (0: the LR test is exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/survival/grade_fusion.json")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from pathomics.errors import CohortError
    from pathomics.layout import OutputLayout
    from pathomics.io import write_json
    from pathomics.survival.grade_fusion import GradeFusionConfig, compare_fusion, grade_columns, modality_names

    try:
        table = pd.read_csv(args.table)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{args.table}: cannot read the table ({exc})") from exc
    spec = GradeFusionConfig(modality_names(args.modalities.split(",")),
                      grade_columns(table, args.grade_prefix, args.reference_grade),
                      args.time_col, args.event_col, args.penalizer)
    result = {"table": str(args.table), **compare_fusion(table, spec, args.folds, args.seed)}
    path = OutputLayout(args.out).grade_fusion
    write_json(path, result)
    c, test = result["c_index"], result["interaction_test"]
    print(f"{result['n']} patients, {result['events']} events; {args.folds}-fold Harrell C: plain {c['plain']['mean']:.3f}, "
          f"grade-guided {c['gated']['mean']:.3f} (gain {result['c_index_gain']['mean']:+.3f} ± {result['c_index_gain']['sd']:.3f})")
    print(f"grade x modality interactions: LR chi2 {test['statistic']:.1f} on {test['df']} df, p = {test['p_value']:.2g}")
    for grade, weights in result["weights_by_grade"]["gated"].items():
        print(f"  log-hazard weights at {grade}: " + ", ".join(f"{m} {w:+.2f}" for m, w in weights.items()))
    print(f"results in {path}")
    return 0
