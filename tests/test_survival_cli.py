"""``pathomics survival`` on bad and incomplete tables: one clear line naming the column or row, exit 2,
and every dropped row counted."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.survival import SYNTHETIC_COVARIATES, fit_argv, run_ok

from pathomics.cli.main import main
from pathomics.errors import CohortError
from pathomics.survival import SurvivalConfig, load_cohort
from pathomics.synthetic.cohort import simulate_cohort_tables

Tables = dict[str, pd.DataFrame]


def _tables(n: int = 80) -> Tables:
    clinical, radiology, signatures, _ = simulate_cohort_tables(n, seed=5)
    return {"clinical": clinical, "radiology": radiology, "signatures": signatures}


def _write(tables: Tables, directory: Path) -> dict[str, Path]:
    paths = {
        "clinical": directory / "clinical.csv",
        "radiology": directory / "radiology.csv",
        "signatures": directory / "signatures.parquet",
    }
    tables["clinical"].to_csv(paths["clinical"], index=False)
    tables["radiology"].to_csv(paths["radiology"], index=False)
    tables["signatures"].to_parquet(paths["signatures"])
    return paths


def _table_options(paths: dict[str, Path], *extra: str) -> list[str]:
    """``--radiology`` and ``--signatures`` naming the written tables, then ``extra``."""
    return ["--radiology", str(paths["radiology"]), "--signatures", str(paths["signatures"]), *extra]


def _evaluate_error(model: Path, clinical: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of a `survival evaluate` that must exit 2."""
    assert main(["survival", "evaluate", "--model-dir", str(model), "--clinical", str(clinical), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _set(table: str, row: int, column: str, value: object) -> Callable[[Tables], None]:
    def mutate(tables: Tables) -> None:
        frame = tables[table].astype({column: object})
        frame.loc[row, column] = value
        tables[table] = frame

    return mutate


def _replace(table: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Tables], None]:
    def mutate(tables: Tables) -> None:
        tables[table] = change(tables[table])

    return mutate


BAD_INPUTS = {
    "missing column": (_replace("clinical", lambda f: f.drop(columns="event")), ["clinical.csv", "missing column", "'event'"]),
    "non-numeric time": (_set("clinical", 2, "time", "soon"), ["clinical.csv row 3", "'P0002'", "'time'", "'soon'"]),
    "negative time": (_set("clinical", 4, "time", -5), ["clinical.csv row 5", "'time'", "positive"]),
    "zero time": (_set("clinical", 0, "time", 0), ["clinical.csv row 1", "'time' is 0", "positive"]),
    "event not 0/1": (_set("clinical", 6, "event", 2), ["clinical.csv row 7", "'event' is 2", "1 (recurrence) or 0"]),
    "duplicate patient": (
        _set("clinical", 9, "patient_id", "P0003"),
        ["clinical.csv", "duplicate patient_id 'P0003'", "rows 4, 10"],
    ),
    "patient without slides": (
        _replace("signatures", lambda f: f[f["patient_id"] != "P0005"]),
        ["no slide", "'P0005'", "--missing"],
    ),
    "no events": (_replace("clinical", lambda f: f.assign(event=0)), ["clinical.csv", "no events", "'event'"]),
    "missing covariate value": (_set("clinical", 2, "age", np.nan), ["covariate(s) 'age'", "'P0002'"]),
    "radiology column missing": (
        _replace("radiology", lambda f: f.rename(columns={"radiology_score": "score"})),
        ["radiology.csv", "'radiology_score'"],
    ),
    "non-numeric radiology": (_set("radiology", 1, "radiology_score", "n/a?"), ["radiology.csv row 2", "'radiology_score'"]),
    "patient without radiology": (_replace("radiology", lambda f: f.iloc[3:]), ["no radiology score", "'P0000'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mutate, expected = BAD_INPUTS[case]
    tables = _tables()
    mutate(tables)
    paths = _write(tables, tmp_path)
    with pytest.raises(CohortError) as raised:
        load_cohort(SurvivalConfig(covariates=SYNTHETIC_COVARIATES), paths["clinical"], paths["radiology"], paths["signatures"])
    for text in expected:
        assert text in str(raised.value), (text, str(raised.value))
    argv = fit_argv(paths["clinical"], tmp_path / "out", SYNTHETIC_COVARIATES, *_table_options(paths))
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"pathomics survival: error: {raised.value}", captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--folds", "1"], "folds (1)"),
        (["--times", "99999"], "evaluation time 99999 is not before the last follow-up"),
        (["--penalizer", "-1"], "penalizer values must be finite and >= 0"),
        (["--categorical", "centre"], "categorical columns ['centre'] are not among the covariates"),
    ],
)
def test_bad_settings_exit_2(extra: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write(_tables(), tmp_path)
    assert main(fit_argv(paths["clinical"], tmp_path / "out", SYNTHETIC_COVARIATES, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_dropped_and_unmatched_rows_are_counted(tmp_path: Path) -> None:
    tables = _tables()
    tables["radiology"] = tables["radiology"].iloc[2:]  # P0000, P0001 lack a radiology score
    signatures = tables["signatures"]
    stray = signatures.iloc[:2].assign(patient_id="X999")  # two slides of a patient not in clinical.csv
    tables["signatures"] = pd.concat([signatures[~signatures["patient_id"].isin(["P0001", "P0010", "P0011"])], stray])
    paths = _write(tables, tmp_path)
    run_ok(fit_argv(paths["clinical"], tmp_path / "out", SYNTHETIC_COVARIATES,
                    *_table_options(paths, "--missing", "drop", "--bootstrap", "0")))
    document = json.loads((tmp_path / "out" / "survival" / "metrics.json").read_text())
    cohort = document["cohort"]
    assert cohort["dropped"] == {"no radiology score": 2, "no slide": 2} and cohort["dropped_total"] == 4
    assert cohort["unmatched"] == {"signature rows (slides) without a clinical record": 2}
    assert cohort["clinical_rows"] == 80 and cohort["n"] == 76
    assert all(model["n"] == 76 for model in document["models"].values())
    report = (tmp_path / "out" / "survival" / "report.html").read_text()
    for row in (
        "<td>dropped: no radiology score</td><td>2</td>",
        "<td>dropped: no slide</td><td>2</td>",
        "<td>dropped in total</td><td>4</td>",
    ):
        assert row in report


def test_impute_keeps_patients_with_an_indicator(tmp_path: Path) -> None:
    tables = _tables()
    tables["radiology"] = tables["radiology"].iloc[::3]  # two in three patients lack a score, one in four all slides
    tables["signatures"] = tables["signatures"][tables["signatures"]["patient_id"].str[-4:].astype(int) % 4 != 1]
    paths = _write(tables, tmp_path)
    run_ok(fit_argv(paths["clinical"], tmp_path / "out", SYNTHETIC_COVARIATES,
                    *_table_options(paths, "--missing", "impute", "--fusion", "features", "--bootstrap", "0")))
    coefficients = pd.read_csv(tmp_path / "out" / "survival" / "coefficients.csv")
    by_model = coefficients.groupby("model")["covariate"].apply(set)
    assert "radiology_score[missing]" in by_model["radiology"] and "sig[missing]" in by_model["pathology"]
    assert {"radiology_score[missing]", "sig[missing]"} <= by_model["combined"]
    assert json.loads((tmp_path / "out" / "survival" / "metrics.json").read_text())["cohort"]["n"] == 80


def test_evaluate_refuses_a_folder_without_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write(_tables(), tmp_path)
    assert "no saved survival model" in _evaluate_error(tmp_path, paths["clinical"], tmp_path / "ext", capsys)


def test_evaluate_needs_the_modalities_of_the_saved_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write(_tables(), tmp_path)
    run_ok(
        fit_argv(
            paths["clinical"], tmp_path / "fit", SYNTHETIC_COVARIATES, "--radiology", str(paths["radiology"]), "--bootstrap", "0"
        )
    )
    capsys.readouterr()
    assert "uses radiology data" in _evaluate_error(tmp_path / "fit", paths["clinical"], tmp_path / "ext", capsys)


def test_evaluate_refuses_a_damaged_or_changed_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated model.pkl was an UnpicklingError traceback; its SHA-256 recorded at fit time is now checked."""
    paths = _write(_tables(), tmp_path)
    run_ok(fit_argv(paths["clinical"], tmp_path / "fit", SYNTHETIC_COVARIATES, "--bootstrap", "0"))
    model = tmp_path / "fit" / "survival" / "model.pkl"
    intact = model.read_bytes()
    model.write_bytes(intact[: len(intact) // 2])
    capsys.readouterr()
    error = _evaluate_error(tmp_path / "fit", paths["clinical"], tmp_path / "ext", capsys)
    assert str(model) in error and "damaged" in error and "re-run 'pathomics survival fit'" in error
    provenance = tmp_path / "fit" / "survival" / "model.json"
    document = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**document, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}))
    error = _evaluate_error(tmp_path / "fit", paths["clinical"], tmp_path / "ext", capsys)  # the checksum agrees, unpickling fails
    assert str(model) in error and "cannot be read (" in error and "re-run 'pathomics survival fit'" in error
