"""Decision curve analysis for survival outcomes (Vickers, Cronin, Elkin & Gonen 2008, BMC Med Inform Decis Mak 8:53).

At a time ``t`` and threshold probability ``p``, a patient is treated when their predicted probability of
recurrence by ``t`` is at least ``p``. Net benefit = true positives / n - false positives / n x p / (1 - p),
where among the m treated patients the true positives are ``m (1 - KM_treated(t))`` and the false positives
``m KM_treated(t)``: Kaplan-Meier, not a count, so patients censored before ``t`` are handled.
Treat-all uses the whole cohort's Kaplan-Meier; treat-none has net benefit 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathomics.survival.metrics import km_at


def thresholds_grid(spec: Sequence[float]) -> np.ndarray:
    """Threshold probabilities from ``(low, high, step)``, ends included."""
    low, high, step = spec
    return np.round(np.arange(low, high + step / 2, step), 10)


def net_benefit(
    time: np.ndarray, event: np.ndarray, event_probability: np.ndarray, t: float, thresholds: np.ndarray
) -> np.ndarray:
    """Net benefit at ``t`` of treating the patients whose predicted recurrence probability is >= each threshold.

    The treated patients are the ``k`` most probable, so one Kaplan-Meier per distinct ``k`` serves every
    threshold that treats ``k`` patients.
    """
    n, out = len(time), np.zeros(len(thresholds))
    order = np.argsort(-event_probability, kind="stable")
    treated = (event_probability[None, :] >= thresholds[:, None]).sum(axis=1)
    survival = {k: km_at(time[order[:k]], event[order[:k]], t) for k in np.unique(treated) if k > 0}
    for i, (p, k) in enumerate(zip(thresholds, treated, strict=True)):
        if k > 0:
            out[i] = k / n * ((1 - survival[k]) - survival[k] * p / (1 - p))
    return out


def treat_all(time: np.ndarray, event: np.ndarray, t: float, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating everyone: ``(1 - KM(t)) - KM(t) p / (1 - p)``."""
    survival = km_at(time, event, t)
    return (1 - survival) - survival * thresholds / (1 - thresholds)


def decision_curve(
    time: np.ndarray, event: np.ndarray, event_probability_at: np.ndarray, times: Sequence[float], thresholds: np.ndarray
) -> dict[str, dict[str, Any]]:
    """``{time: {threshold, model, treat_all, treat_none}}`` with one column of ``event_probability_at`` per time."""
    return {
        f"{t:.10g}": {
            "threshold": thresholds.tolist(),
            "model": net_benefit(time, event, event_probability_at[:, i], t, thresholds).tolist(),
            "treat_all": treat_all(time, event, t, thresholds).tolist(),
            "treat_none": 0.0,
        }
        for i, t in enumerate(times)
    }


def plot_decision_curves(curves: dict[str, dict[str, dict[str, Any]]], path: Path, time_unit: str, title: str = "") -> Path:
    """One panel per stated time: each model's net benefit beside treat-all and treat-none."""
    from pathomics.survival.figures import panels, save_figure

    times = list(next(iter(curves.values())))
    figure, axes = panels(len(times))
    for ax, t in zip(axes, times, strict=True):
        any_curve = next(iter(curves.values()))[t]
        threshold, everyone = np.asarray(any_curve["threshold"]), np.asarray(any_curve["treat_all"], dtype=float)
        for name, by_time in curves.items():
            ax.plot(threshold, by_time[t]["model"], label=name)
        ax.plot(threshold, everyone, color="grey", linestyle="--", label="treat all")
        ax.axhline(0.0, color="black", linewidth=1, label="treat none")
        top = max(float(np.nanmax(everyone)), max(float(np.nanmax(c[t]["model"])) for c in curves.values()))
        ax.set(
            title=f"{title}at {float(t):g} {time_unit}",
            xlabel="threshold probability of recurrence",
            ylabel="net benefit",
            ylim=(-0.05 * max(top, 0.01), 1.1 * max(top, 0.01)),
        )
        ax.legend(fontsize="small")
    return save_figure(figure, path)
