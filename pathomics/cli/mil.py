"""`pathomics mil train|predict|export|heatmap`: attention-MIL over feature files (thin over pathomics.mil)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathomics.mil import MILConfig

AGGREGATORS = "mean, max, abmil, gated-abmil, clam-sb, transmil"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mil", help="train attention-MIL aggregators; slide signatures, attention, heatmaps",
                                   description="Attention-MIL over feature files: train, predict, export, heatmap.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    # options left out keep MILConfig's defaults (SUPPRESS: absent from args unless given)
    train = actions.add_parser("train", argument_default=argparse.SUPPRESS,
                               help="cross-validate an aggregator; write signatures, attention, metrics, models")
    train.add_argument("--features", required=True, help="directory of <slide_id>.h5 feature files")
    train.add_argument("--labels", required=True, help="CSV with slide_id, patient_id and label, or time and event")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--task", choices=("classification", "survival"), help="default classification")
    train.add_argument("--model", help=f"aggregator: {AGGREGATORS} (default abmil)")
    train.add_argument("--folds", type=int, help="patient-level cross-validation folds (default 5)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    train.add_argument("--min-epochs", type=int, help="no early stop before this epoch")
    train.add_argument("--batch-size", type=int, help="bags per optimiser step (the Cox risk set)")
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--hidden-dim", type=int)
    train.add_argument("--dropout", type=float)
    train.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
                       help="aggregator option, e.g. k=8 (clam-sb), landmarks=256 (transmil); repeatable")
    train.add_argument("--max-patches", type=int, help="train on a random subset of this many patches per bag")
    train.add_argument("--instance-dropout", type=float, help="fraction of each bag's patches dropped per training step")
    train.add_argument("--schedule", choices=("constant", "cosine"), help="learning rate after warm-up (default cosine)")
    train.add_argument("--warmup-epochs", type=int, help="linear learning-rate warm-up epochs")
    train.add_argument("--grade-col", help="labels column of a tumour grade: adds an auxiliary grade head whose "
                       "probabilities go to signatures.parquet as grade_prob_<grade>")
    train.add_argument("--grade-weight", type=float, help="weight of the grade head's loss (default 0.5)")
    train.add_argument("--val-fraction", type=float,
                       help="patients of each training fold held out for early stopping (default 0: the full schedule)")
    train.add_argument("--ensemble", type=int, help="models per fold, trained with different seeds and averaged "
                       "(default: up to 5, as many as keep the members at about 500 training bags in all)")
    train.add_argument("--no-class-weights", dest="class_weights", action="store_false")
    train.add_argument("--classes", help="class order, best to worst, comma-separated (default: sorted labels)")
    train.add_argument("--survival-loss", choices=("cox", "discrete"))
    train.add_argument("--ties", choices=("efron", "breslow"), help="Cox tie handling")
    train.add_argument("--time-bins", type=int, help="bins of the discrete-time loss")
    train.add_argument("--aux-weight", type=float, help="instance-clustering loss weight (clam-sb)")
    train.add_argument("--aggregate", choices=("mean", "none"),
                       help="patient-level mean of slide predictions for metrics (default), or none (slide level)")
    train.add_argument("--no-refit", dest="refit", action="store_false", help="skip the final all-patient model")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=("cpu", "cuda", "auto"))
    for column in ("slide", "patient", "label", "time", "event"):
        train.add_argument(f"--{column}-col", help=f"labels column of the {column} (default {column}" +
                           ("_id)" if column in ("slide", "patient") else ")"))

    predict = actions.add_parser("predict", help="apply a trained model to feature files")
    predict.add_argument("--model", required=True, help="a `mil train` output directory or a checkpoint (.pt)")
    predict.add_argument("--features", required=True, help="directory of <slide_id>.h5 feature files")
    predict.add_argument("--out", required=True, help="output directory (signatures.parquet, attention/)")
    predict.add_argument("--slides", nargs="+", help="only these slide ids (default: every feature file)")
    predict.add_argument("--patients", help="CSV mapping slide_id to patient_id (default: patient_id = slide_id)")
    predict.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    predict.add_argument("--slide-col", default="slide_id", help="slide column of --patients")
    predict.add_argument("--patient-col", default="patient_id", help="patient column of --patients")

    export = actions.add_parser("export", help="write a run's signatures as CSV or Parquet")
    export.add_argument("--run", dest="run_dir", required=True, help="a `mil train` or `mil predict` output directory")
    export.add_argument("--out", required=True, help="file to write; .csv for CSV, otherwise Parquet")
    export.add_argument("--per-patient", action="store_true", help="average each patient's slides into one row")

    heatmap = actions.add_parser("heatmap", help="draw attention over slide thumbnails as PNG")
    heatmap.add_argument("--run", dest="run_dir", required=True, help="a `mil train` or `mil predict` output directory")
    heatmap.add_argument("--tiles", required=True, help="the `pathomics tile` output directory (holding tiles/)")
    heatmap.add_argument("--slides", nargs="+", help="only these slide ids (default: every attention file)")
    heatmap.add_argument("--alpha", type=float, default=0.5, help="opacity of the attention colours")
    heatmap.add_argument("--size", type=int, metavar="PX", help="width of each heatmap in pixels (default: the thumbnail's)")
    heatmap.add_argument("--beside", action="store_true", help="draw the plain thumbnail to the left of the heatmap")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics import mil
    from pathomics.cli.common import writable_dir
    from pathomics.batch import exit_code, summarize

    if args.action == "train":
        result = mil.train_mil(args.features, args.labels, writable_dir(Path(args.out)), config_from_args(args))
        print(json.dumps({"out": str(result.out_dir), "summary": result.metrics["summary"]}, indent=2))
        return 0
    if args.action == "predict":
        patients = _patients(args.patients, args.slide_col, args.patient_col) if args.patients else None
        out = writable_dir(Path(args.out))
        rows = mil.predict_mil(args.model, args.features, out, args.slides, patients, args.device)
        print(summarize("mil predict", rows), file=sys.stderr)
        return exit_code(rows)
    if args.action == "export":
        print(mil.export_signatures(args.run_dir, args.out, args.per_patient))
        return 0
    rows = mil.render_heatmaps(args.run_dir, args.tiles, args.slides, args.alpha, size=args.size, beside=args.beside)
    print(summarize("mil heatmap", rows), file=sys.stderr)
    return exit_code(rows)


def config_from_args(args: argparse.Namespace) -> MILConfig:
    """The MILConfig of `mil train`'s arguments; options not given keep the config's defaults."""
    from pathomics.cli.common import config_from_args
    from pathomics.mil import MILConfig  # noqa: F811 - the runtime import of the name typed above

    options = getattr(args, "model_options", None)
    classes = getattr(args, "classes", None)
    return config_from_args(MILConfig, args, model_options=options and tuple(_option(o) for o in options),
                            classes=classes and tuple(classes.split(",")))


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON where it can be (numbers, booleans), else kept as text."""
    from pathomics.errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--model-option {text!r}: expected KEY=VALUE, e.g. k=8")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _patients(path: str, slide_col: str, patient_col: str) -> dict[str, str]:
    """slide_id → patient_id from a CSV."""
    import pandas as pd

    from pathomics.errors import CohortError

    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{path}: cannot read the patients table ({exc})") from exc
    missing = [c for c in (slide_col, patient_col) if c not in table.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {', '.join(missing)}; name them with --slide-col/--patient-col")
    return dict(zip(table[slide_col], table[patient_col]))
