"""Longitudinal markers (S1): counting-process intervals, the time-varying Cox model against lifelines, planted
witnesses for both models, landmarking without leaks, table validation and the CLI verb."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxTimeVaryingFitter
from lifelines.utils import add_covariate_to_timeline, to_long_format

from pathomics.cli.main import main
from pathomics.survival.longitudinal import (
    LongitudinalConfig,
    counting_process,
    cross_validate_landmark,
    fit_time_varying,
    hazard_ratios,
    landmark_set,
    load_longitudinal,
    longitudinal_fit,
)
from pathomics.synthetic.longitudinal import simulate_longitudinal

LANDMARK = 365.0
FAST = {"n_bootstrap": 0, "folds": 3, "epochs": 20}


def _intervals(clinical: pd.DataFrame, markers: pd.DataFrame, signatures: pd.DataFrame | None = None) -> pd.DataFrame:
    data = load_longitudinal(LongitudinalConfig(landmark=LANDMARK), clinical, markers, signatures)
    return counting_process(data)


def test_counting_process_intervals_by_hand() -> None:
    """Each value holds until the next visit or the end of follow-up; the event sits on the last interval only;
    a first visit after 0 is delayed entry; a visit at the end of follow-up adds no interval."""
    clinical = pd.DataFrame({"patient_id": ["A", "B"], "time": [10.0, 5.0], "event": [1, 0]})
    markers = pd.DataFrame(
        {"patient_id": ["A", "B", "A", "A"], "time": [3.0, 2.0, 0.0, 10.0], "egfr": [60.0, 80.0, 70.0, 50.0]}
    )
    expected = pd.DataFrame(
        {
            "patient_id": ["A", "A", "B"],
            "start": [0.0, 3.0, 2.0],
            "stop": [3.0, 10.0, 5.0],
            "event": [0, 1, 0],
            "egfr": [70.0, 60.0, 80.0],
        }
    )
    pd.testing.assert_frame_equal(_intervals(clinical, markers), expected, check_dtype=False)


def test_time_varying_fit_equals_lifelines_on_its_own_intervals() -> None:
    """Our intervals and fit equal lifelines' add_covariate_to_timeline + CoxTimeVaryingFitter to 1e-8."""
    clinical, markers, signatures, _ = simulate_longitudinal(150, seed=3, value_effect=-0.7, pathology_effect=0.8)
    ours = _intervals(clinical, markers, signatures)
    timeline = to_long_format(clinical.rename(columns={"time": "follow_up"}), duration_col="follow_up")
    theirs = add_covariate_to_timeline(timeline, markers, id_col="patient_id", duration_col="time", event_col="event")
    theirs = theirs.merge(signatures[["patient_id", "risk"]], on="patient_id").astype({"event": int})
    columns = ["patient_id", "start", "stop", "event", "egfr", "haemoglobin", "risk"]
    key = ["patient_id", "start"]
    pd.testing.assert_frame_equal(
        ours[columns].sort_values(key).reset_index(drop=True),
        theirs[columns].sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )
    covariates = ("egfr", "haemoglobin", "risk")
    reference = CoxTimeVaryingFitter().fit(theirs[columns], id_col="patient_id", event_col="event").summary
    table = hazard_ratios(fit_time_varying(ours, covariates, 0.0, 0.05)).set_index("covariate").loc[list(covariates)]
    np.testing.assert_allclose(table["coef"], reference["coef"], rtol=1e-8)
    np.testing.assert_allclose(
        table[["hr_low", "hr_high"]], reference[["exp(coef) lower 95%", "exp(coef) upper 95%"]], rtol=1e-8
    )


def test_time_varying_model_recovers_the_planted_marker_effect() -> None:
    """Planted log-HR -0.7 per SD of the last recorded eGFR (-0.0467 per unit) lies in the 95% CI; the
    haemoglobin marker, planted at 0, has an HR interval covering 1."""
    clinical, markers, _, truth = simulate_longitudinal(400, seed=0, value_effect=-0.7)
    table = hazard_ratios(fit_time_varying(_intervals(clinical, markers), ("egfr", "haemoglobin"), 0.0, 0.05))
    egfr, haemoglobin = (table.set_index("covariate").loc[name] for name in ("egfr", "haemoglobin"))
    assert np.log(egfr["hr_low"]) < truth.egfr_per_unit < np.log(egfr["hr_high"]), (egfr, truth.egfr_per_unit)
    assert egfr["hr_high"] < 1.0 and egfr["p"] < 1e-6
    assert haemoglobin["hr_low"] < 1.0 < haemoglobin["hr_high"]


