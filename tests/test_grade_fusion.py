"""Grade-guided fusion: witnesses on synthetic cohorts whose pathology effect is (or is not) modified by grade."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lifelines import CoxPHFitter

from pathomics.cli.main import main
from pathomics.errors import CohortError
from pathomics.survival.grade_fusion import GradeFusionConfig, fit_fusion, likelihood_ratio_test
from pathomics.survival.metrics import concordance
from pathomics.synthetic.grade_cohort import MODIFIED, UNMODIFIED, simulate_grade_cohort

SPEC = GradeFusionConfig(("clinical", "pathology"), ("p_grade_high",))


def held_out_gain(effect: dict[str, float]) -> tuple[float, dict[str, float], object]:
    """C-index of grade-guided minus plain fusion on an independent cohort of 3,000, both fitted on 600."""
    train, test = simulate_grade_cohort(600, effect, seed=1), simulate_grade_cohort(3000, effect, seed=2)
    plain, gated = fit_fusion(train, SPEC, gated=False), fit_fusion(train, SPEC, gated=True)
    c = [concordance(test["time"].to_numpy(), test["event"].to_numpy(), m.risk(test)) for m in (plain, gated)]
    return c[1] - c[0], likelihood_ratio_test(gated, plain), gated


def test_beats_plain_fusion_when_grade_modifies_the_pathology_effect():
    gain, test, gated = held_out_gain(MODIFIED)
    assert gain > 0.015 and test["p_value"] < 1e-6
    weights = gated.weights_by_grade()  # recovers the planted per-grade pathology effects (0.1 low, 1.3 high)
    assert weights["reference"]["pathology"] == pytest.approx(MODIFIED["low"], abs=0.25)
    assert weights["p_grade_high"]["pathology"] == pytest.approx(MODIFIED["high"], abs=0.25)


def test_ties_plain_fusion_when_grade_does_not_modify_it():
    gain, test, _ = held_out_gain(UNMODIFIED)
    assert abs(gain) < 0.005 and test["p_value"] > 0.05


def test_gated_fusion_is_lifelines_cox_with_interaction_terms():
    """The model is an ordinary Cox fit on the interaction design: same coefficients as lifelines by hand,
    and a patient's modality weight is beta_m + gamma_m * pi."""
    table = simulate_grade_cohort(300, MODIFIED, seed=3)
    gated = fit_fusion(table, SPEC, gated=True)
    by_hand = table.assign(**{"pathology:p_grade_high": table["pathology"] * table["p_grade_high"],
                              "clinical:p_grade_high": table["clinical"] * table["p_grade_high"]})
    reference = CoxPHFitter().fit(by_hand.drop(columns=["patient_id", "grade"]), "time", "event").params_
    assert np.allclose(gated.cph.params_[reference.index], reference, atol=1e-4)
    weights = gated.modality_weights(table)
    expected = reference["pathology"] + reference["pathology:p_grade_high"] * table["p_grade_high"]
    assert np.allclose(weights["pathology"], expected, atol=1e-4)
    risk = gated.risk(table)
    assert np.allclose(risk - risk.mean(), np.log(gated.cph.predict_partial_hazard(
        gated.spec.design(table, True))) - np.log(gated.cph.predict_partial_hazard(gated.spec.design(table, True))).mean())


def test_missing_columns_are_named():
    table = simulate_grade_cohort(50, seed=0).drop(columns=["p_grade_high"])
    with pytest.raises(CohortError, match="p_grade_high"):
        fit_fusion(table, SPEC, gated=True)


def test_cli_writes_the_comparison(tmp_path, capsys):
    table = simulate_grade_cohort(400, MODIFIED, seed=4)
    table.drop(columns=["grade"]).to_csv(tmp_path / "scores.csv", index=False)
    code = main(["survival", "grade-fusion", "--table", str(tmp_path / "scores.csv"), "--modalities", "clinical,pathology",
                 "--grade-prefix", "p_grade_", "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "survival" / "grade_fusion.json").read_text())
    assert result["interaction_test"]["p_value"] < 1e-3 and result["c_index_gain"]["mean"] > 0
    assert "grade-guided" in capsys.readouterr().out
    assert main(["survival", "grade-fusion", "--table", str(tmp_path / "scores.csv"), "--modalities", "nope",
                 "--grade-prefix", "p_grade_", "--out", str(tmp_path / "out")]) == 2
