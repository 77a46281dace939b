"""The MIL stage: feature files + a labels table → trained aggregators, slide signatures, attention, heatmaps.

``train_mil`` cross-validates an aggregator at patient level (all slides of a patient in one fold), writes
out-of-fold ``signatures.parquet``, ``attention/<slide_id>.h5`` and ``metrics.json`` (plus ``mil_config.json``
and checkpoints under ``mil_models/``), and refits a final model on every patient for ``predict_mil``.
``render_heatmaps`` draws attention over the patch stores' thumbnails. Every output is written atomically
and carries the stage config (provenance).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pathomics import __version__
from pathomics.batch import DONE, SKIPPED, Outcome, SlideJob, StatusRow, run_jobs
from pathomics.errors import CohortError, ModelError, StoreError
from pathomics.store import atomic_path, open_patch_store, read_feature_file, sha256_file, store_path

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pathomics.models.mil import MILAggregator
    from pathomics.train import FitResult, Objective, Targets

log = logging.getLogger(__name__)

TASKS = ("classification", "survival")
CACHE_BYTES = 4 << 30  # feature files are kept in memory for training up to this total, then re-read per epoch
SIGNATURES_FILE, METRICS_FILE = "signatures.parquet", "metrics.json"
CONFIG_FILE, MODELS_DIR = "mil_config.json", "mil_models"  # prefixed: the archive run shares one output directory


@dataclass(frozen=True)
class MILConfig:
    """Everything that defines a MIL training run; validated on construction, saved with every output."""

    task: str = "classification"
    model: str = "abmil"
    folds: int = 5
    epochs: int = 40
    patience: int = 8
    min_epochs: int = 10           # no early stop before this epoch (attention needs time to lock on)
    batch_size: int = 16           # bags per optimiser step; the risk set of the Cox loss
    lr: float = 2e-4
    weight_decay: float = 1e-4
    hidden_dim: int = 256
    dropout: float = 0.25
    model_options: tuple[tuple[str, Any], ...] = ()  # aggregator-specific, e.g. (("k", 8),) for clam-sb
    max_patches: int | None = None  # random subset of patches per bag and epoch while training
    val_fraction: float = 0.2      # patients of each training fold held out for early stopping
    class_weights: bool = True
    classes: tuple[str, ...] | None = None  # class order, best to worst; default: sorted labels
    survival_loss: str = "cox"     # "cox" (partial likelihood) or "discrete" (discrete-time NLL)
    ties: str = "efron"            # Cox tie handling: "efron" or "breslow"
    time_bins: int = 4             # bins of the discrete-time loss
    aux_weight: float = 0.3        # weight of the instance-clustering loss (clam-sb)
    aggregate: str = "mean"        # patient-level aggregation of slide predictions, or "none" (slide level)
    refit: bool = True             # after cross-validation, fit a final model on all patients for predict
    seed: int = 0
    device: str = "cpu"            # "cpu", "cuda" or "auto"
    slide_col: str = "slide_id"
    patient_col: str = "patient_id"
    label_col: str = "label"
    time_col: str = "time"
    event_col: str = "event"

    def __post_init__(self) -> None:
        from pathomics.models.mil import list_aggregators

        checks = {
            f"task must be one of {TASKS}": self.task in TASKS,
            f"model must be one of {list_aggregators()}": self.model in list_aggregators(),
            "folds must be at least 2 (use refit for a model on all patients)": self.folds >= 2,
            "epochs, patience, min_epochs, batch_size and hidden_dim must be positive":
                min(self.epochs, self.patience, self.min_epochs, self.batch_size, self.hidden_dim) >= 1,
            "lr must be positive; weight_decay and aux_weight non-negative":
                self.lr > 0 and self.weight_decay >= 0 and self.aux_weight >= 0,
            "dropout must be in [0, 1)": 0 <= self.dropout < 1,
            "max_patches must be None or positive": self.max_patches is None or self.max_patches >= 1,
            "val_fraction must be in [0, 0.5]": 0 <= self.val_fraction <= 0.5,
            "survival_loss must be 'cox' or 'discrete'": self.survival_loss in ("cox", "discrete"),
            "ties must be 'efron' or 'breslow'": self.ties in ("efron", "breslow"),
            "the Cox loss needs batch_size of at least 2 bags":
                not (self.task == "survival" and self.survival_loss == "cox" and self.batch_size < 2),
            "time_bins must be at least 2": self.time_bins >= 2,
            "aggregate must be 'mean' or 'none'": self.aggregate in ("mean", "none"),
            "device must be 'cpu', 'cuda' or 'auto'": self.device in ("cpu", "cuda", "auto"),
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ModelError("invalid MIL config: " + "; ".join(failed))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MILConfig:
        """The config saved by ``to_dict`` (JSON turns tuples into lists; they are turned back)."""
        values = dict(values)
        values["model_options"] = tuple(tuple(pair) for pair in values.get("model_options", ()))
        if values.get("classes") is not None:
            values["classes"] = tuple(values["classes"])
        return cls(**values)

    def aggregator_options(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "dropout": self.dropout, **dict(self.model_options)}


@dataclass(frozen=True, eq=False)
class Bag:
    """One slide's feature file; its arrays are kept when they fit the training cache, else re-read."""

    slide_id: str
    patient_id: str
    path: Path
    cached: tuple[np.ndarray, np.ndarray] | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D) float32, coords (N, 2) int64)."""
        if self.cached is not None:
            return self.cached
        return _read_bag(self.path)


def _read_bag(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and coords of a feature file, refusing non-finite features."""
    ff = read_feature_file(path)
    bad = ~np.isfinite(ff.features).all(axis=1)
    if bad.any():
        raise StoreError(f"{path}: {int(bad.sum())} of {len(bad)} patches have NaN or infinite features; "
                         "re-run `pathomics embed` for this slide (fp16 overflow?) or drop it")
    return ff.features, ff.coords


