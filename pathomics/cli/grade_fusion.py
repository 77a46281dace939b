"""`pathomics survival grade-fusion`: plain vs grade-guided fusion of modality scores."""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import comma_list


def add_action(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "grade-fusion", help="compare plain fusion with fusion whose modality weights are gated by predicted grade",
        description="Compare a Cox model on modality scores plus grade with one whose modality weights depend on the "
                    "grade probabilities (cross-validated Harrell C, and a likelihood-ratio test of the interactions).")
    parser.add_argument("--table", type=Path, required=True, metavar="CSV",
                        help="one row per patient: time, event, modality scores and grade probabilities")
    parser.add_argument("--modalities", required=True, metavar="COLS", type=comma_list,
                        help="comma-separated modality score columns, e.g. clinical_lp,pathology_risk,radiology")
    parser.add_argument("--grade-prefix", default="grade_prob_", metavar="PREFIX",
                        help="grade probability columns start with this (as `mil train --grade-col` writes them)")
    parser.add_argument("--reference-grade", default=None, metavar="GRADE",
                        help="baseline grade (default: the first in sorted order)")
    parser.add_argument("--time-col", default="time", metavar="COL", help="follow-up time column")
    parser.add_argument("--event-col", default="event", metavar="COL", help="event column (1 recurrence, 0 censored)")
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="cross-validation folds for the C-index comparison")
    parser.add_argument("--penalizer", type=float, default=0.0, metavar="X",
                        help="ridge penalty of the Cox fits (0: the LR test is exact)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the folds")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/survival/grade_fusion.json")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics.survival.grade_fusion import grade_fusion_study

    study = grade_fusion_study(args.table, args.modalities, args.out, args.grade_prefix, args.reference_grade,
                               args.time_col, args.event_col, args.penalizer, args.folds, args.seed)
    result = study.result
    c, test = result["c_index"], result["interaction_test"]
    print(f"{result['n']} patients, {result['events']} events; {args.folds}-fold Harrell C: plain {c['plain']['mean']:.3f}, "
          f"grade-guided {c['gated']['mean']:.3f} (gain {result['c_index_gain']['mean']:+.3f} ± {result['c_index_gain']['sd']:.3f})")
    print(f"grade x modality interactions: LR chi2 {test['statistic']:.1f} on {test['df']} df, p = {test['p_value']:.2g}")
    for grade, weights in result["weights_by_grade"]["gated"].items():
        print(f"  log-hazard weights at {grade}: " + ", ".join(f"{m} {w:+.2f}" for m, w in weights.items()))
    print(f"results in {study.path}")
    return 0
