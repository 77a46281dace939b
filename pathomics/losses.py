"""Survival losses in torch, shared by MIL training and the landmark sequence model: the Cox partial
likelihood (Efron or Breslow ties) and the discrete-time hazard likelihood with its time bins."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pathomics.errors import ModelError


def cox_partial_nll(risk: Tensor, time: Tensor, event: Tensor, ties: str = "efron") -> Tensor:
    """Negative Cox log partial likelihood of ``risk`` (B,), averaged over events; 0 when there is none.

    Efron: each of the d events tied at time t sees the risk set minus l/d of the tied events' weight,
    l = 0..d-1; Breslow uses the full risk set for all of them.
    """
    events = event.bool()
    if not events.any():
        return risk.sum() * 0.0
    shifted = risk - risk.detach().max()  # the likelihood is invariant to a shift; this avoids overflow
    weight = torch.exp(shifted)
    event_time = time[events][:, None]
    at_risk = weight * (time[None, :] >= event_time)
    denominator = at_risk.sum(1)
    if ties == "efron":
        tied = (time[None, :] == event_time) & events[None, :]  # (E, B): events sharing each event's time
        d = tied.sum(1)
        earlier = torch.tril(tied[:, events], diagonal=-1).sum(1)  # l: rank of the event within its tie
        denominator = denominator - earlier / d * (weight * tied).sum(1)
    elif ties != "breslow":
        raise ModelError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    return -(shifted[events] - torch.log(denominator)).sum() / events.sum()


def discrete_time_nll(logits: Tensor, bins: Tensor, event: Tensor) -> Tensor:
    """Mean discrete-time NLL: an event in bin j survived bins < j and failed in j; a censoring survived bins ≤ j."""
    log_survive = F.logsigmoid(-logits)                        # log(1 - h_j)
    cum = F.pad(torch.cumsum(log_survive, dim=-1), (1, 0))     # log S before bin j, j = 0..K
    before = cum.gather(1, bins[:, None]).squeeze(1)
    through = cum.gather(1, bins[:, None] + 1).squeeze(1)
    failed = F.logsigmoid(logits).gather(1, bins[:, None]).squeeze(1)
    return -(event * (before + failed) + (1 - event) * through).mean()


def time_bin_edges(time: np.ndarray, event: np.ndarray, bins: int) -> list[float]:
    """Interior cut points at quantiles of the event times, so each bin holds about as many events."""
    cuts = np.unique(np.quantile(time[event.astype(bool)], np.linspace(0, 1, bins + 1)[1:-1]))
    return cuts.tolist()