@dataclass(frozen=True, eq=False)
class Cohort:
    """Bags with their targets, in one order."""

    bags: tuple[Bag, ...]
    targets: Targets
    classes: tuple[str, ...]  # empty for survival
    in_dim: int

    @property
    def slide_ids(self) -> np.ndarray:
        return np.array([b.slide_id for b in self.bags])

    @property
    def patient_ids(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags])


def read_labels(path: str | os.PathLike, config: MILConfig) -> pd.DataFrame:
    """The labels table with canonical columns ``slide_id``, ``patient_id`` and ``label`` or ``time``, ``event``."""
    path = Path(path)
    columns = {config.slide_col: "slide_id", config.patient_col: "patient_id"}
    if config.task == "classification":
        columns[config.label_col] = "label"
    else:
        columns.update({config.time_col: "time", config.event_col: "event"})
    try:
        table = pd.read_csv(path, dtype={config.slide_col: str, config.patient_col: str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{path}: cannot read labels table ({exc})") from exc
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, table.columns))}); "
                          "name yours with --slide-col/--patient-col/--label-col/--time-col/--event-col")
    table = table[list(columns)].rename(columns=columns)
    empty = table.columns[table.isna().any()].tolist()
    if empty:
        raise CohortError(f"{path}: empty values in column(s) {', '.join(empty)}; fill or drop those rows")
    duplicated = table["slide_id"][table["slide_id"].duplicated()].unique()
    if len(duplicated):
        raise CohortError(f"{path}: slide(s) listed more than once: {_some(duplicated)}")
    if config.task == "survival":
        table["time"] = pd.to_numeric(table["time"], errors="coerce")
        table["event"] = pd.to_numeric(table["event"].replace({True: 1, False: 0}), errors="coerce")
        if table["time"].isna().any() or (table["time"] < 0).any():
            raise CohortError(f"{path}: column {config.time_col!r} must hold non-negative numbers")
        if not table["event"].isin([0, 1]).all():
            raise CohortError(f"{path}: column {config.event_col!r} must be 1 (event) or 0 (censored)")
        table["event"] = table["event"].astype(np.int64)
    return table


