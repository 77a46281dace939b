"""The MIL training recipe's pieces: warm-up + cosine learning rate, instance dropout (training only), determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pathomics.errors import ConfigError
from pathomics.mil import MILConfig, train
from pathomics.mil.aggregators import build_aggregator


def settings(**values) -> train.TrainConfig:
    base = {"epochs": 12, "patience": 12, "min_epochs": 1, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-2,
            "max_patches": None, "aux_weight": 0.0, "seed": 3, "warmup_epochs": 2, "schedule": "cosine",
            "instance_dropout": 0.3}
    return train.TrainConfig(**{**base, **values})


def bags(n: int = 16, dim: int = 6, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Bags of 5-20 instances; positives hold one instance shifted by +2 in every dimension."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    out = []
    for y in labels:
        x = rng.standard_normal((int(rng.integers(5, 20)), dim)).astype(np.float32)
        x[0] += 2.0 * y
        out.append((x, np.zeros((len(x), 2), np.int64)))
    return out, labels


def test_warm_up_rises_linearly_then_cosine_decays_to_the_floor():
    s = settings()
    factors = [train.lr_factor(e, s) for e in range(s.epochs)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in itertools.pairwise(factors[2:]))  # strictly decreasing after warm-up
    assert factors[-1] == pytest.approx(train.MIN_LR_RATIO)
    middle = 2 + (s.epochs - 3) / 2  # half way through the decay: half way between peak and floor
    assert train.lr_factor(middle, s) == pytest.approx((1 + train.MIN_LR_RATIO) / 2)
    assert [train.lr_factor(e, settings(schedule="constant", warmup_epochs=0)) for e in range(4)] == [1.0] * 4


@pytest.mark.slow
def test_fit_applies_the_schedule_to_the_optimiser(monkeypatch):
    seen = []
    original = train._train_epoch

    def spy(model, objective, targets, load, order, s, rng, optimizer, device):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(model, objective, targets, load, order, s, rng, optimizer, device)

    monkeypatch.setattr(train, "_train_epoch", spy)
    data, labels = bags()
    model = build_aggregator("abmil", 6, 2, hidden_dim=8)
    s = settings()
    train.fit(model, train.Classification(["0", "1"]), train.Targets(label=labels), lambda i: data[i],
              np.arange(16), np.arange(0), s, torch.device("cpu"))
    assert seen == pytest.approx([s.lr * train.lr_factor(e, s) for e in range(s.epochs)])


def test_instance_dropout_drops_about_its_rate_and_keeps_at_least_one():
    rng = np.random.default_rng(0)
    x, c = np.arange(2000, dtype=np.float32)[:, None], np.zeros((2000, 2), np.int64)
    kept, kept_c = train.drop_instances(x, c, 0.3, rng)
    assert len(kept_c) == len(kept) and 0.67 < len(kept) / 2000 < 0.73
    assert set(kept[:, 0]) <= set(x[:, 0]) and np.all(np.diff(kept[:, 0]) > 0)  # a subset, in order
    assert all(len(train.drop_instances(x[:3], c[:3], 0.99, rng)[0]) >= 1 for _ in range(50))
    assert train.drop_instances(x, c, 0.0, rng)[0] is x


def test_instance_dropout_only_in_training(monkeypatch):
    """Training forward passes see thinned bags; predictions see every instance (attention over all of them)."""
    data, labels = bags()
    sizes = []
    model = build_aggregator("abmil", 6, 2, hidden_dim=8)
    forward = model.forward

    def record(features, coords):
        sizes.append((model.training, len(features)))
        return forward(features, coords)

    monkeypatch.setattr(model, "forward", record)
    train.fit(model, train.Classification(["0", "1"]), train.Targets(label=labels), lambda i: data[i],
              np.arange(12), np.arange(12, 16), settings(epochs=3, instance_dropout=0.5), torch.device("cpu"))
    full = sum(len(data[i][0]) for i in range(12))
    trained = [n for training, n in sizes if training]
    assert sum(trained) < 0.75 * 3 * full  # about half dropped in each of 3 epochs
    assert sorted(n for training, n in sizes if not training) == sorted([len(data[i][0]) for i in range(12, 16)] * 3)
    outputs = train.predict(model, lambda i: data[i], np.arange(16), torch.device("cpu"))
    assert [len(o.attention) for o in outputs] == [len(x) for x, _ in data]


@pytest.mark.slow
def test_the_recipe_is_deterministic_and_learns():
    data, labels = bags(32)
    objective, targets = train.Classification(["0", "1"]), train.Targets(label=labels)

    def run() -> tuple[dict, list[float]]:
        torch.manual_seed(0)
        model = build_aggregator("abmil", 6, 2, hidden_dim=16)
        result = train.fit(model, objective, targets, lambda i: data[i], np.arange(24), np.arange(24, 32),
                           settings(epochs=15, seed=5, lr=5e-3), torch.device("cpu"))
        return model.state_dict(), result.train_loss

    (first, losses), (second, again) = run(), run()
    assert losses == again and all(torch.equal(first[k], second[k]) for k in first)
    assert losses[-1] < losses[0]


def test_defaults_are_the_recipe_and_bad_values_are_refused():
    config = MILConfig()
    assert (config.schedule, config.warmup_epochs > 0, config.instance_dropout > 0) == ("cosine", True, True)
    with pytest.raises(ConfigError, match="schedule.*instance_dropout|instance_dropout.*schedule"):
        MILConfig(schedule="step", instance_dropout=1.0)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        MILConfig(warmup_epochs=-1)
