"""`pathomics demo`: a synthetic cohort with a planted signal through every stage, and a report (nothing to download)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="synthetic cohort with a planted signal, all stages, report",
                                   description="Write a synthetic cohort (slides with a planted lesion signal, clinical "
                                               "and radiology tables), run every stage on it and write the report.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--patients", type=int, default=80, help="patients in the synthetic cohort (1-2 slides each)")
    parser.add_argument("--workers", type=int, default=1, help="local Dask worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from pathomics.cli.common import writable_dir
    from pathomics.batch import exit_code, summarize
    from pathomics.layout import OutputLayout
    from pathomics.survival.figures import format_ci
    from pathomics.synthetic.demo import run_demo

    start = time.perf_counter()
    out = writable_dir(args.out)
    print(f"demo: {args.patients} synthetic patients in {OutputLayout(out).cohort.root}; backbone shufflenet-v2 with RANDOM weights")
    result, attention = run_demo(out, n_patients=args.patients, seed=args.seed, workers=args.workers)
    print(summarize("tile + embed", result.slide_rows))
    for name, model in result.survival.models.items():
        print(f"  {name:<10} out-of-fold Harrell C {format_ci(model.metrics['c_index_harrell'])}")
    top = sorted(attention, key=lambda a: -a.risk)[:4]
    print(f"  highest-risk slides: {np.mean([a.attention_on_planted for a in top]):.0%} of attention on planted regions "
          f"covering {np.mean([a.planted_patch_share for a in top]):.0%} of their patches")
    print(f"report: {OutputLayout(out).report} ({time.perf_counter() - start:.0f} s)")
    return exit_code(result.slide_rows)
