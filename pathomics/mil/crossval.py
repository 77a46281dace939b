"""Patient-level cross-validation of an aggregator: folds saved and skipped when finished, out-of-fold
signatures, attention and metrics, and a final model refitted on every patient."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pathomics import __version__
from pathomics.batch import epoch_progress
from pathomics.device import resolve_device
from pathomics.errors import ModelError
from pathomics.layout import FINAL_CHECKPOINT, OutputLayout
from pathomics.folds import patient_folds, validation_split
from pathomics.losses import time_bin_edges
from pathomics.mil import train
from pathomics.mil.aggregators import MILEnsemble, MILModel, build_aggregator
from pathomics.mil.artifacts import (
    SlideResult,
    TrainedMIL,
    grade_dicts,
    load_trained,
    save_checkpoint,
    write_attention,
    write_signatures,
)
from pathomics.mil.bags import LabelledBags, load_bags
from pathomics.mil.config import MILConfig
from pathomics.io import digest, write_json

log = logging.getLogger(__name__)
EpochDisplay = Callable[[str, int, int], None]  # (what is trained, epoch, epochs): one epoch ended


def labelled(bar: epoch_progress, label: str) -> EpochDisplay:
    """Show epochs on ``bar`` under ``label`` (a fold, the final model) followed by the detail given."""
    return lambda detail, epoch, epochs: bar.show(label + detail, epoch, epochs)


def _show_epoch(show: EpochDisplay, member: int, n_members: int, epochs: int, epoch: int) -> None:
    """One member's epoch, the member named when an ensemble has several."""
    show(f", model {member + 1}/{n_members}" if n_members > 1 else "", epoch, epochs)


@dataclass(frozen=True)
class MILRun:
    """What ``train_mil`` produced: the output directory, the metrics and the signatures table."""

    out_dir: Path
    metrics: dict[str, Any]
    signatures: pd.DataFrame


def train_mil(features_dir: str | os.PathLike, labels: str | os.PathLike, out_dir: str | os.PathLike,
              config: MILConfig = MILConfig(), show_progress: bool = True) -> MILRun:
    """Cross-validate ``config.model`` on the labelled slides; write signatures, attention, metrics, models.
    ``show_progress``: the fold and epoch on a terminal (``batch.epoch_progress``).

    A fold (or the final refit) whose checkpoint was trained on the same bags with the same config is
    loaded instead of retrained, so a run killed during cross-validation resumes at its first unfinished fold.
    """
    layout = OutputLayout(out_dir)
    cohort = load_bags(features_dir, labels, config)
    provenance = {"config": config.to_dict(), "features": str(features_dir), "labels": str(labels),
                  "in_dim": cohort.in_dim, "classes": list(cohort.classes), "pathomics_version": __version__}
    write_json(layout.mil_config, provenance)
    with epoch_progress(show_progress) as bar:
        results, fold_metrics, pooled = _cross_validate(cohort, config, layout, provenance, bar)
        if config.refit:
            best = [f["best_epoch"] for f in fold_metrics]
            epochs = int(np.median(best)) if config.val_fraction > 0 else config.epochs
            everyone = np.arange(len(cohort.bags))
            _trained_or_fit(cohort, everyone, everyone[:0], config, config.folds, epochs, layout.final_checkpoint,
                            labelled(bar, f"mil {config.model} final model"))
    signatures = write_signatures(layout.signatures, results, config.model, provenance)
    metrics = _metrics_document(config, fold_metrics, pooled, provenance)
    write_json(layout.mil_metrics, metrics)
    return MILRun(layout.root, metrics, signatures)


