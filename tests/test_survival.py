"""Survival models against the reference libraries (GBSG2) and on synthetic cohorts with planted effects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.survival import (
    GBSG2_COVARIATES,
    SYNTHETIC_COVARIATES,
    YEARS,
    fit_argv,
    gbsg2_frame,
    run_ok,
    write_synthetic,
)
from lifelines import CoxPHFitter
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from pathomics.errors import FitWarning
from pathomics.survival import CoxModel, Design, SurvivalConfig, evaluate_external, load_cohort, survival_fit
from pathomics.survival.metrics import assign_groups, risk_cut_points
from pathomics.synthetic.cohort import simulate_cohort_tables

CORE_KEYS = {"c_index_harrell", "c_index_uno", "td_auc", "ibs", "n", "events", "calibration_slope", "calibration_intercept"}


@pytest.fixture(scope="module")
def gbsg2(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """GBSG2 written as clinical.csv and fitted through the CLI; returns the table and ``<out>/survival``."""
    directory = tmp_path_factory.mktemp("gbsg2")
    frame = gbsg2_frame()
    frame.to_csv(directory / "clinical.csv", index=False)
    times = ",".join(f"{t:g}" for t in YEARS)
    run_ok(fit_argv(directory / "clinical.csv", directory / "out", GBSG2_COVARIATES, "--times", times, "--bootstrap", "20"))
    return frame, directory / "out" / "survival"


@pytest.fixture(scope="module")
def gbsg2_reference(gbsg2: tuple[pd.DataFrame, Path]) -> tuple[CoxPHFitter, pd.DataFrame]:
    """lifelines' CoxPHFitter fitted directly on GBSG2 one-hot encoded against the first sorted level."""
    frame, _ = gbsg2
    design = pd.get_dummies(
        frame.drop(columns="patient_id"), columns=["horTh", "menostat", "tgrade"], prefix_sep="=", drop_first=True, dtype=float
    )
    design = design.rename(columns=lambda c: "{}[{}]".format(*c.split("=")) if "=" in c else c)
    return CoxPHFitter().fit(design, duration_col="time", event_col="event"), design


def test_gbsg2_coefficients_equal_lifelines_on_original_scale(gbsg2, gbsg2_reference) -> None:
    """Encoding: horTh, menostat and tgrade one-hot against their first level in sorted order (horTh=no,
    menostat=Post, tgrade=I), the five other covariates numeric per unit; internal standardisation is undone."""
    _, out = gbsg2
    reference, design = gbsg2_reference
    ours = pd.read_csv(out / "coefficients.csv").set_index("covariate")
    assert list(pd.read_csv(out / "coefficients.csv").columns) == ["model", "covariate", "coef", "hr", "hr_low", "hr_high", "p", "flag"]
    assert set(ours["model"]) == {"clinical"}
    expected = reference.summary
    assert (
        sorted(ours.index)
        == sorted(expected.index)
        == sorted(["age", "tsize", "pnodes", "progrec", "estrec", "horTh[yes]", "menostat[Pre]", "tgrade[II]", "tgrade[III]"])
    )
    ours = ours.loc[expected.index]
    for column, theirs in (
        ("coef", "coef"),
        ("hr", "exp(coef)"),
        ("hr_low", "exp(coef) lower 95%"),
        ("hr_high", "exp(coef) upper 95%"),
    ):
        np.testing.assert_allclose(ours[column], expected[theirs], rtol=0, atol=1e-6, err_msg=column)
    np.testing.assert_allclose(ours["p"], expected["p"], rtol=1e-4, atol=1e-12)
    # Converged as tightly as pathomics converges, the direct fit agrees to 1e-6 relative as well.
    tight = CoxPHFitter().fit(design, duration_col="time", event_col="event", fit_options={"precision": 1e-10}).summary
    np.testing.assert_allclose(ours["coef"], tight["coef"], rtol=1e-6)
    np.testing.assert_allclose(
        ours[["hr_low", "hr_high", "p"]], tight[["exp(coef) lower 95%", "exp(coef) upper 95%", "p"]], rtol=1e-6
    )
    encoding = json.loads((out / "metrics.json").read_text())["encoding"]
    assert {c: e["reference"] for c, e in encoding.items()} == {"horTh": "no", "menostat": "Post", "tgrade": "I"}


