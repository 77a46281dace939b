"""Synthetic MIL cohorts for the tests: real feature files with planted witness patches and known labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pathomics.layout import OutputLayout
from pathomics.store import write_feature_file

PATCH = 256
FEATURE_ATTRS = {"model": "synthetic", "weights": "random", "weights_sha256": "", "precision": "fp32",
                 "pathomics_version": "test"}
COORDS_ATTRS = {"patch_size": PATCH, "patch_size_level0": PATCH, "target_mpp": 0.5}


def grid_coords(n: int, columns: int = 16) -> np.ndarray:
    """Unique level-0 coordinates of ``n`` patches on a grid ``columns`` wide."""
    i = np.arange(n)
    return np.stack([i % columns, i // columns], axis=1).astype(np.int64) * PATCH


def write_bag(out: Path, slide_id: str, features: np.ndarray, coords: np.ndarray | None = None) -> Path:
    """Write ``<out>/features/<slide_id>.h5`` with the DESIGN attributes."""
    coords = grid_coords(len(features)) if coords is None else coords
    attrs = {**FEATURE_ATTRS, "slide_id": slide_id, "embedding_dim": features.shape[1]}
    return write_feature_file(OutputLayout(out).feature_file(slide_id), features, coords, attrs, COORDS_ATTRS)


@dataclass(frozen=True)
class SyntheticCohort:
    """Feature files under ``out/features``, a labels table, and which patches of each slide are witnesses."""

    out: Path
    labels: Path
    witnesses: dict[str, np.ndarray]
    table: pd.DataFrame

    @property
    def features(self) -> Path:
        return self.out / "features"


def witness_bag(rng: np.random.Generator, n: int, n_witness: int, dim: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian patches; ``n_witness`` of them moved by ``shift`` along the first axis. Returns (features, mask)."""
    features = rng.standard_normal((n, dim)).astype(np.float32)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, n_witness, replace=False)] = True
    features[mask, 0] += shift
    return features, mask


def witness_cohort(out: Path, task: str = "classification", n_slides: int = 80, dim: int = 16,
                   patches: tuple[int, int] = (80, 160), max_rate: float = 0.05, shift: float = 4.0,
                   slides_per_patient: int = 1, seed: int = 0) -> SyntheticCohort:
    """A cohort whose signal is the witness patches, at most ``max_rate`` of each bag.

    Classification: half the patients are positive, with 1 to ``max_rate``·N witnesses per slide; negative
    slides have none. Survival: each patient's witness density is uniform on [0, max_rate] and sets the
    hazard exp(8 · density / max_rate); about a third of the patients are censored. (The true densities
    rank these patients with a C-index of about 0.87.)
    """
    rng = np.random.default_rng(seed)
    n_patients = n_slides // slides_per_patient
    rows, witnesses = [], {}
    for p in range(n_patients):
        density = rng.uniform(0, max_rate) if task == "survival" else (max_rate * rng.uniform(0.2, 1) if p % 2 else 0.0)
        time, censor = rng.exponential(np.exp(-8 * density / max_rate)), rng.exponential(4 * np.exp(-4))
        for s in range(slides_per_patient):
            slide_id = f"s{p:03d}_{s}"
            n = int(rng.integers(*patches))
            n_witness = max(1, int(round(density * n))) if density > 0 else 0
            features, mask = witness_bag(rng, n, n_witness, dim, shift)
            write_bag(out, slide_id, features)
            witnesses[slide_id] = mask
            row = {"slide_id": slide_id, "patient_id": f"p{p:03d}"}
            row.update({"label": "pos" if p % 2 else "neg"} if task == "classification"
                       else {"time": round(min(time, censor), 4), "event": int(time <= censor)})
            rows.append(row)
    table = pd.DataFrame(rows)
    labels = out / "labels.csv"
    table.to_csv(labels, index=False)
    return SyntheticCohort(out, labels, witnesses, table)
