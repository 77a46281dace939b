"""`pathomics run`: every stage over an archive (tile → embed → MIL → survival), resumable, on Dask."""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import add_slide_arguments, config_from_args, config_options, given, slide_entries, writable_dir
from pathomics.cli.embed import add_embed_options, embed_config
from pathomics.cli.mil import AGGREGATORS, MIL_CONFIG
from pathomics.cli.survival import add_survival_options, survival_config
from pathomics.cli.tile import add_tile_options, tile_config
from pathomics.layout import OutputLayout


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="all stages over an archive, resumable, on a local or remote Dask cluster",
                                   description="Tile and embed every slide (one Dask task per slide, finished outputs "
                                               "skipped), then train or apply a MIL model and fit the survival models.")
    add_slide_arguments(parser)
    parser.add_argument("--patient-id-regex", metavar="PATTERN",
                        help="take each slide's patient id from its file name: the first group of this Python regular "
                             "expression, or its whole match (e.g. '^(TCGA-\\w\\w-\\w{4})'); for slides the manifest "
                             "gives no patient_id (default: none, the manifest must)")
    parser.add_argument("--clinical", type=Path, required=True, metavar="CSV", help="clinical table (patient_id, time, event, covariates)")
    parser.add_argument("--radiology", type=Path, metavar="CSV", help="radiology table (patient_id, radiology_score; "
                                                                      "default: none)")
    parser.add_argument("--out", type=Path, required=True, help="output directory of every stage")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, default=1, help="local Dask worker processes")
    cluster.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786 "
                                             "(default: a local cluster of --workers)")
    add_tile_options(parser.add_argument_group("tiling"))
    add_embed_options(parser.add_argument_group("embedding"))
    mil = parser.add_argument_group("MIL")
    option = config_options(mil, MIL_CONFIG)
    option("--aggregator", field="model", choices=AGGREGATORS, metavar="NAME", help="MIL aggregator: %(choices)s")
    option("--epochs", type=int, help="MIL training epochs per model")
    mil.add_argument("--mil-model-dir", type=Path, help="apply this trained MIL run (a `mil train` output directory or "
                                                        "checkpoint .pt) instead of training one (default: train one)")
    add_survival_options(parser.add_argument_group("survival"),
                         folds_help="patient-level cross-validation folds, of the MIL model and of the survival models")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics.mil import MILConfig
    from pathomics.batch import exit_code, summarize
    from pathomics.runner.pipeline import RunConfig, run_archive
    from pathomics.survival.figures import format_ci

    entries = slide_entries(args)
    # only the MIL options of `run`: others sharing a MILConfig field name (--batch-size, --seed) are another stage's
    mil = MILConfig(**given(task="survival", model=args.aggregator, folds=getattr(args, "folds", None),
                            epochs=args.epochs, device=args.device))
    config = config_from_args(RunConfig, args, tile=tile_config(args), embed=embed_config(args), mil=mil,
                              survival=survival_config(args), mil_model=args.mil_model_dir,
                              threads_per_worker=args.threads)
    out = writable_dir(args.out)
    print(f"tiling at {config.tile.target_mpp} µm/px, {config.tile.patch_size}-px patches; embedding with {config.embed.model}")
    result = run_archive(entries, args.clinical, out, config, radiology=args.radiology)
    print(summarize("tile + embed", result.slide_rows))
    for name, model in result.survival.models.items():
        print(f"  {name:<10} Harrell C {format_ci(model.metrics['c_index_harrell'])}")
    layout = OutputLayout(out)
    print(f"signatures: {layout.signatures}; survival results: {layout.survival}; status: {layout.status}")
    print(f"report: {layout.report}")
    return exit_code(result.slide_rows)
