"""Clinical-translation outputs (calibration slope/intercept, decision curves, nomogram) against reference
libraries on GBSG2; fusion over the modalities each patient has; the planted-truth oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.survival import GBSG2_COVARIATES, SYNTHETIC_COVARIATES, fit_argv, gbsg2_frame, run_ok
from lifelines import CoxPHFitter, KaplanMeierFitter

from pathomics.survival import (
    CoxModel,
    DecisionFusion,
    Design,
    SurvivalConfig,
    evaluate_external,
    load_cohort,
    load_study,
    survival_fit,
)
from pathomics.survival.calibration import calibration_intercept, calibration_slope
from pathomics.survival.nomogram import Nomogram
from pathomics.synthetic.oracle import oracle_section, oracle_table, read_planted
from pathomics.synthetic.cohort import simulate_cohort_tables

TIMES = (365.25, 730.5, 1095.75)
THRESHOLDS = np.round(np.arange(0.05, 0.6001, 0.05), 10)


@pytest.fixture(scope="module")
def gbsg2_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """GBSG2 split 450 / 236 at random; fitted on the first part and evaluated on the rest through the CLI."""
    directory = tmp_path_factory.mktemp("gbsg2_split")
    frame = gbsg2_frame()
    order = np.random.default_rng(0).permutation(len(frame))
    train, external = frame.iloc[order[:450]], frame.iloc[order[450:]]
    train.to_csv(directory / "train.csv", index=False)
    external.to_csv(directory / "external.csv", index=False)
    times = ",".join(f"{t:g}" for t in TIMES)
    run_ok(fit_argv(directory / "train.csv", directory / "fit", GBSG2_COVARIATES, "--times", times, "--bootstrap", "0",
                    "--thresholds", "0.05,0.6,0.05", "--folds", "2"))
    run_ok(["survival", "evaluate", "--model-dir", str(directory / "fit"), "--clinical", str(directory / "external.csv"),
            "--out", str(directory / "ext")])
    return {"train": train, "external": external, "fit": directory / "fit" / "survival", "ext": directory / "ext" / "survival"}


def _design(frame: pd.DataFrame) -> pd.DataFrame:
    categorical = ["horTh", "menostat", "tgrade"]
    return pd.get_dummies(frame.drop(columns="patient_id"), columns=categorical, drop_first=True, dtype=float)


def _metrics(directory: Path) -> dict:
    return json.loads((directory / "metrics.json").read_text())["models"]["clinical"]


def test_calibration_slope_and_intercept_equal_a_direct_refit(gbsg2_split) -> None:
    """Slope = lifelines' Cox refit of the linear predictor (from lifelines' own fit on the training split) on the
    external split; intercept = log(observed / expected) with lifelines' cumulative hazard at each follow-up."""
    train, external = _design(gbsg2_split["train"]), _design(gbsg2_split["external"])
    reference = CoxPHFitter().fit(train, "time", "event", fit_options={"precision": 1e-10})
    lp = reference.predict_log_partial_hazard(external).to_numpy()
    refit = CoxPHFitter().fit(pd.DataFrame({"lp": lp, "time": external["time"], "event": external["event"]}), "time", "event")
    hazard = np.diagonal(reference.predict_cumulative_hazard(external, times=external["time"].to_numpy()).to_numpy())
    ours = _metrics(gbsg2_split["ext"])
    assert ours["calibration_slope"] == pytest.approx(refit.params_["lp"], abs=1e-4)
    assert ours["calibration_intercept"] == pytest.approx(np.log(external["event"].sum() / hazard.sum()), abs=1e-4)
    assert 0.5 < ours["calibration_slope"] < 1.5
    # In-sample, an unpenalised Cox model is calibrated by construction: slope 1, and the Breslow baseline
    # makes expected equal observed events.
    assert ours["train"]["calibration_slope"] == pytest.approx(1.0, abs=1e-5)
    assert ours["train"]["calibration_intercept"] == pytest.approx(0.0, abs=1e-9)
    # No slope without spread, nor from a score that separates the events (the refit diverges); no warning either.
    times = np.arange(1.0, 11.0)
    assert np.isnan(calibration_slope(np.ones(10), times, np.ones(10))) and np.isnan(calibration_slope(-times, times, np.ones(10)))
    assert np.isnan(calibration_intercept(np.full(10, np.inf), np.ones(10))) and np.isnan(calibration_intercept(np.ones(10), np.zeros(10)))