def test_sequence_encoder_beats_baseline_markers_when_the_signal_is_the_slope() -> None:
    """Hazard set by the eGFR decline alone (1 log-HR per SD of slope): on held-out patients the GRU over the
    first year's visits ranks far better than a Cox model on the baseline measurements, which know nothing of it."""
    clinical, markers, _, _ = simulate_longitudinal(400, seed=0, slope_effect=1.0)
    config = LongitudinalConfig(landmark=LANDMARK, n_bootstrap=0)
    data = load_longitudinal(config, clinical, markers)
    _, metrics = cross_validate_landmark(landmark_set(data, LANDMARK), data.marker_names, (), config)
    c = {name: model["c_index_harrell"]["estimate"] for name, model in metrics["models"].items()}
    assert c["sequence"] > 0.62 and c["sequence"] > c["baseline"] + 0.1, c
    assert abs(c["baseline"] - 0.5) < 0.1 and c["sequence"] > c["last_value"], c


def _landmark_predictions(clinical: pd.DataFrame, markers: pd.DataFrame, signatures: pd.DataFrame) -> pd.DataFrame:
    config = LongitudinalConfig(landmark=LANDMARK, **FAST)
    data = load_longitudinal(config, clinical, markers, signatures)
    return cross_validate_landmark(landmark_set(data, LANDMARK), data.marker_names, data.signature_columns, config)[0]


@pytest.fixture(scope="module")
def leak_cohort() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A cohort with one event and one censoring exactly at the landmark, and its landmark predictions."""
    clinical, markers, signatures, _ = simulate_longitudinal(150, seed=5, slope_effect=1.0, pathology_effect=0.8)
    late = clinical.index[clinical["time"] > LANDMARK + 100][:2]
    clinical.loc[late, "time"] = LANDMARK
    clinical.loc[late, "event"] = [1, 0]
    markers = markers[~(markers["patient_id"].isin(clinical.loc[late, "patient_id"]) & (markers["time"] > LANDMARK))]
    return clinical, markers, signatures, _landmark_predictions(clinical, markers, signatures)


def test_landmark_predictions_are_blind_to_everything_after_the_landmark(leak_cohort) -> None:
    """Every marker value after the landmark changed (and a visit added): landmark predictions, baseline risks
    and embeddings are bit-identical, though the time-varying model sees the change; the global RNG is untouched."""
    clinical, markers, signatures, before = leak_cohort
    after = markers["time"] > LANDMARK
    assert after.sum() > 500
    changed = markers.copy()
    changed.loc[after, "egfr"] = 500.0 - changed.loc[after, "egfr"] * 3
    changed.loc[after, "haemoglobin"] = np.random.default_rng(0).normal(0, 50, int(after.sum()))
    extra = clinical[clinical["time"] > LANDMARK + 2].iloc[0]
    changed = pd.concat(
        [
            changed,
            pd.DataFrame(
                {"patient_id": [extra["patient_id"]], "time": [LANDMARK + 1], "egfr": [1.0], "haemoglobin": [1.0]}
            ),
        ]
    )
    state = torch.random.get_rng_state()
    again = _landmark_predictions(clinical, changed, signatures)
    assert torch.equal(state, torch.random.get_rng_state())
    pd.testing.assert_frame_equal(before, again, check_exact=True)
    assert not _intervals(clinical, changed).equals(_intervals(clinical, markers))


def test_landmark_predictions_do_see_what_came_before(leak_cohort) -> None:
    """The counter-test: one value at or before the landmark changed moves that patient's prediction."""
    clinical, markers, signatures, before = leak_cohort
    patient = before["patient_id"].iloc[0]
    changed = markers.copy()
    row = changed.index[(changed["patient_id"] == patient) & (changed["time"] <= LANDMARK)][-1]
    changed.loc[row, "egfr"] -= 30.0
    again = _landmark_predictions(clinical, changed, signatures).set_index("patient_id")
    assert again.loc[patient, "risk"] != before.set_index("patient_id").loc[patient, "risk"]


def test_landmark_excludes_patients_with_event_or_censoring_by_then(leak_cohort) -> None:
    """Predicted: exactly the patients followed beyond the landmark (the event and the censoring at it are out)."""
    clinical, _, _, predictions = leak_cohort
    expected = set(clinical.loc[clinical["time"] > LANDMARK, "patient_id"])
    assert set(predictions["patient_id"]) == expected
    assert (predictions["time_from_landmark"] > 0).all()
    assert not (set(clinical.loc[clinical["time"] == LANDMARK, "patient_id"]) & set(predictions["patient_id"]))


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("s1")
    clinical, markers, signatures, _ = simulate_longitudinal(
        150, seed=2, value_effect=-0.5, slope_effect=1.0, pathology_effect=0.8
    )
    paths = directory / "clinical.csv", directory / "markers.csv", directory / "signatures.parquet"
    clinical.to_csv(paths[0], index=False)
    markers.to_csv(paths[1], index=False)
    signatures.to_parquet(paths[2])
    return paths


