"""Training of MIL aggregators: objectives (classification, Cox and discrete-time survival), the epoch loop
with early stopping and out-of-fold metrics (losses in ``pathomics.losses``, folds in ``pathomics.folds``).

A survival loss is a property of a set of bags, never of one: the Cox partial likelihood compares each
event with everyone still at risk, so bags are trained in batches of several and the risk set is the batch.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pathomics.errors import DataWarning, ModelError
from pathomics.losses import cox_partial_nll, discrete_time_nll
from pathomics.mil.aggregators import MILAggregator, MILModel, MILOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    """Per-slide targets, indexed like the cohort's bags: class indices, or follow-up times and events."""

    label: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    grade: np.ndarray | None = None  # class indices of an auxiliary grade (multitask training)

    def arrays(self) -> list[np.ndarray]:
        """The target arrays that are set, in a fixed order."""
        return [a for a in (self.label, self.time, self.event, self.grade) if a is not None]


class Objective(ABC):
    """What the head's scores mean: how many there are, their loss, and the risk (higher = worse) they imply."""

    n_outputs: int

    @abstractmethod
    def loss(self, scores: Tensor, targets: Targets, index: np.ndarray) -> Tensor:
        """Loss of ``scores`` (B, n_outputs) for the bags ``index`` of the cohort."""

    @abstractmethod
    def risk(self, scores: Tensor) -> Tensor:
        """Risk (B,), higher = worse, from scores (B, n_outputs)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Plain values that rebuild this objective with ``objective_from_state`` (saved in checkpoints)."""

    def instance_label(self, targets: Targets, i: int) -> int | None:
        """The class of bag ``i`` for instance-level auxiliary losses (None when there is no class)."""
        return None

    def informative(self, targets: Targets, index: np.ndarray) -> bool:
        """Whether a batch of bags ``index`` carries any signal for this loss."""
        return True

    grades: tuple[str, ...] = ()

    def grade_probabilities(self, scores: Tensor) -> Tensor | None:
        """Predicted grade probabilities (B, len(grades)) of a multitask objective; None without a grade head."""
        return None

    def primary(self) -> Objective:
        """The objective of the main task (itself, unless this one wraps it with an auxiliary head)."""
        return self


class Classification(Objective):
    """Weighted cross-entropy over ``classes``; risk is the expected class rank scaled to [0, 1]
    (for two classes, the probability of the second)."""

    def __init__(self, classes: Sequence[str], weights: Sequence[float] | None = None) -> None:
        self.classes = tuple(classes)
        self.n_outputs = len(self.classes)
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def loss(self, scores: Tensor, targets: Targets, index: np.ndarray) -> Tensor:
        weights = None if self.weights is None else self.weights.to(scores.device)
        return F.cross_entropy(scores, torch.as_tensor(targets.label[index], device=scores.device), weight=weights)

    def probabilities(self, scores: Tensor) -> Tensor:
        return torch.softmax(scores, dim=-1)

    def risk(self, scores: Tensor) -> Tensor:
        ranks = torch.linspace(0, 1, self.n_outputs, device=scores.device)
        return self.probabilities(scores) @ ranks

    def state(self) -> dict[str, Any]:
        return {"kind": "classification", "classes": list(self.classes)}

    def instance_label(self, targets: Targets, i: int) -> int | None:
        return int(targets.label[i])


class CoxSurvival(Objective):
    """Negative Cox partial log-likelihood over the batch, with Efron or Breslow handling of tied times.

    The log-hazard of a Cox model has an arbitrary origin and scale, so risk is the log-hazard standardised
    over the model's training bags: out-of-fold risks of different fold models then share one scale.
    """

    n_outputs = 1

    def __init__(self, ties: str = "efron", center: float = 0.0, scale: float = 1.0) -> None:
        self.ties, self.center, self.scale = ties, center, scale

    def loss(self, scores: Tensor, targets: Targets, index: np.ndarray) -> Tensor:
        time = torch.as_tensor(targets.time[index], device=scores.device)
        event = torch.as_tensor(targets.event[index], device=scores.device)
        return cox_partial_nll(scores[:, 0], time, event, self.ties)

    def risk(self, scores: Tensor) -> Tensor:
        return (scores[:, 0] - self.center) / self.scale

    def standardized(self, scores: Tensor) -> CoxSurvival:
        """This objective with risk standardised over ``scores``, the training bags' head outputs."""
        log_hazard = scores[:, 0].double()
        scale = max(log_hazard.std().item(), 1e-8) if len(log_hazard) > 1 else 1.0
        return CoxSurvival(self.ties, log_hazard.mean().item(), scale)

    def informative(self, targets: Targets, index: np.ndarray) -> bool:
        return len(index) > 1 and bool(targets.event[index].any())  # an event and someone to compare it with

    def state(self) -> dict[str, Any]:
        return {"kind": "cox", "ties": self.ties, "center": self.center, "scale": self.scale}