def load_cohort(features_dir: str | os.PathLike, labels: str | os.PathLike, config: MILConfig,
                cache_bytes: int = CACHE_BYTES) -> Cohort:
    """Match the labels table to ``<features_dir>/<slide_id>.h5`` and validate the cohort for ``config.task``.

    Labelled slides without a (non-empty) feature file are dropped with a warning; feature files of
    different dimensions, non-finite features, a single class or no events are errors.
    """
    from pathomics.train import Targets

    table = read_labels(labels, config)
    features_dir = Path(features_dir)
    paths = {sid: features_dir / f"{sid}.h5" for sid in table["slide_id"]}
    absent = [sid for sid, p in paths.items() if not p.is_file()]
    if absent:
        warnings.warn(f"{len(absent)} labelled slide(s) have no feature file in {features_dir} and are left out: "
                      f"{_some(absent)}", UserWarning, stacklevel=2)
    bags, dims, used = [], {}, 0
    for row in table.itertuples(index=False):
        if row.slide_id in absent:
            continue
        features, coords = _read_bag(paths[row.slide_id])
        if len(features) == 0:
            warnings.warn(f"{paths[row.slide_id]}: no patches; slide {row.slide_id} is left out", UserWarning, stacklevel=2)
            continue
        dims.setdefault(features.shape[1], []).append(row.slide_id)
        keep = used + features.nbytes <= cache_bytes
        used += features.nbytes if keep else 0
        bags.append(Bag(row.slide_id, row.patient_id, paths[row.slide_id], (features, coords) if keep else None))
    if not bags:
        raise CohortError(f"{labels}: none of its slides has a feature file in {features_dir}")
    if len(dims) > 1:
        found = "; ".join(f"{d} ({len(s)} files, e.g. {_some(s, 3)})" for d, s in sorted(dims.items()))
        raise StoreError(f"feature files in {features_dir} differ in embedding dimension: {found}; "
                         "embed all slides with one backbone")
    table = table.set_index("slide_id").loc[[b.slide_id for b in bags]]
    if config.task == "classification":
        classes, labels_idx = _encode_classes(table["label"], config.classes, labels)
        targets = Targets(label=labels_idx)
    else:
        if not table["event"].any():
            raise CohortError(f"{labels}: every slide with features is censored (no events); "
                              "a survival model needs events")
        classes, targets = (), Targets(time=table["time"].to_numpy(float), event=table["event"].to_numpy(np.int64))
    if config.aggregate == "mean":
        _check_patient_targets(table, labels)
    return Cohort(tuple(bags), targets, classes, next(iter(dims)))


def _encode_classes(labels: pd.Series, order: Sequence[str] | None, path: Any) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names (given order, else sorted values) and each slide's class index."""
    names = labels.astype(str)
    classes = tuple(order) if order is not None else tuple(str(v) for v in sorted(labels.unique()))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise CohortError(f"{path}: labels {unknown} are not among the given classes {list(classes)}")
    present = sorted(set(names))
    if len(present) < 2:
        raise CohortError(f"{path}: every slide with features has the same label {present[0]!r}; "
                          "classification needs at least two classes")
    return classes, names.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)


def _check_patient_targets(table: pd.DataFrame, path: Any) -> None:
    """Patient-level aggregation needs one label (or time and event) per patient."""
    target_cols = [c for c in ("label", "time", "event") if c in table.columns]
    varying = table.groupby("patient_id")[target_cols].nunique().gt(1).any(axis=1)
    if varying.any():
        raise CohortError(f"{path}: patient(s) {_some(varying.index[varying])} have slides with different "
                          "targets; fix the table or use --aggregate none for slide-level targets")


