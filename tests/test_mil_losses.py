"""Training pieces checked against reference libraries and hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.mil import grid_coords, witness_bag
from sksurv.linear_model.coxph import CoxPHOptimizer

from pathomics.errors import CohortError, DataWarning
from pathomics import folds, losses
from pathomics.mil import train
from pathomics.mil.aggregators import build_aggregator


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_loss_matches_scikit_survival_with_tied_times(ties):
    rng = np.random.default_rng(0)
    n = 40
    x = rng.standard_normal((n, 3))
    beta = np.array([0.8, -0.5, 0.3])
    time = rng.integers(1, 8, n).astype(float)  # few distinct times: many ties
    event = rng.random(n) < 0.7
    reference = CoxPHOptimizer(x, event, time, np.zeros(3), ties).nlog_likelihood(beta)  # averaged over n
    ours = losses.cox_partial_nll(torch.tensor(x @ beta), torch.tensor(time), torch.tensor(event), ties)
    assert ours.item() == pytest.approx(reference * n / event.sum(), rel=1e-8)


def test_cox_loss_is_shift_invariant_and_zero_without_events():
    """exp(1000) overflows even float64: the loss must not compute it."""
    risk, time = torch.tensor([0.3, 2.0, -1.0], dtype=torch.float64), torch.tensor([3.0, 1.0, 2.0])
    event = torch.tensor([1, 1, 0])
    expected = losses.cox_partial_nll(risk, time, event).item()
    assert losses.cox_partial_nll(risk + 1000, time, event).item() == pytest.approx(expected, rel=1e-12)
    assert losses.cox_partial_nll(risk, time, torch.zeros(3)).item() == 0


def test_discrete_time_nll_by_hand():
    """Zero logits are hazards of 1/2: an event in bin 1 survived bin 0 and failed in bin 1 (2·log 2); a
    censoring in bin 1 survived bins 0 and 1 (2·log 2); an event in bin 0 just failed there (log 2)."""
    logits = torch.zeros(3, 4)
    loss = losses.discrete_time_nll(logits, torch.tensor([1, 1, 0]), torch.tensor([1.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx((2 + 2 + 1) * math.log(2) / 3)


def test_discrete_risk_orders_by_hazard():
    objective = train.DiscreteSurvival([1.0, 2.0])
    risk = objective.risk(torch.tensor([[-2.0, -2.0, -2.0], [2.0, 2.0, 2.0]]))
    assert risk[1] > risk[0]


def test_time_bins_hold_about_equal_events_and_class_weights_balance():
    time = np.arange(1, 13, dtype=float)
    event = np.ones(12, dtype=int)
    assert losses.time_bin_edges(time, event, 4) == pytest.approx([3.75, 6.5, 9.25])
    weights = train.class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights == pytest.approx([4 / 6, 2.0])


def test_classification_risk_is_probability_of_the_worse_class():
    objective = train.Classification(["low", "high"])
    scores = torch.tensor([[0.0, 2.0]])
    assert objective.risk(scores).item() == pytest.approx(torch.softmax(scores, -1)[0, 1].item())


def test_folds_keep_patients_together_and_stratify():
    groups = np.repeat([f"p{i}" for i in range(30)], 2)  # two slides per patient
    strata = np.repeat(np.arange(30) % 2, 2)
    assignment = folds.patient_folds(groups, strata, 5, seed=0)
    for patient in np.unique(groups):
        assert len(set(assignment[groups == patient])) == 1
    for fold in range(5):
        assert set(strata[assignment == fold]) == {0, 1}
    with pytest.raises(CohortError, match="lower --folds"):
        folds.patient_folds(groups, strata, 31, seed=0)
    with pytest.raises(CohortError, match=r"only 1 patient\(s\) with label/event 1"):
        folds.patient_folds(groups[:8], np.array([0] * 4 + [0, 0, 1, 1]), 3, seed=0)


def test_validation_split_takes_whole_patients_from_each_stratum():
    groups = np.repeat([f"p{i}" for i in range(20)], 3)
    strata = np.repeat(np.arange(20) % 2, 3)
    mask = folds.validation_split(groups, strata, 0.2, seed=0)
    assert mask.sum() == 12  # 2 of 10 patients per stratum, 3 slides each
    assert all(mask[groups == g].all() or not mask[groups == g].any() for g in np.unique(groups))
    assert set(strata[mask]) == {0, 1}
    assert not folds.validation_split(groups, strata, 0.0, seed=0).any()


def _bags(n: int, rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    bags, labels = [], np.arange(n) % 2
    for label in labels:
        features, _ = witness_bag(rng, 40, 3 * int(label), 8, 5.0)
        bags.append((features, grid_coords(40)))
    return bags, labels


def test_early_stopping_stops_and_restores_the_best_epoch():
    """Validation bags labelled against the rule the training bags teach: the validation loss rises,
    training stops ``patience`` epochs after its best, and the best weights are put back."""
    rng = np.random.default_rng(0)
    bags, labels = _bags(24, rng)
    labels[16:] = 1 - labels[16:]
    targets = train.Targets(label=labels)
    objective = train.Classification(["neg", "pos"])
    torch.manual_seed(0)
    model = build_aggregator("abmil", 8, 2, hidden_dim=16)
    settings = train.TrainConfig(epochs=60, patience=3, min_epochs=5, batch_size=4, lr=5e-3, weight_decay=0.0,
                                   max_patches=20, aux_weight=0.0, seed=0)
    val = np.arange(16, 24)
    result = train.fit(model, objective, targets, bags.__getitem__, np.arange(16), val, settings, torch.device("cpu"))
    assert len(result.val_loss) < 60
    assert len(result.val_loss) == max(5, result.best_epoch + 3)
    outputs = train.predict(model, bags.__getitem__, val, torch.device("cpu"))
    restored = objective.loss(torch.stack([o.scores for o in outputs]), targets, val).item()
    assert restored == pytest.approx(min(result.val_loss), rel=1e-5)


def test_a_fold_without_admissible_pairs_gets_a_nan_c_index_with_a_warning():
    """Two patients, the only event after the other's censoring: no comparable pair (lifelines raised ZeroDivisionError)."""
    targets = train.Targets(time=np.array([5.0, 10.0]), event=np.array([0, 1]))
    with pytest.warns(DataWarning, match="no admissible pairs"):
        metrics = train.evaluate(np.array([0.3, 0.9]), targets, np.arange(2), np.array(["p1", "p2"]))
    assert np.isnan(metrics["c_index"]) and metrics["n"] == 2 and metrics["events"] == 1