def test_gbsg2_discrimination_equals_reference_libraries(gbsg2, gbsg2_reference) -> None:
    """In-sample Harrell C = 0.691851; Uno C, td-AUC at 1-5 years and IBS equal sksurv on lifelines' risks."""
    _, out = gbsg2
    reference, design = gbsg2_reference
    train = json.loads((out / "metrics.json").read_text())["models"]["clinical"]["train"]
    y = Surv.from_arrays(design["event"].astype(bool), design["time"])
    risk = reference.predict_log_partial_hazard(design).to_numpy()
    assert train["c_index_harrell"]["estimate"] == pytest.approx(0.691851, abs=5e-7)
    assert train["c_index_harrell"]["estimate"] == pytest.approx(reference.concordance_index_, abs=1e-12)
    assert train["c_index_uno"]["estimate"] == pytest.approx(concordance_index_ipcw(y, y, risk)[0], abs=1e-9)
    auc = cumulative_dynamic_auc(y, y, risk, list(YEARS))[0]
    assert list(train["td_auc"]) == ["365.25", "730.5", "1095.75", "1461", "1826.25"]
    np.testing.assert_allclose(list(train["td_auc"].values()), auc, atol=1e-9)
    grid = np.linspace(YEARS[0], YEARS[-1], 50)
    survival = reference.predict_survival_function(design, times=grid).to_numpy().T
    assert train["ibs"] == pytest.approx(integrated_brier_score(y, y, survival, grid), abs=1e-7)
    assert (train["n"], train["events"]) == (686, 299)