def _argv(clinical: Path, markers: Path, out: Path, *extra: str) -> list[str]:
    return [
        "survival",
        "longitudinal",
        "--clinical",
        str(clinical),
        "--markers",
        str(markers),
        "--out",
        str(out),
        "--landmark",
        f"{LANDMARK:g}",
        "--folds",
        "3",
        "--epochs",
        "20",
        "--bootstrap",
        "10",
        *extra,
    ]


def test_cli_writes_the_outputs(tables, tmp_path: Path) -> None:
    clinical, markers, signatures = tables
    assert main(_argv(clinical, markers, tmp_path, "--signatures", str(signatures))) == 0
    folder = tmp_path / "survival" / "longitudinal"
    assert sorted(p.name for p in folder.iterdir()) == [
        "coefficients.csv",
        "intervals.csv",
        "metrics.json",
        "predictions.csv",
    ]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["landmark"] == LANDMARK and metrics["cohort"]["signature_columns"] == ["risk"]
    coefficients = pd.read_csv(folder / "coefficients.csv")
    assert list(coefficients.columns) == ["model", "covariate", "coef", "hr", "hr_low", "hr_high", "p"]
    assert list(coefficients["covariate"]) == ["egfr", "haemoglobin", "risk"]
    assert [c["covariate"] for c in metrics["time_varying"]["coefficients"]] == ["egfr", "haemoglobin", "risk"]
    predictions = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str})
    landmark = metrics["landmark"]
    assert (
        len(predictions) == landmark["at_risk"]
        and landmark["at_risk"] + landmark["excluded_event_or_censored_before"] == 150
    )
    assert predictions["fold"].nunique() == 3 and [f"emb_{k}" for k in range(8)] == list(predictions.columns[-8:])
    assert list(landmark["models"]) == ["sequence", "baseline", "last_value"]
    for name in ("baseline", "last_value"):
        gain = landmark["sequence_gain"][name]
        difference = (
            landmark["models"]["sequence"]["c_index_harrell"]["estimate"]
            - landmark["models"][name]["c_index_harrell"]["estimate"]
        )
        assert (
            gain["estimate"] == pytest.approx(difference, abs=1e-12)
            and gain["ci_low"] <= gain["estimate"] <= gain["ci_high"]
        )
    assert {"risk", "baseline_risk", "last_value_risk"} <= set(predictions.columns)
    for model in ("sequence", "baseline", "last_value"):
        c = landmark["models"][model]["c_index_harrell"]
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"] and len(landmark["models"][model]["folds"]) == 3
    assert len(pd.read_csv(folder / "intervals.csv")) == metrics["time_varying"]["intervals"]


def test_cli_fuses_the_signature_embedding(tables, tmp_path: Path) -> None:
    clinical, markers, signatures = tables
    assert main(_argv(clinical, markers, tmp_path, "--signatures", str(signatures), "--signature", "embedding")) == 0
    coefficients = pd.read_csv(tmp_path / "survival" / "longitudinal" / "coefficients.csv")
    assert list(coefficients["covariate"]) == ["egfr", "haemoglobin", *(f"sig_{k}" for k in range(8))]


def _broken(markers: pd.DataFrame, clinical: pd.DataFrame, how: str) -> pd.DataFrame:
    if how == "missing column":
        return markers.drop(columns="egfr")
    if how == "nan":
        return markers.assign(egfr=markers["egfr"].where(markers.index != 7))
    if how == "after follow-up":
        first = clinical.iloc[0]
        return pd.concat(
            [
                markers,
                pd.DataFrame(
                    {
                        "patient_id": [first["patient_id"]],
                        "time": [first["time"] + 5],
                        "egfr": [60.0],
                        "haemoglobin": [13.0],
                    }
                ),
            ]
        )
    if how == "unknown patient":
        return pd.concat(
            [markers, pd.DataFrame({"patient_id": ["X999"], "time": [0.0], "egfr": [60.0], "haemoglobin": [13.0]})]
        )
    if how == "unmeasured patient":
        return markers[markers["patient_id"] != clinical["patient_id"].iloc[3]]
    if how == "negative time":
        return markers.assign(time=markers["time"].where(markers.index != 2, -4.0))
    if how == "repeated visit":
        return pd.concat([markers, markers.iloc[[4]]])
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing column", "markers.csv: missing column(s) 'egfr'"),
        ("nan", "markers.csv row 8 (patient_id 'N0001'): column 'egfr' holds nan, not a finite number"),
        ("after follow-up", "after the patient's follow-up ends"),
        ("unknown patient", "markers.csv: 1 row(s) of patient(s) not in clinical.csv ('X999')"),
        ("unmeasured patient", "1 patient(s) of clinical.csv have no rows in markers.csv ('N0003')"),
        ("negative time", "markers.csv row 3 (patient_id 'N0001'): measured at -4, before time 0"),
        ("repeated visit", "a second row at time"),
    ],
)
def test_bad_marker_tables_fail_with_one_line_naming_the_file(
    tables, tmp_path: Path, capsys, how: str, message: str
) -> None:
    clinical, markers, _ = tables
    frame = _broken(pd.read_csv(markers), pd.read_csv(clinical), how)
    frame.to_csv(tmp_path / "markers.csv", index=False)
    assert main(_argv(clinical, tmp_path / "markers.csv", tmp_path / "out", "--marker-cols", "egfr,haemoglobin")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("pathomics survival: error: ") and "\n" not in error, error
    assert message in error, error
    assert not (tmp_path / "out").exists()


def test_longitudinal_fit_library_matches_the_cli_outputs(tables, tmp_path: Path) -> None:
    """The library call with ``out`` writes what it returns (no temporary files left behind)."""
    clinical, markers, signatures = tables
    result = longitudinal_fit(
        LongitudinalConfig(landmark=LANDMARK, **FAST), clinical, markers, signatures, out=tmp_path
    )
    folder = tmp_path / "survival" / "longitudinal"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    written = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str})
    pd.testing.assert_frame_equal(written, result.predictions, check_dtype=False, rtol=1e-12)


