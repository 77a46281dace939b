"""Apply a trained aggregator to feature files, one slide at a time, failures isolated."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pathomics import __version__
from pathomics.errors import ModelError, StoreError
from pathomics.layout import OutputLayout, feature_file_in
from pathomics.mil.artifacts import (
    SlideResult,
    TrainedMIL,
    grade_dicts,
    load_trained,
    read_attention,
    read_attention_attrs,
    write_attention,
    write_signatures,
)
from pathomics.mil.bags import read_bag
from pathomics.batch import DONE, SKIPPED, Outcome, SlideJob, StatusRow, run_jobs


def apply_trained(trained: TrainedMIL, features_path: str | os.PathLike, patient_id: str) -> SlideResult:
    """Run a trained aggregator on one feature file (``<slide_id>.h5``)."""
    features, coords = read_bag(Path(features_path))
    if len(features) == 0 or features.shape[1] != trained.model.in_dim:
        raise ModelError(f"{features_path}: features {features.shape} do not fit a model trained on "
                         f"{trained.model.in_dim}-dimensional features; embed with the training backbone")
    device = next(trained.model.parameters()).device
    with torch.no_grad():
        out = trained.model(torch.from_numpy(features).to(device), torch.from_numpy(coords).to(device))
    scores = out.scores[None].cpu()
    risk = float(trained.objective.risk(scores)[0])
    return SlideResult(Path(features_path).stem, patient_id, trained.fold, risk, out.embedding.cpu().numpy(),
                       out.attention.cpu().numpy(), coords, grade_dicts(trained.objective, scores, 1)[0])


def _done_with(target: Path, trained: TrainedMIL, patient_id: str) -> bool:
    """Whether ``target`` is a readable attention file of this checkpoint and patient (a damaged one is redone)."""
    if not target.exists():
        return False
    try:
        done = read_attention_attrs(target)
    except StoreError:
        return False
    return (done.get("checkpoint_sha256"), done.get("patient_id")) == (trained.sha256, patient_id)


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
    features_dir, layout = Path(features_dir), OutputLayout(out_dir)
    ids = list(slide_ids) if slide_ids is not None else sorted(p.stem for p in features_dir.glob("*.h5"))
    if not ids:
        raise StoreError(f"{features_dir}: no feature files (*.h5) to predict on")
    patients = dict(patients or {})
    provenance = {"config": trained.config.to_dict(), "checkpoint": str(trained.path),
                  "checkpoint_sha256": trained.sha256, "features": str(features_dir), "pathomics_version": __version__}

    def job(slide_id: str) -> SlideJob:
        target = layout.attention_file(slide_id)

        def run() -> Outcome:
            patient_id = patients.get(slide_id, slide_id)
            if _done_with(target, trained, patient_id):
                return SKIPPED, 0
            result = apply_trained(trained, feature_file_in(features_dir, slide_id), patient_id)
            write_attention(target, result, trained.config.model, provenance)
            return DONE, len(result.attention)

        return SlideJob(slide_id, run)

    rows = run_jobs("mil-predict", [job(s) for s in ids], out_dir, show_progress)
    finished = [read_attention(p) for p in sorted(layout.attention.glob("*.h5"))
                if read_attention_attrs(p).get("checkpoint_sha256") == trained.sha256]
    if finished:
        write_signatures(layout.signatures, finished, trained.config.model, provenance)
    return rows
