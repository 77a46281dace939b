"""Aggregator invariants: order invariance, attention is a distribution, bag sizes from 1 to 50,000."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.mil import grid_coords

from pathomics.errors import ModelError
from pathomics.mil import aggregators
from pathomics.mil.aggregators import build_aggregator, list_aggregators, nystrom_attention, register_aggregator

ALL = ("mean", "max", "abmil", "gated-abmil", "clam-sb", "transmil")
SMALL = {"hidden_dim": 16}
TRANSMIL_SMALL = {"hidden_dim": 16, "heads": 2, "landmarks": 32}


def small(name: str, in_dim: int = 8, n_outputs: int = 3) -> aggregators.MILAggregator:
    torch.manual_seed(0)
    return build_aggregator(name, in_dim, n_outputs, **(TRANSMIL_SMALL if name == "transmil" else SMALL)).eval()


def bag(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)), torch.from_numpy(grid_coords(n, 37))


def test_registry_holds_every_aggregator_and_refuses_duplicates():
    assert set(ALL) <= set(list_aggregators())
    with pytest.raises(ModelError, match="already registered"):
        register_aggregator("abmil")(type("Other", (aggregators.MILAggregator,), {}))
    with pytest.raises(ModelError, match="unknown MIL aggregator 'nope'"):
        build_aggregator("nope", 8, 2)
    with pytest.raises(ModelError, match="bad options"):
        build_aggregator("abmil", 8, 2, heads=4)


@pytest.mark.parametrize("name", ALL)
def test_output_is_invariant_to_patch_order_and_attention_is_a_distribution(name):
    model = small(name)
    features, coords = bag(300)
    perm = torch.from_numpy(np.random.default_rng(1).permutation(300))
    with torch.no_grad():
        out, shuffled = model(features, coords), model(features[perm], coords[perm])
    assert out.embedding.shape == (model.embed_dim,) and out.scores.shape == (3,) and out.attention.shape == (300,)
    torch.testing.assert_close(shuffled.embedding, out.embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled.scores, out.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled.attention, out.attention[perm], rtol=1e-4, atol=1e-7)
    assert (out.attention >= 0).all()
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 50_000])
def test_bags_of_one_to_fifty_thousand_patches(name, n):
    model = small(name)
    features, coords = bag(n)
    with torch.no_grad():
        out = model(features, coords)
    assert out.attention.shape == (n,) and torch.isfinite(out.scores).all()
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_trains(name):
    """Gradients reach the encoder and the head (and the attention, where there is one)."""
    model = small(name).train()
    out = model(*bag(40))
    (out.scores.sum() + model.auxiliary_loss(out, 1)).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


def test_empty_or_wrongly_shaped_bags_are_refused():
    model = small("abmil")
    with pytest.raises(ModelError, match=r"non-empty bag of shape \(N, 8\)"):
        model(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ModelError, match=r"\(N, 8\)"):
        model(*bag(5, dim=7))


def test_clam_instance_loss_teaches_top_and_bottom_patches():
    model = small("clam-sb", n_outputs=2)
    out = model(*bag(40))
    loss = model.auxiliary_loss(out, 1)
    assert loss.item() > 0
    assert model.auxiliary_loss(out, None).item() == 0  # survival bags have no class
    single = model(*bag(1))
    assert model.auxiliary_loss(single, 0).item() == 0  # no top and bottom in a bag of one
    loss.backward()
    assert model.instance_classifiers[1].weight.grad.abs().sum() > 0
    assert model.instance_classifiers[0].weight.grad is None  # binary: only the bag's own class branch


def test_clam_multiclass_also_teaches_other_branches():
    model = small("clam-sb", n_outputs=3)
    model.auxiliary_loss(model(*bag(40)), 2).backward()
    assert all(clf.weight.grad.abs().sum() > 0 for clf in model.instance_classifiers)


def test_nystrom_attention_is_exact_with_as_many_landmarks_as_tokens():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 8, generator=g) * 0.3 for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(nystrom_attention(q, k, v, landmarks=24, pinv_iterations=20), exact, rtol=0, atol=1e-3)
    approx = nystrom_attention(q, k, v, landmarks=6)
    assert approx.shape == exact.shape and torch.isfinite(approx).all()


def test_transmil_depends_on_where_patches_lie():
    """Its positional encoding follows the coordinates, not the order the patches are listed in."""
    model = small("transmil")
    features, coords = bag(500)
    with torch.no_grad():
        out = model(features, coords)
        moved = model(features, coords.flip(0))  # same patches, different places
    assert not torch.allclose(out.scores, moved.scores, atol=1e-5)