def test_metrics_json_and_files_follow_the_contract(gbsg2) -> None:
    _, out = gbsg2
    for name in (
        "metrics.json",
        "coefficients.csv",
        "km.png",
        "td_auc.png",
        "calibration.png",
        "forest.png",
        "decision_curve.png",
        "nomogram.png",
        "nomogram.csv",
        "predictions.csv",
        "report.html",
        "model.pkl",
        "model.json",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("km.png", "td_auc.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "metrics.json").read_text())
    assert document["config"]["times"] == list(YEARS) and document["config"]["categorical"] == ["horTh", "menostat", "tgrade"]
    assert document["cohort"] == {
        "clinical_rows": 686,
        "n": 686,
        "events": 299,
        "dropped": {},
        "dropped_total": 0,
        "unmatched": {},
        "modalities": ["clinical"],
        "availability": {"clinical": 686},
        "missing_policy": "error",
        "time_unit": "days",
    }
    model = document["models"]["clinical"]
    assert CORE_KEYS <= set(model) and CORE_KEYS == set(model["train"])
    for block in (model, model["train"]):
        for key in ("c_index_harrell", "c_index_uno"):
            assert block[key]["ci_low"] < block[key]["estimate"] < block[key]["ci_high"]
    assert 0.6 < model["c_index_harrell"]["estimate"] < model["train"]["c_index_harrell"]["estimate"]
    assert [f["n"] for f in model["folds"]] == [138, 137, 137, 137, 137]
    assert model["risk_groups"]["logrank_p"] < 1e-6 and sum(model["risk_groups"]["n"].values()) == 686


def test_evaluate_reloads_the_saved_model(gbsg2, tmp_path: Path) -> None:
    """The saved model applied to its own training cohort reproduces the in-sample metrics."""
    frame, out = gbsg2
    frame.sample(frac=1.0, random_state=1).to_csv(tmp_path / "shuffled.csv", index=False)
    run_ok(
        [
            "survival",
            "evaluate",
            "--model-dir",
            str(out.parent),
            "--clinical",
            str(tmp_path / "shuffled.csv"),
            "--out",
            str(tmp_path / "ext"),
        ]
    )
    train = json.loads((out / "metrics.json").read_text())["models"]["clinical"]["train"]
    external = json.loads((tmp_path / "ext" / "survival" / "metrics.json").read_text())
    assert external["validation"].startswith("external cohort")
    for key in ("c_index_harrell", "c_index_uno"):
        assert external["models"]["clinical"][key]["estimate"] == pytest.approx(train[key]["estimate"], abs=1e-12)
    assert external["models"]["clinical"]["td_auc"] == pytest.approx(train["td_auc"], abs=1e-12)
    assert (tmp_path / "ext" / "survival" / "report.html").is_file()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """A 600-patient synthetic cohort with planted strengths, cross-validated in both fusion modes."""
    clinical, radiology, signatures, truth = write_synthetic(tmp_path_factory.mktemp("planted"), 600, seed=0)
    results = {
        fusion: survival_fit(
            SurvivalConfig(covariates=SYNTHETIC_COVARIATES, fusion=fusion, n_bootstrap=20), clinical, radiology, signatures
        )
        for fusion in ("features", "decision")
    }
    return truth, results


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["features", "decision"])
def test_planted_strengths_order_the_validated_c_indices(planted, fusion: str) -> None:
    truth, results = planted
    c = {name: r.metrics["c_index_harrell"]["estimate"] for name, r in results[fusion].models.items()}
    assert set(c) == {"clinical", "radiology", "pathology", "combined"}
    by_strength = sorted(truth.strengths, key=truth.strengths.get)
    assert [c[name] for name in by_strength] == sorted(c[name] for name in by_strength), (truth.strengths, c)
    assert c["combined"] > max(c[name] for name in by_strength), c
    uno = {name: r.metrics["c_index_uno"]["estimate"] for name, r in results[fusion].models.items()}
    assert uno["combined"] > max(uno[name] for name in by_strength), uno


def test_validated_predictions_are_calibrated(planted) -> None:
    """Cross-validated event probabilities at the calibration time match Kaplan–Meier within quintile groups."""
    _, results = planted
    for name, model in results["features"].models.items():
        table = model.calibration
        assert list(table["n"]) == [120] * 5 and table["predicted"].is_monotonic_increasing
        assert (table["predicted"] - table["observed"]).abs().max() < 0.1, (name, table)
    ibs = {name: model.metrics["ibs"] for name, model in results["features"].models.items()}
    assert ibs["combined"] == min(ibs.values()) and ibs["combined"] < 0.15, ibs


def test_slides_are_aggregated_per_patient(tmp_path: Path) -> None:
    clinical, radiology, signatures, _ = simulate_cohort_tables(40, seed=2)
    cohort = load_cohort(SurvivalConfig(covariates=SYNTHETIC_COVARIATES, aggregate="mean", fusion="features"), clinical,
                         radiology, signatures)
    expected = signatures.groupby("patient_id")[["sig_0", "sig_15"]].mean()
    got = cohort.data.set_index("patient_id")[["sig_0", "sig_15"]]
    assert signatures["patient_id"].duplicated().any() and len(cohort.data) == 40
    np.testing.assert_allclose(got.loc[expected.index], expected, rtol=1e-6)
    decision = load_cohort(SurvivalConfig(covariates=(), fusion="decision", aggregate="max"), clinical, None, signatures)
    np.testing.assert_allclose(decision.data.set_index("patient_id")["risk"], signatures.groupby("patient_id")["risk"].max())
    assert decision.modalities == ("pathology",)


def test_fusion_modes_model_what_they_say(planted) -> None:
    _, results = planted
    features = results["features"].models["combined"].coefficients
    assert {"age", "tumour_size", "stage[II]", "radiology_score", "sig_pc1", "sig_pc3"} <= set(features["covariate"])
    decision = results["decision"].models["combined"].coefficients.set_index("covariate")
    assert list(decision.index) == ["clinical_lp", "radiology_score", "risk"]
    assert (decision["coef"] > 0).all() and (decision["p"] < 1e-3).all()


def test_external_cohort_keeps_the_planted_ranking(planted) -> None:
    """Models fitted on one synthetic cohort rank a fresh cohort from the same generator as planted."""
    _, results = planted
    study = results["features"].study
    clinical, radiology, signatures, _ = simulate_cohort_tables(400, seed=7)
    external = evaluate_external(study, load_cohort(study.config, clinical, radiology, signatures))
    c = {name: r.metrics["c_index_harrell"]["estimate"] for name, r in external.models.items()}
    assert c["clinical"] < c["radiology"] < c["pathology"] < c["combined"], c
    training = load_cohort(study.config, *simulate_cohort_tables(600, seed=0)[:3])
    assert study.cut_points["combined"] == pytest.approx([np.median(study.models["combined"].predict_risk(training.data))])


def test_split_by_holds_out_each_centre(tmp_path: Path) -> None:
    clinical, radiology, _, _ = simulate_cohort_tables(300, seed=3)
    result = survival_fit(SurvivalConfig(covariates=SYNTHETIC_COVARIATES, split_by="centre", n_bootstrap=0), clinical, radiology)
    assert result.validation == "leave-one-centre-out (3 groups)"
    folds = result.models["combined"].metrics["folds"]
    assert sorted(f["n"] for f in folds) == sorted(clinical["centre"].value_counts())
    assert result.models["combined"].metrics["n"] == 300


def test_penalty_chosen_by_inner_cross_validation() -> None:
    frame = gbsg2_frame().drop(columns="patient_id")
    design = Design(numeric=("age", "tsize", "pnodes", "progrec", "estrec"), categorical=("horTh", "menostat", "tgrade"))
    grid = (0.001, 0.05, 5.0)
    model = CoxModel(design, penalizer=grid, l1_ratio=0.5, inner_folds=3).fit(frame)
    assert set(model.inner_scores_) == set(grid)
    assert model.penalizer_ == max(grid, key=lambda p: model.inner_scores_[p])
    assert model.inner_scores_[5.0] < model.inner_scores_[model.penalizer_]
    loose, tight = (CoxModel(design, penalizer=p, l1_ratio=0.5).fit(frame) for p in (0.001, 5.0))
    assert np.abs(tight.cph_.params_).sum() < 0.1 * np.abs(loose.cph_.params_).sum()


def test_standardisation_is_fitted_on_training_rows_and_undone() -> None:
    """Rescaling a covariate rescales its reported coefficient and leaves the risks unchanged."""
    frame = gbsg2_frame().drop(columns="patient_id")
    train, test = frame.iloc[:400], frame.iloc[400:]
    design = Design(numeric=("age", "tsize", "pnodes"), categorical=("tgrade",))
    model = CoxModel(design).fit(train)
    np.testing.assert_allclose(model.mean_["age"], train["age"].mean())
    rescaled = CoxModel(design).fit(train.assign(age=train["age"] * 12.0))
    coef = model.coefficients().set_index("covariate")["coef"]
    coef_months = rescaled.coefficients().set_index("covariate")["coef"]
    assert coef_months["age"] == pytest.approx(coef["age"] / 12.0, rel=1e-6)
    np.testing.assert_allclose(rescaled.predict_risk(test.assign(age=test["age"] * 12.0)), model.predict_risk(test), atol=1e-8)
    survival = model.predict_survival(test, YEARS)
    assert ((survival >= 0) & (survival <= 1)).all() and (np.diff(survival, axis=1) <= 0).all()


def test_risk_groups_use_training_cut_points() -> None:
    train = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    cuts = risk_cut_points(train, "tertiles")
    assert list(assign_groups(np.array([-9.0, 2.5, 9.0, 9.5]), cuts, "tertiles")) == ["low", "intermediate", "high", "high"]
    assert list(assign_groups(np.array([10.0, 11.0]), risk_cut_points(train, "median"), "median")) == ["high", "high"]


def test_a_covariate_that_separates_events_is_stabilised_and_flagged(tmp_path: Path) -> None:
    """`--missing impute` adds a missingness indicator; here it is 1 exactly for the patients with an event,
    which once ended in lifelines' ConvergenceError (and elsewhere in an HR of 1e9, CI 0-inf, unflagged)."""
    clinical, _, _, _ = simulate_cohort_tables(n_patients=60, seed=5)
    clinical = clinical.astype({"tumour_size": float})
    clinical.loc[clinical["event"] == 1, "tumour_size"] = np.nan
    path = tmp_path / "clinical.csv"
    clinical.to_csv(path, index=False)
    config = SurvivalConfig(covariates=("age", "tumour_size"), missing="impute", folds=3, n_bootstrap=10)
    with pytest.warns(FitWarning, match=r"tumour_size\[missing\].*separate events"):
        result = survival_fit(config, path, out=tmp_path)
    table = pd.read_csv(tmp_path / "survival" / "coefficients.csv").set_index("covariate")
    assert table.loc["tumour_size[missing]", "flag"] == "separates events; ridge-stabilised"
    assert np.isfinite(table.loc["tumour_size[missing]", ["hr", "hr_low", "hr_high"]].astype(float)).all()
    assert pd.isna(table.loc["age", "flag"])
    assert np.isfinite(result.models["clinical"].metrics["c_index_harrell"]["estimate"])


def test_non_negative_stacking_drops_a_modality_that_ranks_backwards() -> None:
    """A score that, beside the others, gets a negative second-stage weight (here one planted to lower the hazard)
    is dropped from a non-negative stacking, and the stage's penalty comes from its inner-CV grid."""
    from pathomics.survival import DecisionFusion

    clinical, radiology, signatures, _ = simulate_cohort_tables(200, seed=3)
    data = clinical.merge(radiology, on="patient_id").merge(
        signatures.groupby("patient_id", as_index=False)["risk"].mean(), on="patient_id")
    data["protective"] = -data["risk"] + 0.5 * np.random.default_rng(0).standard_normal(len(data))
    scores = ("radiology_score", "risk", "protective")
    free = DecisionFusion(None, scores).fit(data)
    assert free.coefficients().set_index("covariate").loc["protective", "coef"] < 0
    stacked = DecisionFusion(None, scores, penalizer=(0.0, 1.0, 10.0), non_negative=True).fit(data)
    weights = stacked.coefficients().set_index("covariate")["coef"]
    assert list(weights.index) == ["radiology_score", "risk"] and (weights > 0).all()
    assert stacked.penalizer_ in (0.0, 1.0, 10.0) and set(stacked.stage_.inner_scores_) == {0.0, 1.0, 10.0}


def test_a_metric_added_to_the_registry_reaches_metrics_json_and_the_report(tmp_path: Path, monkeypatch) -> None:
    """One FoldMetric entry is the whole wiring: validated block with CI, each fold, in-sample, report column."""
    from pathomics.survival import metrics as m

    negated = m.FoldMetric("c_index_reversed", "Reversed C", lambda s: 1.0 - m.harrell_c(s))
    monkeypatch.setattr(m, "FOLD_METRICS", (*m.FOLD_METRICS, negated))
    clinical, _, _, _ = simulate_cohort_tables(120, seed=4)
    survival_fit(SurvivalConfig(covariates=SYNTHETIC_COVARIATES, n_bootstrap=10, folds=3), clinical, out=tmp_path)
    model = json.loads((tmp_path / "survival" / "metrics.json").read_text())["models"]["clinical"]
    harrell, reversed_c = model["c_index_harrell"], model["c_index_reversed"]
    assert reversed_c["estimate"] == pytest.approx(1 - harrell["estimate"])
    assert reversed_c["ci_low"] == pytest.approx(1 - harrell["ci_high"])
    assert all(f["c_index_reversed"] == pytest.approx(1 - f["c_index_harrell"]) for f in model["folds"])
    assert model["train"]["c_index_reversed"]["estimate"] == pytest.approx(1 - model["train"]["c_index_harrell"]["estimate"])
    assert "<th>Reversed C</th>" in (tmp_path / "survival" / "report.html").read_text(encoding="utf-8")