class DiscreteSurvival(Objective):
    """Discrete-time survival NLL (Zadeh & Schmid 2020) on hazard logits over time bins cut at ``edges``.

    Risk is minus the expected number of bins survived, so higher means earlier failure.
    """

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = tuple(float(e) for e in edges)  # interior cut points; len(edges) + 1 bins
        self.n_outputs = len(self.edges) + 1

    def loss(self, scores: Tensor, targets: Targets, index: np.ndarray) -> Tensor:
        bins = torch.as_tensor(np.searchsorted(self.edges, targets.time[index], side="right"), device=scores.device)
        event = torch.as_tensor(targets.event[index], device=scores.device, dtype=scores.dtype)
        return discrete_time_nll(scores, bins, event)

    def risk(self, scores: Tensor) -> Tensor:
        return -torch.exp(torch.cumsum(F.logsigmoid(-scores), dim=-1)).sum(-1)

    def state(self) -> dict[str, Any]:
        return {"kind": "discrete", "edges": list(self.edges)}


class WithGrade(Objective):
    """A main objective plus an auxiliary grade head (seed S5's multitask model): the head's last
    ``len(grades)`` outputs are grade logits, trained with cross-entropy weighted by ``weight`` beside the main
    loss. Sharing the slide embedding, the grade task steers attention toward grade-defining patches; the
    predicted grade probabilities feed grade-guided fusion (``pathomics.survival.grade_fusion``)."""

    def __init__(self, base: Objective, grades: Sequence[str], weight: float) -> None:
        self.base, self.grades, self.weight = base, tuple(grades), weight
        self.n_outputs = base.n_outputs + len(self.grades)

    def loss(self, scores: Tensor, targets: Targets, index: np.ndarray) -> Tensor:
        grade = torch.as_tensor(targets.grade[index], device=scores.device)
        main = self.base.loss(scores[:, :self.base.n_outputs], targets, index)
        return main + self.weight * F.cross_entropy(scores[:, self.base.n_outputs:], grade)

    def risk(self, scores: Tensor) -> Tensor:
        return self.base.risk(scores[:, :self.base.n_outputs])

    def probabilities(self, scores: Tensor) -> Tensor:
        return self.base.probabilities(scores[:, :self.base.n_outputs])

    def grade_probabilities(self, scores: Tensor) -> Tensor:
        return torch.softmax(scores[:, self.base.n_outputs:], dim=-1)

    def standardized(self, scores: Tensor) -> WithGrade:
        """The wrapped Cox objective standardised over the training bags' scores (see CoxSurvival)."""
        return WithGrade(self.base.standardized(scores[:, :self.base.n_outputs]), self.grades, self.weight)

    def primary(self) -> Objective:
        return self.base

    def instance_label(self, targets: Targets, i: int) -> int | None:
        return self.base.instance_label(targets, i)

    def informative(self, targets: Targets, index: np.ndarray) -> bool:
        return True  # the grade loss is informative even in a batch without events

    def state(self) -> dict[str, Any]:
        return {"kind": "grade", "base": self.base.state(), "grades": list(self.grades), "weight": self.weight}


def objective_from_state(state: dict[str, Any]) -> Objective:
    """Rebuild an objective saved with ``Objective.state``."""
    kind = state.get("kind")
    if kind == "grade":
        return WithGrade(objective_from_state(state["base"]), state["grades"], state["weight"])
    if kind == "classification":
        return Classification(state["classes"])
    if kind == "cox":
        return CoxSurvival(state["ties"], state["center"], state["scale"])
    if kind == "discrete":
        return DiscreteSurvival(state["edges"])
    raise ModelError(f"checkpoint has an unknown objective {kind!r}; was it written by a newer pathomics?")


