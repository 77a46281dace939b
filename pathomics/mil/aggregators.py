"""Multiple-instance aggregators: a bag of N patch embeddings → slide embedding, scores, per-patch attention.

Every aggregator shares one shape (as in CLAM): an encoder projects each patch to ``hidden_dim``, ``pool``
reduces the bag to one slide embedding plus a per-patch attention that is non-negative and sums to 1, and
a linear head maps the embedding to ``n_outputs`` scores (class logits, a Cox risk, or discrete-time hazard
logits). Pooling is invariant to the order of the patches: TransMIL, whose positional encoding needs an
order, lays patches out in raster order of their level-0 coordinates.

Aggregators are built by name from a registry (``build_aggregator("abmil", in_dim, n_outputs)``),
populated by the ``register_aggregator`` decorator, which refuses duplicate names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathomics.errors import ModelError

__all__ = [
    "ABMIL", "CLAMSB", "GatedABMIL", "MaxPool", "MeanPool", "MILAggregator", "MILEnsemble", "MILModel", "MILOutput",
    "TransMIL",
    "build_aggregator", "list_aggregators", "nystrom_attention", "raster_order", "register_aggregator",
]

_AGGREGATORS: dict[str, type[MILAggregator]] = {}
M = TypeVar("M", bound="MILAggregator")


def register_aggregator(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator adding an aggregator to the registry under ``name``; a taken name is refused."""

    def wrap(cls: type[M]) -> type[M]:
        if name in _AGGREGATORS:
            raise ModelError(f"aggregator name {name!r} is already registered by {_AGGREGATORS[name].__qualname__}")
        _AGGREGATORS[name] = cls
        cls.name = name
        return cls

    return wrap


def list_aggregators() -> list[str]:
    """Registered aggregator names, sorted."""
    return sorted(_AGGREGATORS)


def build_aggregator(name: str, in_dim: int, n_outputs: int, **options: Any) -> MILAggregator:
    """Build the aggregator registered as ``name`` for ``in_dim``-dimensional patches and ``n_outputs`` scores."""
    cls = _AGGREGATORS.get(name)
    if cls is None:
        raise ModelError(f"unknown MIL aggregator {name!r}; choose one of {', '.join(list_aggregators())}")
    try:
        return cls(in_dim, n_outputs, **options)
    except TypeError as exc:
        raise ModelError(f"aggregator {name!r}: bad options {options} ({exc})") from exc


@dataclass(frozen=True)
class MILOutput:
    """What an aggregator returns for one bag."""

    embedding: Tensor  # (K,) slide embedding (the slide signature)
    scores: Tensor     # (C,) head outputs: class logits, Cox risk, or discrete-time hazard logits
    attention: Tensor  # (N,) non-negative, sums to 1, in the bag's patch order
    hidden: Tensor     # (N, H) encoded patches, for instance-level auxiliary losses