def _some(items: Iterable[Any], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, with a count of the rest."""
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


@dataclass(frozen=True, eq=False)
class SlideResult:
    """A trained aggregator's output for one slide: what the signatures and attention files hold."""

    slide_id: str
    patient_id: str
    fold: int
    risk: float
    embedding: np.ndarray  # (K,)
    attention: np.ndarray  # (N,)
    coords: np.ndarray     # (N, 2)


@dataclass(frozen=True)
class MILRun:
    """What ``train_mil`` produced: the output directory, the metrics and the signatures table."""

    out_dir: Path
    metrics: dict[str, Any]
    signatures: pd.DataFrame


def train_mil(features_dir: str | os.PathLike, labels: str | os.PathLike, out_dir: str | os.PathLike,
              config: MILConfig = MILConfig()) -> MILRun:
    """Cross-validate ``config.model`` on the labelled slides; write signatures, attention, metrics, models."""
    out_dir = Path(out_dir)
    cohort = load_cohort(features_dir, labels, config)
    provenance = {"config": config.to_dict(), "features": str(features_dir), "labels": str(labels),
                  "in_dim": cohort.in_dim, "classes": list(cohort.classes), "pathomics_version": __version__}
    _write_json(out_dir / CONFIG_FILE, provenance)
    results, fold_metrics, pooled = _cross_validate(cohort, config, out_dir, provenance)
    if config.refit:
        best = [f["best_epoch"] for f in fold_metrics]
        epochs = int(np.median(best)) if config.val_fraction > 0 else config.epochs
        everyone = np.arange(len(cohort.bags))
        model, objective, _ = _fit_model(cohort, everyone, everyone[:0], config, config.folds, epochs)
        _save_checkpoint(out_dir / MODELS_DIR / "final.pt", model, objective, config, -1, epochs)
    signatures = write_signatures(out_dir / SIGNATURES_FILE, results, config.model, provenance)
    metrics = _metrics_document(config, fold_metrics, pooled, provenance)
    _write_json(out_dir / METRICS_FILE, metrics)
    return MILRun(out_dir, metrics, signatures)


def _cross_validate(cohort: Cohort, config: MILConfig, out_dir: Path,
                    provenance: Mapping[str, Any]) -> tuple[list[SlideResult], list[dict[str, Any]], dict[str, float]]:
    """Patient-level K-fold: per fold, train (early stopping on held-out training patients), save the
    checkpoint, write held-out attention files. Returns out-of-fold results, per-fold metrics, pooled metrics."""
    from pathomics import train

    patients = cohort.patient_ids
    units = patients if config.aggregate == "mean" else cohort.slide_ids
    strata = cohort.targets.label if config.task == "classification" else cohort.targets.event
    fold_of = train.patient_folds(patients, strata, config.folds, config.seed)
    predictions = np.zeros((len(cohort.bags), len(cohort.classes)) if cohort.classes else len(cohort.bags))
    results, fold_metrics = [], []
    for fold in range(config.folds):
        test, rest = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        val = train.validation_split(patients[rest], strata[rest], config.val_fraction, config.seed + fold)
        model, objective, fitted = _fit_model(cohort, rest[~val], rest[val], config, fold, config.epochs)
        checkpoint = out_dir / MODELS_DIR / f"fold_{fold}.pt"
        sha = _save_checkpoint(checkpoint, model, objective, config, fold, fitted.best_epoch)
        fold_results, predictions[test] = _apply(model, objective, cohort, test, fold, config)
        for result in fold_results:
            write_attention(out_dir / "attention" / f"{result.slide_id}.h5", result, config.model,
                            {**provenance, "checkpoint": str(checkpoint), "checkpoint_sha256": sha})
        results += fold_results
        metrics = train.evaluate(predictions[test], cohort.targets, test, units)
        fold_metrics.append({"fold": fold, "best_epoch": fitted.best_epoch, "n_train_slides": len(rest),
                             "n_test_slides": len(test), "checkpoint_sha256": sha, **metrics})
        log.info("mil %s fold %d/%d: %s", config.model, fold + 1, config.folds,
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    return results, fold_metrics, train.evaluate(predictions, cohort.targets, np.arange(len(cohort.bags)), units)


def _fit_model(cohort: Cohort, train_idx: np.ndarray, val_idx: np.ndarray, config: MILConfig, run: int,
               epochs: int) -> tuple[MILAggregator, Objective, FitResult]:
    """Build, seed and train one aggregator; returns (model, objective, FitResult)."""
    import torch

    from pathomics import train
    from pathomics.models.mil import build_aggregator

    device = resolve_device(config.device)
    seed = int(np.random.SeedSequence([config.seed, run]).generate_state(1)[0])
    objective = _make_objective(cohort, train_idx, config)
    settings = train.TrainSettings(epochs, config.patience, config.min_epochs, config.batch_size, config.lr,
                                   config.weight_decay, config.max_patches, config.aux_weight, seed)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_aggregator(config.model, cohort.in_dim, objective.n_outputs, **config.aggregator_options())
        model.set_feature_scaling(*train.feature_statistics(lambda i: cohort.bags[i].load(), train_idx))
        fitted = train.fit(model.to(device), objective, cohort.targets, lambda i: cohort.bags[i].load(),
                           train_idx, val_idx, settings, device)
    if isinstance(objective, train.CoxSurvival):
        outputs = train.predict(model, lambda i: cohort.bags[i].load(), train_idx, device)
        objective = objective.standardized(torch.stack([o.scores for o in outputs]).cpu())
    return model, objective, fitted


def _make_objective(cohort: Cohort, train_idx: np.ndarray, config: MILConfig) -> Objective:
    """The loss for ``config.task``, fitted on the training bags (class weights, time bins)."""
    from pathomics import train

    targets = cohort.targets
    if config.task == "classification":
        weights = train.class_weights(targets.label[train_idx], len(cohort.classes)) if config.class_weights else None
        return train.Classification(cohort.classes, weights)
    if config.survival_loss == "cox":
        return train.CoxSurvival(config.ties)
    return train.DiscreteSurvival(train.time_bin_edges(targets.time[train_idx], targets.event[train_idx], config.time_bins))


def _apply(model: MILAggregator, objective: Objective, cohort: Cohort, index: np.ndarray, fold: int,
           config: MILConfig) -> tuple[list[SlideResult], np.ndarray]:
    """Slide results and predictions (class probabilities (n, C), or risks (n,)) of a model on bags ``index``."""
    import torch

    from pathomics import train

    outputs = train.predict(model, lambda i: cohort.bags[i].load(), index, resolve_device(config.device))
    scores = torch.stack([o.scores for o in outputs]).cpu()
    risk = objective.risk(scores).numpy()
    predictions = objective.probabilities(scores).numpy() if config.task == "classification" else risk
    results = [SlideResult(cohort.bags[i].slide_id, cohort.bags[i].patient_id, fold, float(r),
                           o.embedding.cpu().numpy(), o.attention.cpu().numpy(), cohort.bags[i].load()[1])
               for i, o, r in zip(index, outputs, risk)]
    return results, predictions


def resolve_device(name: str) -> torch.device:
    """The torch device for ``cpu``, ``cuda`` or ``auto`` (cuda when available)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def _metrics_document(config: MILConfig, folds: list[dict[str, Any]], pooled: dict[str, float],
                      provenance: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: per-fold metrics, their mean ± sd, and the metrics of the pooled out-of-fold predictions."""
    names = ("auc", "balanced_accuracy") if config.task == "classification" else ("c_index",)
    summary = {}
    for name in names:
        values = np.array([f[name] for f in folds], dtype=float)
        summary[name] = {"mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
                         "sd": float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else None}
    return {"task": config.task, "model": config.model, "unit": "patient" if config.aggregate == "mean" else "slide",
            "folds": folds, "summary": summary, "pooled_out_of_fold": pooled, **provenance}


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write JSON atomically; NaN (an undefined metric) becomes null."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean(document), indent=2))


def _save_checkpoint(path: Path, model: MILAggregator, objective: Objective, config: MILConfig, fold: int,
                     best_epoch: int) -> str:
    """Save weights + everything needed to rebuild the model; returns the file's SHA-256."""
    import torch

    checkpoint = {"aggregator": config.model, "in_dim": model.in_dim, "options": config.aggregator_options(),
                  "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "objective": objective.state(),
                  "config": config.to_dict(), "fold": fold, "best_epoch": best_epoch, "pathomics_version": __version__}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
        return sha256_file(tmp)


@dataclass(frozen=True, eq=False)
class TrainedMIL:
    """A saved aggregator ready to apply: model (eval mode), objective, config, fold and checkpoint hash."""

    model: MILAggregator
    objective: Objective
    config: MILConfig
    fold: int
    sha256: str
    path: Path


def load_trained(path: str | os.PathLike, device: str = "cpu") -> TrainedMIL:
    """Load a checkpoint file, or the final model (``mil_models/final.pt``) of a ``train_mil`` output directory."""
    import torch

    from pathomics.models.mil import build_aggregator
    from pathomics.train import objective_from_state

    path = Path(path)
    if path.is_dir():
        path = path / MODELS_DIR / "final.pt"
    if not path.is_file():
        raise ModelError(f"{path}: no trained MIL model here; train one with `pathomics mil train` (refit on)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        objective = objective_from_state(checkpoint["objective"])
        model = build_aggregator(checkpoint["aggregator"], checkpoint["in_dim"], objective.n_outputs,
                                 **checkpoint["options"])
        model.load_state_dict(checkpoint["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{path}: not a pathomics MIL checkpoint ({exc})") from exc
    model.to(resolve_device(device)).eval()
    config = MILConfig.from_dict(checkpoint["config"])
    return TrainedMIL(model, objective, config, int(checkpoint["fold"]), sha256_file(path), path)


def apply_trained(trained: TrainedMIL, features_path: str | os.PathLike, patient_id: str) -> SlideResult:
    """Run a trained aggregator on one feature file (``<slide_id>.h5``)."""
    import torch

    features, coords = _read_bag(Path(features_path))
    if len(features) == 0 or features.shape[1] != trained.model.in_dim:
        raise ModelError(f"{features_path}: features {features.shape} do not fit a model trained on "
                         f"{trained.model.in_dim}-dimensional features; embed with the training backbone")
    device = next(trained.model.parameters()).device
    with torch.no_grad():
        out = trained.model(torch.from_numpy(features).to(device), torch.from_numpy(coords).to(device))
    risk = float(trained.objective.risk(out.scores[None].cpu())[0])
    return SlideResult(Path(features_path).stem, patient_id, trained.fold, risk, out.embedding.cpu().numpy(),
                       out.attention.cpu().numpy(), coords)


def predict_mil(model_path: str | os.PathLike, features_dir: str | os.PathLike, out_dir: str | os.PathLike,
                slide_ids: Sequence[str] | None = None, patients: Mapping[str, str] | None = None,
                device: str = "cpu", show_progress: bool = True) -> list[StatusRow]:
    """Apply a trained model to feature files (all of ``features_dir``, or ``slide_ids``), one slide at a time.

    Writes ``attention/<slide_id>.h5`` per slide (skipping slides already done with this checkpoint), then
    ``signatures.parquet`` over every slide of ``out_dir`` done with this checkpoint, by this call or an
    earlier one; failures are isolated and recorded in ``status.csv``.
    ``patients`` maps slide_id → patient_id (default: the slide_id).
    """
    trained = load_trained(model_path, device)
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    ids = list(slide_ids) if slide_ids is not None else sorted(p.stem for p in features_dir.glob("*.h5"))
    if not ids:
        raise StoreError(f"{features_dir}: no feature files (*.h5) to predict on")
    patients = dict(patients or {})
    provenance = {"config": trained.config.to_dict(), "checkpoint": str(trained.path),
                  "checkpoint_sha256": trained.sha256, "features": str(features_dir), "pathomics_version": __version__}

    def job(slide_id: str) -> SlideJob:
        target = out_dir / "attention" / f"{slide_id}.h5"

        def run() -> Outcome:
            patient_id = patients.get(slide_id, slide_id)
            if target.exists():
                done = read_attention_attrs(target)
                if (done.get("checkpoint_sha256"), done.get("patient_id")) == (trained.sha256, patient_id):
                    return SKIPPED, 0
            result = apply_trained(trained, features_dir / f"{slide_id}.h5", patient_id)
            write_attention(target, result, trained.config.model, provenance)
            return DONE, len(result.attention)

        return SlideJob(slide_id, run)

    rows = run_jobs("mil-predict", [job(s) for s in ids], out_dir, show_progress)
    finished = [read_attention(p) for p in sorted((out_dir / "attention").glob("*.h5"))
                if read_attention_attrs(p).get("checkpoint_sha256") == trained.sha256]
    if finished:
        write_signatures(out_dir / SIGNATURES_FILE, finished, trained.config.model, provenance)
    return rows


def write_attention(path: Path, result: SlideResult, model: str, provenance: Mapping[str, Any]) -> None:
    """``attention/<slide_id>.h5``: ``attention`` (N,), ``coords`` (N, 2), ``embedding`` (K,); risk etc. as attributes."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("attention", data=result.attention.astype(np.float32))
        h5.create_dataset("coords", data=result.coords.astype(np.int64))
        h5.create_dataset("embedding", data=result.embedding.astype(np.float32))
        h5.attrs.update({"slide_id": result.slide_id, "patient_id": result.patient_id, "fold": result.fold,
                         "risk": result.risk, "model": model, "pathomics_version": __version__,
                         "checkpoint_sha256": provenance.get("checkpoint_sha256", ""),
                         "provenance": json.dumps(provenance)})


def read_attention_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an attention file (slide_id, patient_id, fold, risk, model, checkpoint_sha256, ...)."""
    import h5py

    with h5py.File(path, "r") as h5:
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in h5.attrs.items()}


def read_attention(path: str | os.PathLike) -> SlideResult:
    """The slide result stored in an attention file."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            a = dict(h5.attrs)
            return SlideResult(str(a["slide_id"]), str(a["patient_id"]), int(a["fold"]), float(a["risk"]),
                               h5["embedding"][:], h5["attention"][:], h5["coords"][:])
    except (OSError, KeyError) as exc:
        raise StoreError(f"{path}: not a pathomics attention file ({exc}); re-run `pathomics mil predict`") from exc


def write_signatures(path: Path, results: Sequence[SlideResult], model: str,
                     provenance: Mapping[str, Any]) -> pd.DataFrame:
    """``signatures.parquet``: one row per slide (slide_id, patient_id, risk, sig_0..sig_{K-1}, model, fold)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings = np.stack([r.embedding for r in results]).astype(np.float32)
    table = pd.concat([
        pd.DataFrame({"slide_id": [r.slide_id for r in results], "patient_id": [r.patient_id for r in results],
                      "risk": np.array([r.risk for r in results], dtype=np.float64)}),
        pd.DataFrame(embeddings, columns=[f"sig_{i}" for i in range(embeddings.shape[1])]),
        pd.DataFrame({"model": model, "fold": np.array([r.fold for r in results], dtype=np.int64)}),
    ], axis=1)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"pathomics": json.dumps(provenance).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)
    return table


def export_signatures(run_dir: str | os.PathLike, out_path: str | os.PathLike, per_patient: bool = False) -> Path:
    """Copy a run's signatures to CSV or Parquet (by suffix); ``per_patient`` averages risk and signature
    over each patient's slides (one row per patient, with ``n_slides``)."""
    source = Path(run_dir)
    source = source / SIGNATURES_FILE if source.is_dir() else source
    if not source.is_file():
        raise StoreError(f"{source}: no signatures; run `pathomics mil train` or `predict` first")
    table = pd.read_parquet(source)
    if per_patient:
        numeric = ["risk"] + [c for c in table.columns if c.startswith("sig_")]
        grouped = table.groupby("patient_id", sort=True)
        table = (grouped[numeric].mean().join(grouped["model"].first())
                 .join(grouped.size().rename("n_slides")).reset_index())
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        if out_path.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    return out_path


def draw_heatmap(thumbnail: Image.Image, slide_size: tuple[int, int], coords: np.ndarray, patch_size_level0: int,
                 attention: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> Image.Image:
    """Attention over a whole-slide thumbnail (PIL image covering the level-0 ``slide_size`` (w, h)).

    Attention is shown as its rank percentile within the slide (raw attention spans orders of magnitude);
    each patch's square is coloured and blended with weight ``alpha``; overlapping patches are averaged.
    """
    from matplotlib import colormaps
    from PIL import Image  # noqa: F811 - the runtime import of the name typed above
    from scipy.stats import rankdata

    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    sx, sy = w / slide_size[0], h / slide_size[1]
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(int), 0, h - 1)
    x1 = np.clip(np.maximum(np.ceil((coords[:, 0] + patch_size_level0) * sx).astype(int), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.ceil((coords[:, 1] + patch_size_level0) * sy).astype(int), y0 + 1), 1, h)
    value = rankdata(attention) / len(attention)
    total, count = _paint(value, x0, y0, x1, y1, (h, w)), _paint(np.ones_like(value), x0, y0, x1, y1, (h, w))
    covered = count > 0.5
    colour = colormaps[cmap](np.where(covered, total / np.maximum(count, 1), 0))[..., :3] * 255
    base[covered] = (1 - alpha) * base[covered] + alpha * colour[covered]
    return Image.fromarray(np.round(base).astype(np.uint8))


def _paint(values: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
           shape: tuple[int, int]) -> np.ndarray:
    """Sum of ``values`` over axis-aligned boxes [y0, y1) × [x0, x1), by a 2-D difference array."""
    diff = np.zeros((shape[0] + 1, shape[1] + 1))
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(diff, (ys, xs), sign * values)
    return diff.cumsum(0).cumsum(1)[:-1, :-1]


def render_heatmap(attention_path: str | os.PathLike, tiles_out: str | os.PathLike, out_png: str | os.PathLike,
                   alpha: float = 0.5) -> Path:
    """Draw one slide's attention file over its patch store's thumbnail (``<tiles_out>/tiles/<id>.thumb.png``)."""
    from PIL import Image, PngImagePlugin

    result = read_attention(attention_path)
    store = open_patch_store(store_path(tiles_out, result.slide_id))
    thumb_path = store.path.with_name(f"{result.slide_id}.thumb.png")
    missing = [k for k in ("slide_width", "slide_height") if k not in store.attrs]
    if missing or not thumb_path.is_file():
        raise StoreError(f"{store.path}: no thumbnail or slide size ({', '.join(missing) or thumb_path.name}); "
                         "re-run `pathomics tile`")
    with Image.open(thumb_path) as thumb:
        image = draw_heatmap(thumb, (int(store.attrs["slide_width"]), int(store.attrs["slide_height"])),
                             result.coords, int(store.attrs["patch_size_level0"]), result.attention, alpha)
    info = PngImagePlugin.PngInfo()
    info.add_text("pathomics", json.dumps({"slide_id": result.slide_id, "attention": str(attention_path),
                                           "alpha": alpha, "pathomics_version": __version__}))
    with atomic_path(out_png) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(out_png)


def render_heatmaps(run_dir: str | os.PathLike, tiles_out: str | os.PathLike, slide_ids: Sequence[str] | None = None,
                    alpha: float = 0.5, show_progress: bool = True) -> list[StatusRow]:
    """``<run_dir>/heatmaps/<slide_id>.png`` for each attention file of a run; failures isolated in status.csv.

    A heatmap newer than its attention file is skipped.
    """
    run_dir = Path(run_dir)
    ids = list(slide_ids) if slide_ids is not None else sorted(p.stem for p in (run_dir / "attention").glob("*.h5"))
    if not ids:
        raise StoreError(f"{run_dir}: no attention files; run `pathomics mil train` or `predict` first")

    def job(slide_id: str) -> SlideJob:
        def run() -> Outcome:
            attention, png = run_dir / "attention" / f"{slide_id}.h5", run_dir / "heatmaps" / f"{slide_id}.png"
            if png.exists() and attention.exists() and png.stat().st_mtime >= attention.stat().st_mtime:
                return SKIPPED, 0
            render_heatmap(attention, tiles_out, png, alpha)
            return DONE, 0

        return SlideJob(slide_id, run)

    return run_jobs("mil-heatmap", [job(s) for s in ids], run_dir, show_progress)