def _cross_validate(cohort: LabelledBags, config: MILConfig, layout: OutputLayout, provenance: Mapping[str, Any],
                    bar: epoch_progress) -> tuple[list[SlideResult], list[dict[str, Any]], dict[str, float]]:
    """Patient-level K-fold: per fold, train (early stopping on held-out training patients) or load its finished
    checkpoint, write held-out attention files. Returns out-of-fold results, per-fold metrics, pooled metrics."""
    patients = cohort.patient_ids
    units = cohort.slide_ids if config.aggregate == "none" else patients
    how = "mean" if config.aggregate == "none" else config.aggregate  # one slide per unit: any reduction is the same
    strata = cohort.targets.label if config.task == "classification" else cohort.targets.event
    fold_of = patient_folds(patients, strata, config.folds, config.seed)
    write_json(layout.splits, {"folds": dict(zip(cohort.slide_ids.tolist(), fold_of.tolist())),
                               "patients": dict(zip(cohort.slide_ids.tolist(), patients.tolist()))})
    predictions = np.zeros((len(cohort.bags), len(cohort.classes)) if cohort.classes else len(cohort.bags))
    results, fold_metrics = [], []
    for fold in range(config.folds):
        test, rest = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        val = validation_split(patients[rest], strata[rest], config.val_fraction, config.seed + fold)
        checkpoint = layout.fold_checkpoint(fold)
        trained = _trained_or_fit(cohort, rest[~val], rest[val], config, fold, config.epochs, checkpoint,
                                  labelled(bar, f"mil {config.model} fold {fold + 1}/{config.folds}"))
        fold_results, predictions[test] = _apply(trained.model, trained.objective, cohort, test, fold, config)
        for result in fold_results:
            write_attention(layout.attention_file(result.slide_id), result, config.model,
                            {**provenance, "checkpoint": str(checkpoint), "checkpoint_sha256": trained.sha256})
        results += fold_results
        metrics = train.evaluate(predictions[test], cohort.targets, test, units, how)
        fold_metrics.append({"fold": fold, "best_epoch": trained.best_epoch, "n_train_slides": len(rest),
                             "n_test_slides": len(test), "checkpoint_sha256": trained.sha256, **metrics})
        log.info("mil %s fold %d/%d: %s", config.model, fold + 1, config.folds,
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    return results, fold_metrics, train.evaluate(predictions, cohort.targets, np.arange(len(cohort.bags)), units, how)


def _trained_or_fit(cohort: LabelledBags, train_idx: np.ndarray, val_idx: np.ndarray, config: MILConfig, run: int,
                    epochs: int, checkpoint: Path, show: EpochDisplay) -> TrainedMIL:
    """The model of ``checkpoint`` when it was trained on these bags with this config and epochs; else train and
    save, showing each epoch with ``show``."""
    key = training_key(cohort, train_idx, val_idx, config, run, epochs)
    if checkpoint.is_file():
        try:
            done = load_trained(checkpoint, config.device)
        except ModelError as exc:
            log.info("mil %s: %s cannot be used (%s); training it again", config.model, checkpoint.name, exc)
            done = None
        if done is not None and done.training_key == key:
            log.info("mil %s: %s is finished; loaded, not retrained", config.model, checkpoint.name)
            return done
    model, objective, fitted = fit_model(cohort, train_idx, val_idx, config, run, epochs, show)
    best = fitted.best_epoch if len(val_idx) else epochs
    sha = save_checkpoint(checkpoint, model, objective, config, run if checkpoint.name != FINAL_CHECKPOINT else -1, best, key)
    return TrainedMIL(model.eval(), objective, config, run, sha, checkpoint, best, key)


def training_key(cohort: LabelledBags, train_idx: np.ndarray, val_idx: np.ndarray, config: MILConfig, run: int,
                 epochs: int) -> str:
    """A digest of what a fit depends on: config (not the device), run, epochs, and each bag's identity,
    target and feature file (size and modification time), for the training and validation bags."""
    def bags(index: np.ndarray) -> list[list[Any]]:
        out = []
        for i in index:
            bag, stat = cohort.bags[i], cohort.bags[i].path.stat()
            out.append([bag.slide_id, bag.patient_id, stat.st_size, stat.st_mtime_ns,
                        *(np.asarray(t)[i].tolist() for t in cohort.targets.arrays())])
        return out

    document = {"config": {k: v for k, v in config.to_dict().items() if k != "device"}, "run": run, "epochs": epochs,
                "train": bags(train_idx), "val": bags(val_idx), "classes": list(cohort.classes)}
    return digest(document)


def fit_model(cohort: LabelledBags, train_idx: np.ndarray, val_idx: np.ndarray, config: MILConfig, run: int,
              epochs: int, show: EpochDisplay | None = None) -> tuple[MILModel, train.Objective, train.FitResult]:
    """Build, seed and train one aggregator, or ``config.ensemble_size`` of them averaged as one ensemble;
    returns (model, objective, FitResult of the first member with the members' median best epoch).
    ``show(description, epoch, epochs)`` is told each epoch's end, each member named when there are several."""
    device = resolve_device(config.device)
    objective = _make_objective(cohort, train_idx, config)
    statistics = train.feature_statistics(lambda i: cohort.bags[i].load(), train_idx)
    members, fits = [], []
    n_members = config.ensemble_size(len(train_idx))
    for member in range(n_members):
        entropy = [config.seed, run] + ([member] if member else [])  # member 0: the seed of a single model
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        settings = train.TrainConfig(epochs, config.patience, config.min_epochs, config.batch_size, config.lr,
                                     config.weight_decay, config.max_patches, config.aux_weight, seed,
                                     config.warmup_epochs, config.schedule, config.instance_dropout)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = build_aggregator(config.model, cohort.in_dim, objective.n_outputs, **config.aggregator_options())
            model.set_feature_scaling(*statistics)
            on_epoch = None if show is None else partial(_show_epoch, show, member, n_members, epochs)
            fits.append(train.fit(model.to(device), objective, cohort.targets, lambda i: cohort.bags[i].load(),
                                  train_idx, val_idx, settings, device, on_epoch))
        members.append(model)
    trained = members[0] if len(members) == 1 else MILEnsemble(members)
    fitted = replace(fits[0], best_epoch=int(np.median([f.best_epoch for f in fits])))
    if isinstance(objective.primary(), train.CoxSurvival):
        outputs = train.predict(trained, lambda i: cohort.bags[i].load(), train_idx, device)
        objective = objective.standardized(torch.stack([o.scores for o in outputs]).cpu())
    return trained, objective, fitted


def _make_objective(cohort: LabelledBags, train_idx: np.ndarray, config: MILConfig) -> train.Objective:
    """The loss for ``config.task``, fitted on the training bags (class weights, time bins)."""
    targets = cohort.targets
    if config.task == "classification":
        weights = train.class_weights(targets.label[train_idx], len(cohort.classes)) if config.class_weights else None
        objective: train.Objective = train.Classification(cohort.classes, weights)
    elif config.survival_loss == "cox":
        objective = train.CoxSurvival(config.ties)
    else:
        objective = train.DiscreteSurvival(
            time_bin_edges(targets.time[train_idx], targets.event[train_idx], config.time_bins))
    return train.WithGrade(objective, cohort.grades, config.grade_weight) if cohort.grades else objective


def _apply(model: MILModel, objective: train.Objective, cohort: LabelledBags, index: np.ndarray, fold: int,
           config: MILConfig) -> tuple[list[SlideResult], np.ndarray]:
    """Slide results and predictions (class probabilities (n, C), or risks (n,)) of a model on bags ``index``."""
    outputs = train.predict(model, lambda i: cohort.bags[i].load(), index, resolve_device(config.device))
    scores = torch.stack([o.scores for o in outputs]).cpu()
    risk = objective.risk(scores).numpy()
    predictions = objective.probabilities(scores).numpy() if config.task == "classification" else risk
    grades = grade_dicts(objective, scores, len(index))
    results = [SlideResult(cohort.bags[i].slide_id, cohort.bags[i].patient_id, fold, float(r),
                           o.embedding.cpu().numpy(), o.attention.cpu().numpy(), cohort.bags[i].load()[1], g)
               for i, o, r, g in zip(index, outputs, risk, grades)]
    return results, predictions


def _metrics_document(config: MILConfig, folds: list[dict[str, Any]], pooled: dict[str, float],
                      provenance: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: per-fold metrics, their mean ± sd, and the metrics of the pooled out-of-fold predictions."""
    names = ("auc", "balanced_accuracy") if config.task == "classification" else ("c_index",)
    summary = {}
    for name in names:
        values = np.array([f[name] for f in folds], dtype=float)
        summary[name] = {"mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
                         "sd": float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else None}
    return {"task": config.task, "model": config.model, "unit": "slide" if config.aggregate == "none" else "patient",
            "folds": folds, "summary": summary, "pooled_out_of_fold": pooled, **provenance}