def class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """Inverse-frequency weights n / (C · n_c), so every class carries equal total weight."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return (len(labels) / (n_classes * np.maximum(counts, 1))).tolist()


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation knobs the epoch loop needs (a view of the stage config)."""

    epochs: int
    patience: int
    min_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    max_patches: int | None
    aux_weight: float
    seed: int
    warmup_epochs: int = 0
    schedule: str = "constant"     # "constant" or "cosine" (decay to ``min_lr_ratio`` · lr after warm-up)
    instance_dropout: float = 0.0  # fraction of each training bag's patches dropped per step


@dataclass
class FitResult:
    """The outcome of one training run: the best epoch (1-based) and the loss history."""

    best_epoch: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


BagLoader = Callable[[int], tuple[np.ndarray, np.ndarray]]  # cohort index → (features (N, D), coords (N, 2))


def feature_statistics(load: BagLoader, index: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation over every patch of bags ``index`` (float64 sums)."""
    total, squares, n = 0.0, 0.0, 0
    for i in index:
        features = load(i)[0].astype(np.float64)
        total, squares, n = total + features.sum(0), squares + np.square(features).sum(0), n + len(features)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def fit(model: MILAggregator, objective: Objective, targets: Targets, load: BagLoader,
        train: np.ndarray, val: np.ndarray, settings: TrainConfig, device: torch.device,
        on_epoch: Callable[[int], None] | None = None) -> FitResult:
    """Train ``model`` on bags ``train`` with AdamW; after ``min_epochs``, stop early once the loss on ``val``
    has not improved for ``patience`` epochs, and restore the best weights (with no ``val``, run all epochs).
    ``on_epoch(e)`` is called as epoch ``e`` ends (progress display).

    MIL training often sits on a plateau until attention finds the informative patches, hence ``min_epochs``.
    """
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, settings=settings))
    result, best_state, best = FitResult(best_epoch=settings.epochs), None, math.inf
    for epoch in range(1, settings.epochs + 1):
        result.train_loss.append(_train_epoch(model, objective, targets, load, rng.permutation(train),
                                              settings, rng, optimizer, device))
        scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch)
        if len(val) == 0:
            continue
        val_loss = float(objective.loss(_scores(model, load, val, device), targets, val))
        result.val_loss.append(val_loss)
        log.debug("epoch %d: train %.4f, validation %.4f", epoch, result.train_loss[-1], val_loss)
        if val_loss < best - 1e-6:
            best, result.best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch >= settings.min_epochs and epoch - result.best_epoch >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


MIN_LR_RATIO = 0.05  # the cosine schedule ends at this fraction of the peak learning rate


def lr_factor(epoch: int, settings: TrainConfig) -> float:
    """Multiplier of the peak learning rate in (0-based) ``epoch``: a linear warm-up over ``warmup_epochs``
    (Adam's early steps are large while its moment estimates settle), then constant or a cosine decay to
    ``MIN_LR_RATIO`` at the last epoch (large steps early to find the informative instances, small ones late)."""
    if epoch < settings.warmup_epochs:
        return (epoch + 1) / (settings.warmup_epochs + 1)
    if settings.schedule == "constant":
        return 1.0
    span = max(settings.epochs - 1 - settings.warmup_epochs, 1)
    progress = min((epoch - settings.warmup_epochs) / span, 1.0)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def _train_epoch(model: MILAggregator, objective: Objective, targets: Targets, load: BagLoader, order: np.ndarray,
                 settings: TrainConfig, rng: np.random.Generator, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> float:
    """One pass over ``order`` in batches of bags; returns the mean batch loss."""
    model.train()
    losses = []
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        if not objective.informative(targets, batch):
            continue
        outputs = [model(*_to_tensors(drop_instances(*_subsample(*load(i), settings.max_patches, rng),
                                                     settings.instance_dropout, rng), device)) for i in batch]
        loss = objective.loss(torch.stack([o.scores for o in outputs]), targets, batch)
        if settings.aux_weight:
            aux = [model.auxiliary_loss(o, objective.instance_label(targets, i)) for o, i in zip(outputs, batch)]
            loss = loss + settings.aux_weight * torch.stack(aux).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else math.nan


def _subsample(features: np.ndarray, coords: np.ndarray, max_patches: int | None,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of at most ``max_patches`` patches (all of them when None or the bag is small)."""
    if max_patches is None or len(features) <= max_patches:
        return features, coords
    keep = np.sort(rng.choice(len(features), max_patches, replace=False))
    return features[keep], coords[keep]


def drop_instances(features: np.ndarray, coords: np.ndarray, rate: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bag augmentation: each patch dropped with probability ``rate``, at least one kept. A new view of every
    bag each epoch, so attention cannot rest on one memorised instance (training only; never in ``predict``)."""
    if rate <= 0 or len(features) < 2:
        return features, coords
    keep = rng.random(len(features)) >= rate
    if not keep.any():
        keep[rng.integers(len(features))] = True
    return features[keep], coords[keep]


def _to_tensors(bag: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    features, coords = bag
    return torch.from_numpy(features).to(device), torch.from_numpy(coords).to(device)


def _scores(model: MILModel, load: BagLoader, index: np.ndarray, device: torch.device) -> Tensor:
    """Head scores (len(index), C) of whole bags in evaluation mode."""
    return torch.stack([o.scores for o in predict(model, load, index, device)])


@torch.no_grad()
def predict(model: MILModel, load: BagLoader, index: Sequence[int], device: torch.device) -> list[MILOutput]:
    """Evaluation-mode outputs of whole bags (no subsampling, no dropout)."""
    model.eval()
    return [model(*_to_tensors(load(i), device)) for i in index]


def evaluate(predictions: np.ndarray, targets: Targets, index: np.ndarray, groups: np.ndarray,
             how: str = "mean") -> dict[str, float]:
    """Metrics of per-slide ``predictions`` for bags ``index``, combined within each group (patient or slide) by
    ``how`` (mean, median or max, as survival combines a patient's slides).

    Classification (``predictions`` are class probabilities (n, C)): AUC, one-vs-rest beyond two classes,
    and balanced accuracy. Survival (``predictions`` are risks (n,)): Harrell's C-index.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    _, first, inverse = np.unique(groups[index], return_index=True, return_inverse=True)
    first = index[first]
    if targets.label is not None:
        probs, y = _group_reduce(predictions, inverse, len(first), how), targets.label[first]
        if len(np.unique(y)) < 2:
            auc = math.nan
        elif probs.shape[1] == 2:
            auc = roc_auc_score(y, probs[:, 1])
        else:
            auc = roc_auc_score(y, probs, multi_class="ovr", labels=np.arange(probs.shape[1]))
        return {"auc": float(auc), "balanced_accuracy": float(balanced_accuracy_score(y, probs.argmax(1))), "n": len(y)}
    from pathomics.survival.metrics import concordance

    risk, event = _group_reduce(predictions[:, None], inverse, len(first), how)[:, 0], targets.event[first]
    c_index = concordance(targets.time[first], event, risk)
    if math.isnan(c_index):
        warnings.warn(f"C-index undefined on {len(first)} {('patients' if len(first) > 1 else 'patient')} with "
                      f"{int(event.sum())} event(s): no admissible pairs; it is recorded as NaN", DataWarning, stacklevel=2)
    return {"c_index": c_index, "n": len(first), "events": int(event.sum())}


def _group_reduce(values: np.ndarray, inverse: np.ndarray, n_groups: int, how: str = "mean") -> np.ndarray:
    """The mean, median or max of the rows of ``values`` (n, k) per group label in ``inverse``."""
    if how == "mean":
        sums = np.zeros((n_groups, values.shape[1]))
        np.add.at(sums, inverse, values)
        return sums / np.bincount(inverse, minlength=n_groups)[:, None]
    reduce = {"median": np.median, "max": np.max}[how]
    return np.stack([reduce(values[inverse == group], axis=0) for group in range(n_groups)])
