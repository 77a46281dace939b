"""A GRU that encodes each patient's marker history up to a landmark, fused with static (slide) features,
trained with the Cox partial likelihood on the time from the landmark.

The encoder sees only what it is given: `pathomics.survival.longitudinal.landmark_set` cuts every history
at the landmark, and the standardisation is fitted on the training patients' histories, so no value measured
after the landmark (nor any test patient) shapes a prediction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from pathomics.losses import cox_partial_nll


@dataclass(frozen=True)
class SequenceConfig:
    """Encoder size and the full-batch optimisation (Adam) of the Cox loss."""

    hidden: int
    epochs: int
    lr: float
    weight_decay: float
    seed: int


class MarkerGRU(nn.Module):
    """Visits (standardised markers, their change since the first visit, time before the landmark, gap since the
    last visit) -> GRU final state =
    the embedding; a linear Cox head on the embedding concatenated with the static features gives the log-hazard."""

    def __init__(self, n_inputs: int, n_static: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(n_inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden + n_static, 1)

    def forward(self, steps: Tensor, lengths: Tensor, static: Tensor) -> tuple[Tensor, Tensor]:
        """Log-hazard (B,) and embedding (B, hidden) of padded visits (B, T, inputs) with ``lengths`` (B,)."""
        packed = pack_padded_sequence(steps, lengths, batch_first=True, enforce_sorted=False)
        embedding = self.gru(packed)[1][-1]
        return self.head(torch.cat([embedding, static], dim=1))[:, 0], embedding


@dataclass
class FittedSequence:
    """A trained encoder with the landmark and the training standardisation of markers and static features."""

    model: MarkerGRU
    landmark: float
    marker_mean: np.ndarray
    marker_scale: np.ndarray
    static_mean: np.ndarray
    static_scale: np.ndarray
    losses: list[float] = field(default_factory=list)


def fit_sequence(
    histories: Sequence[np.ndarray],
    static: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    landmark: float,
    settings: SequenceConfig,
) -> FittedSequence:
    """Train on ``histories`` (per patient: (visits, 1 + markers), time first, all at or before ``landmark``),
    ``static`` (patients, k) and the outcomes from the landmark; seeded, on the CPU, the global RNG untouched."""
    visits = np.concatenate(histories)[:, 1:]
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(settings.seed)
        fitted = FittedSequence(
            model=MarkerGRU(2 * visits.shape[1] + 2, static.shape[1], settings.hidden),
            landmark=landmark,
            marker_mean=visits.mean(0),
            marker_scale=_scale(visits),
            static_mean=static.mean(0),
            static_scale=_scale(static),
        )
        steps, lengths, static_t = _inputs(fitted, histories, static)
        time_t, event_t = torch.as_tensor(time, dtype=torch.float32), torch.as_tensor(event, dtype=torch.float32)
        optimiser = torch.optim.Adam(fitted.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        fitted.model.train()
        for _ in range(settings.epochs):
            optimiser.zero_grad()
            loss = cox_partial_nll(fitted.model(steps, lengths, static_t)[0], time_t, event_t)
            loss.backward()
            optimiser.step()
            fitted.losses.append(float(loss.detach()))
    return fitted


def predict_sequence(
    fitted: FittedSequence, histories: Sequence[np.ndarray], static: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Log-hazard (patients,) and embedding (patients, hidden) at the landmark."""
    fitted.model.eval()
    with torch.inference_mode(), _one_thread():
        risk, embedding = fitted.model(*_inputs(fitted, histories, static))
    return risk.double().numpy(), embedding.double().numpy()


def _inputs(
    fitted: FittedSequence, histories: Sequence[np.ndarray], static: np.ndarray
) -> tuple[Tensor, Tensor, Tensor]:
    """Padded visit features (B, T, 2 markers + 2), lengths (B,) and standardised static features (B, k)."""
    steps = []
    for history in histories:
        time = history[:, 0]
        markers = (history[:, 1:] - fitted.marker_mean) / fitted.marker_scale
        before = (time - fitted.landmark) / fitted.landmark
        gap = np.diff(time, prepend=time[0]) / fitted.landmark
        change = markers - markers[0]
        steps.append(torch.as_tensor(np.column_stack([markers, change, before, gap]), dtype=torch.float32))
    lengths = torch.as_tensor([len(h) for h in histories], dtype=torch.int64)
    static_t = torch.as_tensor((static - fitted.static_mean) / fitted.static_scale, dtype=torch.float32)
    return pad_sequence(steps, batch_first=True), lengths, static_t


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: these tensors are tiny, and intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scale(values: np.ndarray) -> np.ndarray:
    """Column standard deviations, 1 where a column is constant (or there are no rows)."""
    scale = values.std(0) if len(values) else np.ones(values.shape[1])
    return np.where(scale > 1e-12, scale, 1.0)