def test_decision_curve_follows_kaplan_meier(gbsg2_split) -> None:
    """Treat-all = (1 - KM(t)) - KM(t) p / (1 - p) with lifelines' KM; the model's net benefit is the same formula
    on the Kaplan-Meier of the patients it would treat, its predicted probabilities read from predictions.csv."""
    external, ext = gbsg2_split["external"], gbsg2_split["ext"]
    curves = _metrics(ext)["decision_curve"]
    assert list(curves) == [f"{t:.10g}" for t in TIMES]
    predictions = pd.read_csv(ext / "predictions.csv", dtype={"patient_id": str}).set_index("patient_id")
    outcome = external.set_index("patient_id").loc[predictions.index]
    for t in TIMES:
        curve = curves[f"{t:.10g}"]
        np.testing.assert_allclose(curve["threshold"], THRESHOLDS)
        km = KaplanMeierFitter().fit(outcome["time"], outcome["event"]).survival_function_at_times(t).iloc[0]
        np.testing.assert_allclose(curve["treat_all"], (1 - km) - km * THRESHOLDS / (1 - THRESHOLDS), atol=1e-12)
        assert curve["treat_none"] == 0.0
        probability = predictions[f"recurrence_by_{t:g}"].to_numpy()
        for p, benefit in zip(THRESHOLDS, curve["model"], strict=True):
            treated = probability >= p
            expected = 0.0
            if treated.any():
                km_treated = KaplanMeierFitter().fit(outcome["time"][treated], outcome["event"][treated])
                s = km_treated.survival_function_at_times(t).iloc[0]
                expected = treated.mean() * ((1 - s) - s * p / (1 - p))
            assert benefit == pytest.approx(expected, abs=1e-12), (t, p)
    one_year = curves["365.25"]
    assert max(one_year["model"]) > 0 and one_year["model"][-1] > one_year["treat_all"][-1]


