"""The MIL stage's config: everything that defines a training run, validated on construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pathomics.errors import ConfigError

TASKS = ("classification", "survival")
SCHEDULES = ("constant", "cosine")
SURVIVAL_LOSSES = ("cox", "discrete")
TIES = ("efron", "breslow")
AGGREGATES = ("mean", "median", "max", "none")  # how a patient's slide predictions are combined; none: slide level
ENSEMBLE_BAGS = 500  # the automatic ensemble trains members until they have seen about this many bags in all
MAX_ENSEMBLE = 5


@dataclass(frozen=True)
class MILConfig:
    """Everything that defines a MIL training run; validated on construction, saved with every output."""

    task: str = "classification"
    model: str = "abmil"
    folds: int = 5
    epochs: int = 40
    patience: int = 8
    min_epochs: int = 10           # no early stop before this epoch (attention needs time to lock on)
    batch_size: int = 16           # bags per optimiser step; the risk set of the Cox loss
    lr: float = 3e-3               # peak learning rate (after warm-up)
    weight_decay: float = 1e-2     # AdamW's decoupled weight decay
    hidden_dim: int = 256
    dropout: float = 0.25
    model_options: tuple[tuple[str, Any], ...] = ()  # aggregator-specific, e.g. (("k", 8),) for clam-sb
    max_patches: int | None = None  # random subset of patches per bag and epoch while training
    instance_dropout: float = 0.2  # bag augmentation: fraction of patches dropped per bag and step (training only)
    schedule: str = "cosine"       # learning rate after warm-up: "constant" or "cosine" decay
    warmup_epochs: int = 3         # linear learning-rate warm-up
    val_fraction: float = 0.0      # patients of each training fold held out for early stopping (0: the full schedule)
    ensemble: int | None = None    # models per fold, seeds apart, averaged; None: ensemble_size's rule for the cohort
    class_weights: bool = True
    classes: tuple[str, ...] | None = None  # class order, best to worst; default: sorted labels
    survival_loss: str = "cox"     # "cox" (partial likelihood) or "discrete" (discrete-time NLL)
    ties: str = "efron"            # Cox tie handling: "efron" or "breslow"
    time_bins: int = 4             # bins of the discrete-time loss
    aux_weight: float = 0.3        # weight of the instance-clustering loss (clam-sb)
    grade_col: str | None = None   # labels column of a grade: adds an auxiliary grade head (multitask)
    grade_weight: float = 0.5      # weight of the grade head's cross-entropy beside the main loss
    aggregate: str = "mean"        # how a patient's slide predictions are combined for metrics, or "none" (slide level)
    refit: bool = True             # after cross-validation, fit a final model on all patients for predict
    seed: int = 0
    device: str = "auto"           # "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N"
    slide_col: str = "slide_id"
    patient_col: str = "patient_id"
    label_col: str = "label"
    time_col: str = "time"
    event_col: str = "event"

    def __post_init__(self) -> None:
        from pathomics.device import is_device_name  # torch: loaded only when a config is built
        from pathomics.mil.aggregators import list_aggregators

        checks = {
            f"task must be one of {TASKS}": self.task in TASKS,
            f"model must be one of {list_aggregators()}": self.model in list_aggregators(),
            "folds must be at least 2 (use refit for a model on all patients)": self.folds >= 2,
            "epochs, patience, min_epochs, batch_size and hidden_dim must be positive":
                min(self.epochs, self.patience, self.min_epochs, self.batch_size, self.hidden_dim) >= 1,
            "lr must be positive; weight_decay, aux_weight and grade_weight non-negative":
                self.lr > 0 and min(self.weight_decay, self.aux_weight, self.grade_weight) >= 0,
            "dropout must be in [0, 1)": 0 <= self.dropout < 1,
            "max_patches must be None or positive": self.max_patches is None or self.max_patches >= 1,
            "instance_dropout must be in [0, 1)": 0 <= self.instance_dropout < 1,
            f"schedule must be one of {SCHEDULES}": self.schedule in SCHEDULES,
            "warmup_epochs must be non-negative": self.warmup_epochs >= 0,
            "ensemble must be None or positive": self.ensemble is None or self.ensemble >= 1,
            "val_fraction must be in [0, 0.5]": 0 <= self.val_fraction <= 0.5,
            f"survival_loss must be one of {SURVIVAL_LOSSES}": self.survival_loss in SURVIVAL_LOSSES,
            f"ties must be one of {TIES}": self.ties in TIES,
            "the Cox loss needs batch_size of at least 2 bags":
                not (self.task == "survival" and self.survival_loss == "cox" and self.batch_size < 2),
            "time_bins must be at least 2": self.time_bins >= 2,
            f"aggregate must be one of {AGGREGATES}": self.aggregate in AGGREGATES,
            "device must be auto, cpu, cuda or cuda:N": is_device_name(self.device),
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ConfigError("invalid MIL config: " + "; ".join(failed))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MILConfig:
        """The config saved by ``to_dict`` (JSON turns tuples into lists; they are turned back)."""
        values = dict(values)
        values["model_options"] = tuple(tuple(pair) for pair in values.get("model_options", ()))
        if values.get("classes") is not None:
            values["classes"] = tuple(values["classes"])
        return cls(**values)

    def ensemble_size(self, n_train: int) -> int:
        """Models to train on ``n_train`` bags: ``ensemble`` when set, else enough seeds that the members see
        about ``ENSEMBLE_BAGS`` bags together (1 to ``MAX_ENSEMBLE``). Small cohorts gain most from averaging
        (their seed-to-seed spread is largest) and cost least to train several times."""
        if self.ensemble is not None:
            return self.ensemble
        return min(MAX_ENSEMBLE, max(1, round(ENSEMBLE_BAGS / max(n_train, 1))))

    def aggregator_options(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "dropout": self.dropout, **dict(self.model_options)}
