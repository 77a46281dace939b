"""`pathomics mil train|predict|export|heatmap`: attention-MIL over feature files (thin over pathomics.mil)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pathomics.cli.common import comma_list, config_from_args, config_options, registry

MIL_CONFIG = "pathomics.mil.config.MILConfig"
AGGREGATORS = registry("pathomics.mil.aggregators", "list_aggregators")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mil", help="train attention-MIL aggregators; slide signatures, attention, heatmaps",
                                   description="Attention-MIL over feature files: train, predict, export, heatmap.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    # options left out keep MILConfig's defaults (SUPPRESS: absent from args unless given; --help shows them)
    train = actions.add_parser("train", argument_default=argparse.SUPPRESS,
                               help="cross-validate an aggregator; write signatures, attention, metrics, models",
                               description="Cross-validate an aggregator at patient level over feature files; write "
                                           "out-of-fold signatures, attention, metrics and a final all-patient model.")
    train.add_argument("--features", required=True, help="directory of <slide_id>.h5 feature files")
    train.add_argument("--labels", required=True, help="CSV with slide_id, patient_id and label, or time and event")
    train.add_argument("--out", required=True, help="output directory")
    option = config_options(train, MIL_CONFIG)
    option("--task", choices=registry("pathomics.mil.config", "TASKS"), metavar="TASK", help="what the labels are: %(choices)s")
    option("--aggregator", dest="model", choices=AGGREGATORS, metavar="NAME", help="aggregator: %(choices)s")
    option("--folds", type=int, help="patient-level cross-validation folds")
    option("--epochs", type=int, help="training epochs per model")
    option("--patience", type=int, help="early-stopping patience in epochs")
    option("--min-epochs", type=int, help="no early stop before this epoch")
    option("--batch-size", type=int, help="bags per optimiser step (the Cox risk set)")
    option("--lr", type=float, help="peak learning rate (after warm-up)")
    option("--weight-decay", type=float, help="AdamW's decoupled weight decay")
    option("--hidden-dim", type=int, help="width of the aggregator's hidden layer")
    option("--dropout", type=float, help="dropout of the aggregator's layers")
    option("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
           help="aggregator option, e.g. k=8 (clam-sb), landmarks=256 (transmil); repeatable")
    option("--max-patches", type=int, help="train on a random subset of this many patches per bag (default: all)")
    option("--instance-dropout", type=float, help="fraction of each bag's patches dropped per training step")
    option("--schedule", choices=registry("pathomics.mil.config", "SCHEDULES"), metavar="NAME",
           help="learning rate after warm-up: %(choices)s")
    option("--warmup-epochs", type=int, help="linear learning-rate warm-up epochs")
    option("--grade-col", help="labels column of a tumour grade: adds an auxiliary grade head whose probabilities go "
                               "to signatures.parquet as grade_prob_<grade> (default: none)")
    option("--grade-weight", type=float, help="weight of the grade head's loss")
    option("--val-fraction", type=float,
           help="patients of each training fold held out for early stopping (0: the full schedule)")
    option("--ensemble", type=int, help="models per fold, trained with different seeds and averaged "
                                        "(default: up to 5, as many as keep the members at about 500 training bags in all)")
    option("--no-class-weights", dest="class_weights", action="store_false", help="do not weight classes by frequency")
    option("--classes", type=comma_list, help="class order, best to worst, comma-separated (default: sorted labels)")
    option("--survival-loss", choices=registry("pathomics.mil.config", "SURVIVAL_LOSSES"), metavar="NAME",
           help="%(choices)s: Cox partial likelihood or discrete-time likelihood")
    option("--ties", choices=registry("pathomics.mil.config", "TIES"), metavar="NAME", help="Cox tie handling: %(choices)s")
    option("--time-bins", type=int, help="bins of the discrete-time loss")
    option("--aux-weight", type=float, help="instance-clustering loss weight (clam-sb)")
    option("--aggregate", choices=registry("pathomics.mil.config", "AGGREGATES"), metavar="NAME",
           help="%(choices)s: how a patient's slide predictions are combined for the metrics (as in survival), or none "
                "(metrics per slide)")
    option("--no-refit", dest="refit", action="store_false", help="skip the final all-patient model")
    option("--seed", type=int, help="seed of the folds, the initialisation and the sampling")
    option("--device", help="auto (a GPU if present), cpu, cuda or cuda:N")
    for column in ("slide", "patient", "label", "time", "event"):
        option(f"--{column}-col", help=f"labels column of the {column}")

    predict = actions.add_parser("predict", help="apply a trained model to feature files",
                                 description="Apply a trained MIL model to feature files: attention per slide and "
                                             "signatures.parquet.")
    predict.add_argument("--model-dir", type=Path, required=True,
                         help="a `mil train` output directory or a checkpoint (.pt)")
    predict.add_argument("--features", required=True, help="directory of <slide_id>.h5 feature files")
    predict.add_argument("--out", required=True, help="output directory (signatures.parquet, attention/)")
    add_slide_ids(predict, "every feature file")
    predict.add_argument("--patients", help="CSV mapping slide_id to patient_id (default: patient_id = slide_id)")
    config_options(predict, MIL_CONFIG)("--device", help="auto (a GPU if present), cpu, cuda or cuda:N")
    predict.add_argument("--slide-col", default="slide_id", help="slide column of --patients")
    predict.add_argument("--patient-col", default="patient_id", help="patient column of --patients")

    export = actions.add_parser("export", help="write a run's signatures as CSV or Parquet",
                                description="Write the signatures of a `mil train` or `mil predict` run as CSV or "
                                            "Parquet, per slide or per patient.")
    export.add_argument("--run", dest="run_dir", required=True, help="a `mil train` or `mil predict` output directory")
    export.add_argument("--out", required=True, help="file to write; .csv for CSV, otherwise Parquet")
    export.add_argument("--per-patient", action="store_true", help="average each patient's slides into one row")

    heatmap = actions.add_parser("heatmap", help="draw attention over slide thumbnails as PNG",
                                 description="Draw each slide's attention over its thumbnail as "
                                             "<run>/heatmaps/<slide_id>.png.")
    heatmap.add_argument("--run", dest="run_dir", required=True, help="a `mil train` or `mil predict` output directory")
    heatmap.add_argument("--tiles", required=True, help="the `pathomics tile` output directory (holding tiles/)")
    add_slide_ids(heatmap, "every attention file")
    heatmap.add_argument("--alpha", type=float, default=0.5, help="opacity of the attention colours")
    heatmap.add_argument("--size", type=int, metavar="PX", help="width of each heatmap in pixels (default: the thumbnail's)")
    heatmap.add_argument("--beside", action="store_true", help="draw the plain thumbnail to the left of the heatmap")
    parser.set_defaults(run=run)


def add_slide_ids(parser: argparse.ArgumentParser, default: str) -> None:
    """--slide-id ID, repeatable: the slides to work on."""
    parser.add_argument("--slide-id", action="append", dest="slide_ids", metavar="ID",
                        help=f"only this slide (repeat for several; default: {default})")


def run(args: argparse.Namespace) -> int:
    from pathomics import mil
    from pathomics.cli.common import writable_dir
    from pathomics.batch import exit_code, summarize

    if args.action == "train":
        result = mil.train_mil(args.features, args.labels, writable_dir(Path(args.out)), mil_config(args))
        print(json.dumps({"out": str(result.out_dir), "summary": result.metrics["summary"]}, indent=2))
        return 0
    if args.action == "predict":
        patients = mil.read_patients(args.patients, args.slide_col, args.patient_col) if args.patients else None
        out = writable_dir(Path(args.out))
        device = args.device or mil.MILConfig.device
        rows = mil.predict_mil(args.model_dir, args.features, out, args.slide_ids, patients, device)
        print(summarize("mil predict", rows), file=sys.stderr)
        return exit_code(rows)
    if args.action == "export":
        print(mil.export_signatures(args.run_dir, args.out, args.per_patient))
        return 0
    rows = mil.render_heatmaps(args.run_dir, args.tiles, args.slide_ids, args.alpha, size=args.size, beside=args.beside)
    print(summarize("mil heatmap", rows), file=sys.stderr)
    return exit_code(rows)


def mil_config(args: argparse.Namespace):  # noqa: ANN201 - MILConfig, imported lazily
    """The MILConfig of `mil train`'s arguments; options not given keep the config's defaults."""
    from pathomics.mil import MILConfig

    options = getattr(args, "model_options", None)
    return config_from_args(MILConfig, args, model_options=options and tuple(key_value(o) for o in options))


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON where it can be (numbers, booleans), else kept as text."""
    from pathomics.errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--model-option {text!r}: expected KEY=VALUE, e.g. k=8")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
