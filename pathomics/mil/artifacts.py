"""What the MIL stage writes and reads back: checkpoints, attention files and the signatures table."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pathomics import __version__
from pathomics.device import resolve_device
from pathomics.errors import ModelError, StoreError
from pathomics.layout import OutputLayout
from pathomics.mil.aggregators import MILEnsemble, MILModel, build_aggregator
from pathomics.mil.config import MILConfig
from pathomics.mil.train import Objective, objective_from_state
from pathomics.io import atomic_path, checked_sha256, one_line_reason, record_sha256


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
    grades: Mapping[str, float] = field(default_factory=dict)  # predicted grade probabilities (grade head)


def grade_dicts(objective: Objective, scores: torch.Tensor, n: int) -> list[dict[str, float]]:
    """Per bag, ``{grade: probability}`` from a grade head's scores (empty dicts without one)."""
    probabilities = objective.grade_probabilities(scores)
    if probabilities is None:
        return [{} for _ in range(n)]
    return [dict(zip(objective.grades, map(float, row))) for row in probabilities.tolist()]


def save_checkpoint(path: Path, model: MILModel, objective: Objective, config: MILConfig, fold: int,
                    best_epoch: int, training_key: str = "") -> str:
    """Save weights + everything needed to rebuild the model; returns the file's SHA-256.

    ``training_key`` identifies the data and settings it was trained on, so a finished fold is not retrained.
    """
    members = len(model.members) if isinstance(model, MILEnsemble) else 1
    checkpoint = {"aggregator": config.model, "in_dim": model.in_dim, "options": config.aggregator_options(),
                  "members": members,
                  "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "objective": objective.state(),
                  "config": config.to_dict(), "fold": fold, "best_epoch": best_epoch, "training_key": training_key,
                  "pathomics_version": __version__}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # to memory: torch's own file writer fails with no errno ("iostream error")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        return record_sha256(tmp, path)


@dataclass(frozen=True, eq=False)
class TrainedMIL:
    """A saved aggregator ready to apply: model (eval mode), objective, config, fold and checkpoint hash."""

    model: MILModel
    objective: Objective
    config: MILConfig
    fold: int
    sha256: str
    path: Path
    best_epoch: int = 0
    training_key: str = ""


def load_trained(path: str | os.PathLike, device: str = "cpu") -> TrainedMIL:
    """Load a checkpoint file, or the final model (``mil_models/final.pt``) of a ``train_mil`` output directory."""
    path = Path(path)
    if path.is_dir():
        path = OutputLayout(path).final_checkpoint
    if not path.is_file():
        raise ModelError(f"{path}: no trained MIL model here; train one with `pathomics mil train` (refit on)")
    remedy = "re-run `pathomics mil train` (it retrains only the folds whose checkpoint is missing or damaged)"
    try:
        sha = checked_sha256(path, remedy)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        objective = objective_from_state(checkpoint["objective"])
        members = [build_aggregator(checkpoint["aggregator"], checkpoint["in_dim"], objective.n_outputs,
                                    **checkpoint["options"]) for _ in range(checkpoint.get("members", 1))]
        model = members[0] if len(members) == 1 else MILEnsemble(members)
        model.load_state_dict(checkpoint["state_dict"])
        config = MILConfig.from_dict(checkpoint["config"])
    except StoreError as exc:
        raise ModelError(str(exc)) from exc
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{path} cannot be read as a pathomics MIL checkpoint ({one_line_reason(exc)}); {remedy}") from exc
    model.to(resolve_device(device)).eval()
    return TrainedMIL(model, objective, config, int(checkpoint["fold"]), sha, path,
                      int(checkpoint.get("best_epoch", 0)), str(checkpoint.get("training_key", "")))


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
                         "grades": json.dumps(dict(result.grades)), "provenance": json.dumps(provenance)})


def read_attention_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an attention file (slide_id, patient_id, fold, risk, model, checkpoint_sha256, ...)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return {k: v.decode() if isinstance(v, bytes) else v for k, v in h5.attrs.items()}
    except OSError as exc:
        raise StoreError(f"{path} cannot be read as an attention file ({one_line_reason(exc)}); delete it and re-run "
                         "`pathomics mil predict`") from exc


def read_attention(path: str | os.PathLike) -> SlideResult:
    """The slide result stored in an attention file."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            a = dict(h5.attrs)
            return SlideResult(str(a["slide_id"]), str(a["patient_id"]), int(a["fold"]), float(a["risk"]),
                               h5["embedding"][:], h5["attention"][:], h5["coords"][:], json.loads(a.get("grades", "{}")))
    except (OSError, KeyError) as exc:
        raise StoreError(f"{path}: not a pathomics attention file ({exc}); re-run `pathomics mil predict`") from exc


def write_signatures(path: Path, results: Sequence[SlideResult], model: str,
                     provenance: Mapping[str, Any]) -> pd.DataFrame:
    """``signatures.parquet``: one row per slide (slide_id, patient_id, risk, sig_0..sig_{K-1}, model, fold, and
    ``grade_prob_<grade>`` columns from a grade head)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings = np.stack([r.embedding for r in results]).astype(np.float32)
    table = pd.concat([
        pd.DataFrame({"slide_id": [r.slide_id for r in results], "patient_id": [r.patient_id for r in results],
                      "risk": np.array([r.risk for r in results], dtype=np.float64)}),
        pd.DataFrame(embeddings, columns=[f"sig_{i}" for i in range(embeddings.shape[1])]),
        pd.DataFrame({"model": model, "fold": np.array([r.fold for r in results], dtype=np.int64)}),
        pd.DataFrame([{f"grade_prob_{g}": p for g, p in r.grades.items()} for r in results]),
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
    source = OutputLayout(source).signatures if source.is_dir() else source
    if not source.is_file():
        raise StoreError(f"{source}: no signatures; run `pathomics mil train` or `predict` first")
    table = pd.read_parquet(source)
    if per_patient:
        numeric = ["risk"] + [c for c in table.columns if c.startswith(("sig_", "grade_prob_"))]
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