def test_landmark_set_by_hand() -> None:
    """Landmark 5: A (followed to 10) keeps its visits at 0 and 3, not 8, and its time from the landmark is 5;
    B, censored at the landmark, is out; C, first measured at 7, has no history and is out (counted)."""
    clinical = pd.DataFrame({"patient_id": ["A", "B", "C"], "time": [10.0, 5.0, 12.0], "event": [1, 0, 1]})
    markers = pd.DataFrame(
        {
            "patient_id": ["A", "A", "A", "B", "C"],
            "time": [0.0, 3.0, 8.0, 1.0, 7.0],
            "egfr": [70.0, 60.0, 10.0, 80.0, 50.0],
        }
    )
    data = load_longitudinal(LongitudinalConfig(landmark=5.0), clinical, markers)
    landmark = landmark_set(data, 5.0)
    assert list(landmark.patients.index) == ["A"] and landmark.patients.loc["A", "time"] == 5.0
    np.testing.assert_array_equal(landmark.histories[0], [[0.0, 70.0], [3.0, 60.0]])
    assert landmark.snapshots["baseline"].loc["A", "egfr"] == 70.0
    assert landmark.snapshots["last_value"].loc["A", "egfr"] == 60.0
    assert (landmark.excluded_before, landmark.excluded_no_history) == (1, 1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"landmark": 0.0}, "the landmark time must be positive"),
        ({"landmark": 1.0, "folds": 1}, "folds (1) and inner folds (3) must each be at least 2"),
        ({"landmark": 1.0, "hidden": 0}, "need hidden >= 1"),
        ({"landmark": 1.0, "signature": "pcs"}, "signature must be one of risk, embedding"),
    ],
)
def test_config_refuses_bad_values(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LongitudinalConfig(**options)


def test_cli_refuses_a_bad_landmark_in_one_line(tables, tmp_path: Path, capsys) -> None:
    clinical, markers, _ = tables
    assert main(_argv(clinical, markers, tmp_path / "out", "--landmark", "0")) == 2  # the last --landmark wins
    error = capsys.readouterr().err.strip()
    assert error == "pathomics survival: error: the landmark time must be positive, got 0.0", error


def test_a_marker_constant_at_the_landmark_is_left_out_of_that_snapshot_and_the_time_varying_model_still_fits(tmp_path) -> None:
    """Stanford heart transplants: ``transplant`` is 0 for everyone at the first visit, so the baseline snapshot
    model cannot use it; it is dropped there (and named in the metrics) while the time-varying Cox keeps it."""
    from lifelines.datasets import load_stanford_heart_transplants

    visits = load_stanford_heart_transplants().rename(columns={"id": "patient_id"})
    last = visits.groupby("patient_id").last()
    clinical = pd.DataFrame({"patient_id": last.index, "time": last["stop"].to_numpy(), "event": last["event"].to_numpy()})
    markers = visits[["patient_id", "start", "transplant", "surgery"]].rename(columns={"start": "time"})
    assert (markers.groupby("patient_id")["transplant"].first() == 0).all()
    config = LongitudinalConfig(landmark=20.0, **FAST)
    result = longitudinal_fit(config, clinical, markers, out=tmp_path)
    landmark = result.metrics["landmark"]
    assert landmark["constant_markers"] == {"baseline": ["transplant"]}
    assert set(result.coefficients["covariate"]) >= {"transplant", "surgery"}
    assert np.isfinite(result.predictions["baseline_risk"]).all()