def test_nomogram_points_reproduce_the_linear_predictor(gbsg2_split) -> None:
    """Points of every external patient give back the frozen model's linear predictor (1e-6) and survival; the
    rounded table does within its rounding."""
    external, fit = gbsg2_split["external"], gbsg2_split["fit"]
    study = load_study(fit.parent)
    model, nomogram = study.models["clinical"], study.nomogram
    points = nomogram.points(external)
    assert list(points.columns) == ["horTh", "menostat", "tgrade", "age", "tsize", "pnodes", "progrec", "estrec"]
    train_points = nomogram.points(gbsg2_split["train"])
    assert train_points.min().min() == pytest.approx(0.0, abs=1e-9) and train_points.max().max() == pytest.approx(100.0)
    total = points.sum(axis=1).to_numpy()
    np.testing.assert_allclose(nomogram.linear_predictor(total), model.predict_risk(external), rtol=0, atol=1e-6)
    np.testing.assert_allclose(nomogram.survival(total), model.predict_survival(external, TIMES), rtol=0, atol=1e-6)
    table = pd.read_csv(fit / "nomogram.csv")
    assert list(table.columns) == ["variable", "value", "points", *(f"rfs_at_{t:g}" for t in TIMES)]
    # By hand: look up each categorical level, interpolate each numeric covariate between its tabulated values.
    by_hand = np.zeros(len(external))
    for term in points.columns:
        rows = table[table["variable"] == term]
        values = external[term].to_numpy()
        if term in ("horTh", "menostat", "tgrade"):
            by_hand += rows.set_index("value")["points"].loc[values.astype(str)].to_numpy()
        else:
            x, y = rows["value"].astype(float).to_numpy(), rows["points"].to_numpy()
            by_hand += y[0] + (values - x[0]) * (y[-1] - y[0]) / (x[-1] - x[0])
    assert np.abs(by_hand - total).max() < 0.05 * len(points.columns) + 0.1
    totals = table[table["variable"] == "total points"]
    np.testing.assert_allclose(totals[f"rfs_at_{TIMES[0]:g}"], nomogram.survival(totals["points"].to_numpy())[:, 0], atol=5e-4)
    for name in ("nomogram.png", "decision_curve.png"):
        assert (fit / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_external_report_shows_training_beside_external(gbsg2_split) -> None:
    ext, fit = gbsg2_split["ext"], gbsg2_split["fit"]
    report = (ext / "report.html").read_text()
    for text in ("Training and external cohorts side by side", "clinical: training", "clinical: external",
                 "calibration slope", "Decision curves", "Nomogram"):
        assert text in report, text
    assert (ext / "decision_curve_training.png").stat().st_size > 0
    assert (ext / "nomogram.csv").read_bytes() == (fit / "nomogram.csv").read_bytes()
    trained = json.loads((fit / "metrics.json").read_text())["models"]["clinical"]["train"]
    assert _metrics(ext)["train"] == trained


def test_bad_thresholds_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pathomics.cli.main import main

    gbsg2_frame().to_csv(tmp_path / "clinical.csv", index=False)
    assert main(fit_argv(tmp_path / "clinical.csv", tmp_path / "out", GBSG2_COVARIATES, "--thresholds", "0.5,0.2,0.1")) == 2
    assert "thresholds must be LOW,HIGH,STEP" in capsys.readouterr().err


def _with_holes(seed: int, n: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A planted cohort whose radiology table lacks 30% of patients and whose signatures lack 10% of patients."""
    clinical, radiology, signatures, _ = simulate_cohort_tables(n, seed)
    rng = np.random.default_rng(100 + seed)
    radiology = radiology[rng.uniform(size=len(radiology)) >= 0.3]
    signatures = signatures[signatures["patient_id"].isin(clinical["patient_id"][rng.uniform(size=n) >= 0.1])]
    return clinical, radiology, signatures


def test_every_patient_is_predicted_from_the_modalities_they_have(tmp_path: Path) -> None:
    """30% missing radiology, 10% missing slides: every patient predicted, the modalities used recorded; on the
    complete cases the predictions rank exactly as the complete-case decision fusion does (C unchanged)."""
    config = SurvivalConfig(covariates=SYNTHETIC_COVARIATES, fusion="decision", missing="available", folds=2, n_bootstrap=0)
    result = survival_fit(config, *_with_holes(0, 300), out=tmp_path)
    predictions = pd.read_csv(tmp_path / "survival" / "predictions.csv")
    combined = predictions[predictions["model"] == "combined"]
    assert len(combined) == 300 and combined["risk"].notna().all()
    counts = combined["modalities"].value_counts()
    assert set(counts.index) <= {"clinical", "clinical+radiology", "clinical+pathology", "clinical+radiology+pathology"}
    assert 0.6 * 300 < counts["clinical+radiology+pathology"] < 0.7 * 300 and counts["clinical+pathology"] > 0.2 * 300
    assert result.models["radiology"].metrics["n"] == counts.filter(like="radiology").sum()

    clinical, radiology, signatures = _with_holes(7, 300)
    study = result.study
    external = evaluate_external(study, load_cohort(study.config, clinical, radiology, signatures))
    scored = external.models["combined"].predictions.set_index("patient_id")
    assert len(scored) == 300
    complete = load_cohort(study.config, clinical, radiology, signatures).data.dropna()
    training = load_cohort(study.config, *_with_holes(0, 300)).data.dropna()
    clinical_model = CoxModel(Design(numeric=("age", "tumour_size"), categorical=("stage",)))
    reference = DecisionFusion(clinical_model, ("radiology_score", "risk")).fit(training)
    ours = scored.loc[complete["patient_id"], "risk"].to_numpy()
    theirs = reference.predict_risk(complete)
    np.testing.assert_allclose(ours - ours.mean(), theirs - theirs.mean(), atol=1e-9)
    assert set(scored.loc[complete["patient_id"], "modalities"]) == {"clinical+radiology+pathology"}


def test_oracle_table_puts_the_planted_components_beside_the_models(tmp_path: Path) -> None:
    """The demo's oracle column, from a truth.json laid out as ``write_cohort`` writes it."""
    clinical, radiology, _, truth = simulate_cohort_tables(200, seed=4)
    result = survival_fit(SurvivalConfig(covariates=SYNTHETIC_COVARIATES, folds=3, n_bootstrap=0), clinical, radiology)
    document = {"strengths": truth.strengths, "patients": truth.components.reset_index().to_dict("records")}
    (tmp_path / "truth.json").write_text(json.dumps(document))
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    components, strengths = read_planted(tmp_path / "truth.json")
    pd.testing.assert_frame_equal(components, truth.components)
    table = oracle_table(components, strengths, clinical, result).set_index("model")
    section = oracle_section(tmp_path / "truth.json", tmp_path / "clinical.csv", result)
    assert "planted component C (oracle)" in section.body and f"{table.loc['radiology', 'validated Harrell C']:.3g}" in section.body
    assert list(table.index) == ["clinical", "radiology", "combined"]
    from sksurv.metrics import concordance_index_censored

    event, time = clinical["event"].astype(bool).to_numpy(), clinical["time"].to_numpy()
    radiology_truth = truth.components.loc[clinical["patient_id"], "radiology"].to_numpy()
    oracle = concordance_index_censored(event, time, radiology_truth)[0]
    assert table.loc["radiology", "planted component C (oracle)"] == pytest.approx(oracle)
    assert table.loc["radiology", "planted log-HR per SD"] == 1.2
    assert table.loc["combined", "planted component C (oracle)"] > table.loc["radiology", "planted component C (oracle)"]
    assert (table["validated Harrell C"] <= table["planted component C (oracle)"] + 0.05).all()


def test_integrated_brier_counts_patients_followed_past_training_as_controls() -> None:
    """A test patient followed beyond the last training time no longer fails the score: they are a control at every
    grid time, so the score equals the one with their time anywhere between the grid's end and that last time."""
    from pathomics.survival.metrics import EvalSet, integrated_brier

    rng = np.random.default_rng(0)
    train_time, train_event = np.arange(1.0, 21.0), rng.integers(0, 2, 20)
    train_event[-1] = 1  # the censoring survival stays positive at the last training time: sksurv refuses beyond it
    time, event = np.array([3.0, 6.0, 9.0, 12.0, 25.0, 30.0]), np.array([1, 0, 1, 1, 1, 0])
    grid = np.linspace(2.0, 15.0, 8)
    survival = np.exp(-np.outer(rng.uniform(0.02, 0.1, len(time)), grid))

    def score(t: np.ndarray) -> float:
        n = len(t)
        return integrated_brier(EvalSet(train_time, train_event, t, event, event.astype(bool), np.zeros(n), survival,
                                        np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, 1)), np.zeros(n), np.zeros(n)), grid)

    assert np.isfinite(score(time))
    assert score(time) == pytest.approx(score(np.where(time > 20, 17.5, time)), abs=1e-12)


