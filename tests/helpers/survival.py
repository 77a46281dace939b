"""Helpers of the survival tests: the GBSG2 cohort as a clinical CSV, synthetic planted cohorts, CLI runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from sksurv.datasets import load_gbsg2

from pathomics.cli.main import main
from pathomics.synthetic.cohort import PlantedTruth, simulate_cohort_tables

GBSG2_COVARIATES = ("horTh", "age", "menostat", "tsize", "tgrade", "pnodes", "progrec", "estrec")
GBSG2_CATEGORICAL = ("horTh", "menostat", "tgrade")
YEARS = tuple(365.25 * k for k in range(1, 6))
SYNTHETIC_COVARIATES = ("age", "stage", "tumour_size")


def gbsg2_frame() -> pd.DataFrame:
    """GBSG2 (686 patients, recurrence-free survival in days) as a clinical table with string categories."""
    covariates, outcome = load_gbsg2()
    frame = covariates.astype({c: str for c in GBSG2_CATEGORICAL})
    frame.insert(0, "patient_id", [f"G{i:03d}" for i in range(len(frame))])
    return frame.assign(time=outcome["time"], event=outcome["cens"].astype(int))


def write_synthetic(directory: Path, n_patients: int, seed: int) -> tuple[Path, Path, Path, PlantedTruth]:
    """Write ``clinical.csv``, ``radiology.csv`` and ``signatures.parquet`` of a planted synthetic cohort."""
    clinical, radiology, signatures, truth = simulate_cohort_tables(n_patients, seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "clinical.csv", directory / "radiology.csv", directory / "signatures.parquet"
    clinical.to_csv(paths[0], index=False)
    radiology.to_csv(paths[1], index=False)
    signatures.to_parquet(paths[2])
    return *paths, truth


def fit_argv(clinical: Path, out: Path, covariates: tuple[str, ...], *extra: str) -> list[str]:
    return ["survival", "fit", "--clinical", str(clinical), "--covariates", ",".join(covariates), "--out", str(out), *extra]


def run_ok(argv: list[str]) -> None:
    """Run the CLI and fail the test unless it exits 0."""
    code = main(argv)
    if code != 0:
        pytest.fail(f"pathomics {' '.join(argv)} exited {code}")
