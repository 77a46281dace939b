"""The multitask MIL model: a Cox head with an auxiliary grade head, its grade probabilities in the outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.mil import witness_cohort, write_bag
from sklearn.metrics import roc_auc_score

from pathomics.errors import CohortError, ConfigError
from pathomics.mil import MILConfig, load_trained, predict_mil, train_mil
from pathomics.mil.bags import read_bag
from pathomics.losses import cox_partial_nll
from pathomics.mil.train import CoxSurvival, Targets, WithGrade, objective_from_state


def graded_cohort(tmp_path):
    """The survival witness cohort, plus a grade: high-grade slides have every patch moved by +3 on axis 1."""
    cohort = witness_cohort(tmp_path, task="survival", n_slides=60, patches=(40, 80), shift=5.0)
    rng = np.random.default_rng(7)
    grades = np.where(rng.random(len(cohort.table)) < 0.5, "high", "low")
    for slide_id, grade in zip(cohort.table["slide_id"], grades):
        features, coords = read_bag(cohort.features / f"{slide_id}.h5")
        features[:, 1] += 3.0 * (grade == "high")
        write_bag(tmp_path, slide_id, features, coords)
    cohort.table.assign(grade=grades).to_csv(cohort.labels, index=False)
    return cohort, grades


def test_grade_head_learns_the_grade_and_reaches_the_signatures(tmp_path):
    cohort, grades = graded_cohort(tmp_path)
    config = MILConfig(task="survival", grade_col="grade", folds=2, epochs=15, val_fraction=0.0, hidden_dim=32,
                       lr=3e-3, batch_size=8, ensemble=1)
    run = train_mil(cohort.features, cohort.labels, tmp_path / "run", config)
    table = run.signatures.set_index("slide_id").loc[cohort.table["slide_id"]]
    assert np.allclose(table[["grade_prob_high", "grade_prob_low"]].sum(axis=1), 1.0, atol=1e-5)
    assert roc_auc_score(grades == "high", table["grade_prob_high"]) > 0.9  # out of fold
    trained = load_trained(tmp_path / "run")
    assert isinstance(trained.objective, WithGrade) and trained.objective.grades == ("high", "low")
    assert trained.model.n_outputs == 3
    predict_mil(tmp_path / "run", cohort.features, tmp_path / "pred", show_progress=False)
    predicted = pd.read_parquet(tmp_path / "pred" / "signatures.parquet")
    assert {"grade_prob_high", "grade_prob_low"} <= set(predicted.columns)


def test_the_loss_is_cox_plus_weighted_grade_cross_entropy():
    scores = torch.randn(6, 3)
    targets = Targets(time=np.array([1.0, 2, 3, 4, 5, 6]), event=np.array([1, 0, 1, 1, 0, 1]),
                      grade=np.array([0, 1, 1, 0, 1, 0]))
    objective = WithGrade(CoxSurvival(), ("high", "low"), 0.4)
    index = np.arange(6)
    expected = (cox_partial_nll(scores[:, 0], torch.as_tensor(targets.time), torch.as_tensor(targets.event))
                + 0.4 * torch.nn.functional.cross_entropy(scores[:, 1:], torch.as_tensor(targets.grade)))
    assert torch.allclose(objective.loss(scores, targets, index), expected)
    assert torch.equal(objective.risk(scores), scores[:, 0])
    rebuilt = objective_from_state(objective.state())
    assert rebuilt.state() == objective.state() and rebuilt.n_outputs == 3


def test_bad_grade_input(tmp_path):
    with pytest.raises(ConfigError, match="grade_weight"):
        MILConfig(grade_weight=-1)
    cohort = witness_cohort(tmp_path, task="survival", n_slides=8, patches=(10, 12))
    config = MILConfig(task="survival", grade_col="grade")
    with pytest.raises(CohortError, match="grade"):
        train_mil(cohort.features, cohort.labels, tmp_path / "run", config)