def test_nomogram_of_decision_fusion_expands_the_clinical_score() -> None:
    """Decision fusion's nomogram has one axis per clinical covariate (through the clinical linear predictor) beside
    the radiology score and the pathology risk, and reproduces the fused linear predictor and survival."""
    clinical, radiology, signatures, _ = simulate_cohort_tables(200, seed=5)
    config = SurvivalConfig(covariates=SYNTHETIC_COVARIATES, fusion="decision")
    data = load_cohort(config, clinical, radiology, signatures).data
    model = DecisionFusion(CoxModel(Design(numeric=("age", "tumour_size"), categorical=("stage",))), ("radiology_score", "risk"))
    model.fit(data)
    nomogram = Nomogram(model, (200.0, 400.0)).fit(data)
    points = nomogram.points(data)
    assert list(points.columns) == ["stage", "age", "tumour_size", "radiology_score", "risk"]
    total = points.sum(axis=1).to_numpy()
    np.testing.assert_allclose(nomogram.linear_predictor(total), model.predict_risk(data), rtol=0, atol=1e-6)
    np.testing.assert_allclose(nomogram.survival(total), model.predict_survival(data, (200.0, 400.0)), rtol=0, atol=1e-6)
    stage = nomogram.table().query("variable == 'stage'").set_index("value")["points"]
    assert stage["I"] == 0.0 and stage["I"] < stage["II"] < stage["III"] < stage["IV"]  # as planted


def test_nomogram_of_a_fusion_whose_stacking_dropped_the_clinical_score() -> None:
    """Non-negative stacking may drop the clinical linear predictor (here a clinical model of pure noise); the
    nomogram then has the scores' axes only (it failed with a KeyError on the dropped column)."""
    clinical, radiology, signatures, _ = simulate_cohort_tables(120, seed=3)
    data = clinical.merge(radiology, on="patient_id").merge(
        signatures.groupby("patient_id", as_index=False)["risk"].mean(), on="patient_id")
    data["noise"] = np.random.default_rng(3).standard_normal(len(data))
    model = DecisionFusion(CoxModel(Design(numeric=("noise",))), ("radiology_score", "risk"), non_negative=True).fit(data)
    assert list(model.coefficients()["covariate"]) == ["radiology_score", "risk"]  # the clinical score was dropped
    nomogram = Nomogram(model, (200.0,)).fit(data)
    assert list(nomogram.points(data).columns) == ["radiology_score", "risk"]
    np.testing.assert_allclose(nomogram.linear_predictor(nomogram.points(data).sum(axis=1).to_numpy()),
                               model.predict_risk(data), rtol=0, atol=1e-6)