class MILAggregator(nn.Module):
    """Base aggregator: standardise → encoder → ``pool`` → linear head. Subclasses implement ``pool``.

    Patch features are standardised per dimension with statistics of the training patches (buffers, so they
    travel in the checkpoint; identity until ``set_feature_scaling``). Backbone outputs range from ~1e-6
    (random weights) to ~1e2 in scale; without this, attention logits start flat and stay near uniform.
    """

    name: str

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        if min(in_dim, n_outputs, hidden_dim) < 1 or not 0 <= dropout < 1:
            raise ModelError(f"bad aggregator sizes: in_dim={in_dim}, n_outputs={n_outputs}, "
                             f"hidden_dim={hidden_dim}, dropout={dropout}")
        self.in_dim, self.n_outputs, self.embed_dim = in_dim, n_outputs, hidden_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_scale", torch.ones(in_dim))
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden_dim, n_outputs)

    def set_feature_scaling(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs as ``(x - mean) / std``; dimensions that never vary are only centred."""
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, features: Tensor, coords: Tensor) -> MILOutput:
        """Aggregate one bag: ``features`` (N, in_dim), ``coords`` (N, 2) level-0 (x, y) of each patch."""
        if features.ndim != 2 or features.shape[1] != self.in_dim or len(features) == 0:
            raise ModelError(f"{self.name}: expected a non-empty bag of shape (N, {self.in_dim}), got {tuple(features.shape)}")
        hidden = self.encoder((features - self.feature_mean) / self.feature_scale)
        embedding, attention = self.pool(hidden, coords)
        return MILOutput(embedding, self.head(embedding), attention, hidden)

    def pool(self, hidden: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """Reduce encoded patches (N, H) to a slide embedding (K,) and an attention (N,) summing to 1."""
        raise NotImplementedError

    def auxiliary_loss(self, output: MILOutput, label: int | None) -> Tensor:
        """An extra training loss for a bag of class ``label`` (None for survival); zero unless overridden."""
        return output.scores.new_zeros(())


class MILEnsemble(nn.Module):
    """Aggregators of one kind trained apart (different seeds) and applied as one: the mean of their scores and
    of their attention, their embeddings side by side. Averaging cancels the seed-to-seed spread of a model
    trained on a small cohort, which is as large as the differences between recipes."""

    def __init__(self, members: Sequence[MILAggregator]) -> None:
        super().__init__()
        if len({(m.name, m.in_dim, m.n_outputs) for m in members}) != 1:
            raise ModelError("an ensemble needs one or more members of one aggregator, in_dim and n_outputs")
        self.members = nn.ModuleList(members)
        self.name, self.in_dim, self.n_outputs = members[0].name, members[0].in_dim, members[0].n_outputs
        self.embed_dim = sum(m.embed_dim for m in members)

    def forward(self, features: Tensor, coords: Tensor) -> MILOutput:
        outputs = [member(features, coords) for member in self.members]
        return MILOutput(torch.cat([o.embedding for o in outputs]), torch.stack([o.scores for o in outputs]).mean(0),
                         torch.stack([o.attention for o in outputs]).mean(0), outputs[0].hidden)


MILModel = MILAggregator | MILEnsemble  # what one training run yields


@register_aggregator("mean")
class MeanPool(MILAggregator):
    """Mean of the encoded patches: the instance-agnostic baseline; attention is uniform."""

    def pool(self, hidden: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        n = len(hidden)
        return hidden.mean(0), hidden.new_full((n,), 1.0 / n)


@register_aggregator("max")
class MaxPool(MILAggregator):
    """Element-wise max of the encoded patches; a patch's attention is its share of the maxima it holds."""

    def pool(self, hidden: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        embedding = hidden.max(0).values
        holds = (hidden == embedding).float()  # ties share a dimension equally, so order cannot matter
        attention = (holds / holds.sum(0)).mean(1)
        return embedding, attention


class AttentionScorer(nn.Module):
    """Ilse et al. (2018) attention logits: w·tanh(Vh), or gated w·(tanh(Vh) ⊙ sigmoid(Uh))."""

    def __init__(self, hidden_dim: int, attention_dim: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.tanh = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.weight = nn.Linear(attention_dim, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        a = self.tanh(hidden)
        if self.gate is not None:
            a = a * self.gate(hidden)
        return self.weight(a).squeeze(-1)


@register_aggregator("abmil")
class ABMIL(MILAggregator):
    """Attention-based MIL (Ilse et al. 2018): softmax attention over patches, attention-weighted mean."""

    gated = False

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 256, dropout: float = 0.25,
                 attention_dim: int = 128) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim, dropout)
        self.attention = AttentionScorer(hidden_dim, attention_dim, dropout, self.gated)

    def pool(self, hidden: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        attention = torch.softmax(self.attention(hidden), dim=0)
        return attention @ hidden, attention


@register_aggregator("gated-abmil")
class GatedABMIL(ABMIL):
    """ABMIL with the tanh × sigmoid gated attention of Ilse et al. (2018)."""

    gated = True


@register_aggregator("clam-sb")
class CLAMSB(GatedABMIL):
    """CLAM single-branch (Lu et al. 2021): gated attention plus instance clustering of the top/bottom-k patches.

    For a bag of class c, the ``k`` most attended patches are taught to be class c evidence and the ``k``
    least attended to be not, by a per-class instance classifier; with more than two classes the top-k of
    every other class's branch are also taught to be negative. Survival bags (no class) get no such loss.
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 256, dropout: float = 0.25,
                 attention_dim: int = 128, k: int = 8) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim, dropout, attention_dim)
        if k < 1:
            raise ModelError(f"clam-sb: k must be at least 1, got {k}")
        self.k = k
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_outputs))

    def auxiliary_loss(self, output: MILOutput, label: int | None) -> Tensor:
        k = min(self.k, len(output.attention) // 2)
        if label is None or k == 0:
            return output.scores.new_zeros(())
        order = torch.argsort(output.attention, descending=True, stable=True)
        top, bottom = output.hidden[order[:k]], output.hidden[order[-k:]]
        losses = [_instance_loss(self.instance_classifiers[label], torch.cat([top, bottom]), [1] * k + [0] * k)]
        if self.n_outputs > 2:
            losses += [_instance_loss(clf, top, [0] * k) for c, clf in enumerate(self.instance_classifiers) if c != label]
        return torch.stack(losses).mean()


def _instance_loss(classifier: nn.Module, hidden: Tensor, targets: list[int]) -> Tensor:
    """Cross-entropy of an instance classifier on ``hidden`` patches against 0/1 ``targets``."""
    return F.cross_entropy(classifier(hidden), torch.tensor(targets, device=hidden.device))


def nystrom_attention(q: Tensor, k: Tensor, v: Tensor, landmarks: int, pinv_iterations: int = 6) -> Tensor:
    """Softmax attention softmax(q kᵀ) v approximated with Nyström landmarks (Xiong et al. 2021).

    ``q, k, v`` are (heads, n, d) with ``q`` already scaled. Landmarks are means of contiguous segments of
    the sequence, so memory is O(n · landmarks) instead of O(n²).
    """
    q_l, k_l = _segment_means(q, landmarks), _segment_means(k, landmarks)
    kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
    kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
    kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
    return kernel_1 @ (_iterative_pinv(kernel_2, pinv_iterations) @ (kernel_3 @ v))  # O(n·m·d), never (n, m)·(m, m)


def _segment_means(x: Tensor, segments: int) -> Tensor:
    """Means of at most ``segments`` contiguous, non-empty, equal-length (but the last) segments of x (h, n, d)."""
    h, n, d = x.shape
    length = math.ceil(n / segments)
    count = math.ceil(n / length)
    padded = F.pad(x, (0, 0, 0, count * length - n))
    sizes = torch.full((count, 1), float(length), dtype=x.dtype, device=x.device)
    sizes[-1] = n - (count - 1) * length
    return padded.reshape(h, count, length, d).sum(2) / sizes


def _iterative_pinv(x: Tensor, iterations: int) -> Tensor:
    """Moore–Penrose pseudo-inverse of (h, m, m) matrices by the Razavi et al. iteration, as in Nyströmformer."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    z = x.transpose(-1, -2) / (x.abs().sum(-1).amax() * x.abs().sum(-2).amax())
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromSelfAttention(nn.Module):
    """Multi-head self-attention, exact up to ``landmarks`` tokens and Nyström-approximated beyond."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attend over x (n, dim); also return the exact attention of token 0 (the class token), (n,)."""
        n, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        q = q * self.scale
        if n <= self.landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            out = nystrom_attention(q, k, v, self.landmarks, self.pinv_iterations)
        cls_attention = torch.softmax(q[:, :1] @ k.transpose(-1, -2), dim=-1).mean(0).squeeze(0)
        return self.out(out.transpose(0, 1).reshape(n, dim)), cls_attention


class TransLayer(nn.Module):
    """Pre-norm residual Nyström self-attention block of TransMIL."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromSelfAttention(dim, heads, landmarks, pinv_iterations, dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        update, cls_attention = self.attention(self.norm(x))
        return x + update, cls_attention


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions over the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x is (1 + side², dim): the class token, then the grid in row-major order."""
        grid = x[1:].T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([x[:1], grid.flatten(2).squeeze(0).T])


@register_aggregator("transmil")
class TransMIL(MILAggregator):
    """TransMIL (Shao et al. 2021): class token, two Nyström transformer layers around a PPEG position encoding.

    Patches are put in raster order of their (y, x) coordinates, so the output depends on where patches
    are, not on the order they are listed in (coordinates must be unique), then wrapped onto a square grid,
    padded by repeating the first patches. The attention is the class token's exact softmax attention in
    the last layer, averaged over heads, with padded copies folded back onto their patch.
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 256, dropout: float = 0.25,
                 heads: int = 8, landmarks: int = 256, pinv_iterations: int = 6) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim, dropout)
        if hidden_dim % heads or landmarks < 1 or pinv_iterations < 1:
            raise ModelError(f"transmil: hidden_dim {hidden_dim} must be a multiple of heads {heads}; "
                             f"landmarks ({landmarks}) and pinv_iterations ({pinv_iterations}) at least 1")
        self.cls_token = nn.Parameter(torch.randn(1, hidden_dim))
        self.layers = nn.ModuleList(TransLayer(hidden_dim, heads, landmarks, pinv_iterations, dropout) for _ in range(2))
        self.ppeg = PPEG(hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)

    def pool(self, hidden: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        n = len(hidden)
        order = raster_order(coords)
        side = math.ceil(math.sqrt(n))
        slots = torch.arange(side * side, device=hidden.device) % n  # grid slot → position in raster order
        x = torch.cat([self.cls_token, hidden[order][slots]])
        x, _ = self.layers[0](x)
        x, cls_attention = self.layers[1](self.ppeg(x, side))
        in_raster = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, slots, cls_attention[1:])
        attention = torch.empty_like(in_raster)
        attention[order] = in_raster / in_raster.sum()
        return self.norm(x[0]), attention


def raster_order(coords: Tensor) -> Tensor:
    """Indices that sort patches by (y, x) of their level-0 coordinates."""
    x, y = coords[:, 0].long(), coords[:, 1].long()
    return torch.argsort((y - y.min()) * (x.max() - x.min() + 1) + (x - x.min()), stable=True)
