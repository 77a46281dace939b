"""Plots and the self-contained HTML report.

The HTML helpers are generic (sections of escaped tables and base64-embedded PNG images, no external
resources) so other stages can add their own sections; ``write_survival_report`` assembles the
prognosis report. Figures are drawn on matplotlib's Agg canvas without pyplot, so no global state.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pathomics.store import atomic_path

if TYPE_CHECKING:
    from pathomics.survival import SurvivalResult

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Section:
    """One titled part of a report; ``body`` is an HTML fragment built with the helpers below."""

    title: str
    body: str


def html_report(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """A complete, self-contained HTML page (inline CSS, images as data URIs)."""
    parts = [f"<h2>{html.escape(s.title)}</h2>\n{s.body}" for s in sections]
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style>'
    lead = f'<p class="note">{html.escape(subtitle)}</p>' if subtitle else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body><h1>{html.escape(title)}</h1>{lead}\n'
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def image_html(png: Path | bytes, alt: str) -> str:
    """An <img> with the PNG embedded as a base64 data URI."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    """An escaped HTML table; floats rounded to ``digits`` significant digits, missing values as an em dash."""

    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return "—" if not np.isfinite(value) else f"{value:.{digits}g}"
        return html.escape(str(value))

    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"


def _panels(n: int, width: float = 4.2, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width * n, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, np.atleast_1d(figure.subplots(1, n, squeeze=False)[0])


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def plot_km(groups: Mapping[str, pd.DataFrame], logrank: Mapping[str, float], path: Path, time_unit: str) -> Path:
    """Kaplan–Meier curves of the risk groups, one panel per model, with the log-rank p-value."""
    from sksurv.nonparametric import kaplan_meier_estimator

    figure, axes = _panels(len(groups))
    for ax, (name, frame) in zip(axes, groups.items(), strict=True):
        for label, members in frame.groupby("group", observed=True):
            x, y = kaplan_meier_estimator(members["event"].astype(bool).to_numpy(), members["time"].to_numpy())
            ax.step(np.r_[0.0, x], np.r_[1.0, y], where="post", label=f"{label} (n={len(members)})")
        ax.set(
            title=f"{name}: log-rank p = {logrank[name]:.2g}",
            xlabel=f"time ({time_unit})",
            ylabel="recurrence-free probability",
            ylim=(0, 1.02),
        )
        ax.legend(fontsize="small")
    return _save(figure, path)


def plot_td_auc(curves: Mapping[str, pd.Series], path: Path, time_unit: str) -> Path:
    """Time-dependent AUC of each model over time."""
    figure, (ax,) = _panels(1, width=6.0)
    for name, curve in curves.items():
        ax.plot(curve.index, curve.to_numpy(), label=name)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=f"time ({time_unit})", ylabel="cumulative/dynamic AUC", ylim=(0.4, 1.0))
    ax.legend(fontsize="small")
    return _save(figure, path)


def plot_calibration(tables: Mapping[str, pd.DataFrame], time: float, path: Path, time_unit: str) -> Path:
    """Predicted vs Kaplan–Meier observed event probability at ``time``, by quantile group of predicted risk."""
    figure, (ax,) = _panels(1, width=5.0, height=4.6)
    for name, table in tables.items():
        ax.plot(table["predicted"], table["observed"], marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=f"predicted event probability at {time:g} {time_unit}", ylabel="observed (Kaplan–Meier)")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize="small")
    return _save(figure, path)


def format_ci(block: Mapping[str, float], digits: int = 3) -> str:
    """'0.691 (0.672–0.716)' from a metric block with ``estimate``, ``ci_low`` and ``ci_high``; the CI only if computed."""
    text = f"{block['estimate']:.{digits}f}"
    if np.isfinite(block["ci_low"]) and np.isfinite(block["ci_high"]):
        text += f" ({block['ci_low']:.{digits}f}–{block['ci_high']:.{digits}f})"
    return text


def _comparison(result: SurvivalResult) -> pd.DataFrame:
    """One row per model: discrimination with CIs, td-AUC, IBS, log-rank p, and the in-sample C."""
    rows = []
    for name, model in result.models.items():
        metrics = model.metrics
        row: dict[str, Any] = {"model": name, "n": metrics["n"], "events": metrics["events"]}
        row.update({"Harrell C": format_ci(metrics["c_index_harrell"]), "Uno C": format_ci(metrics["c_index_uno"])})
        row.update({f"AUC@{t}": v for t, v in metrics["td_auc"].items()})
        row.update({"IBS": metrics["ibs"], "log-rank p": metrics["risk_groups"]["logrank_p"]})
        if "train" in metrics:
            row["in-sample Harrell C"] = metrics["train"]["c_index_harrell"]["estimate"]
        rows.append(row)
    return pd.DataFrame(rows)


def _cohort_section(result: SurvivalResult) -> Section:
    cohort = result.cohort
    counts = [("clinical rows read", cohort["clinical_rows"]), ("patients analysed", cohort["n"]), ("events", cohort["events"])]
    counts += [(f"dropped: {reason}", n) for reason, n in cohort["dropped"].items()]
    counts += [("dropped in total", cohort["dropped_total"])]
    counts += [(f"not joined: {reason}", n) for reason, n in cohort["unmatched"].items()]
    body = paragraph(
        f"Follow-up time unit: {cohort['time_unit']}. Modalities: {', '.join(cohort['modalities'])}. "
        f"Missing-modality policy: {cohort['missing_policy']}. Validation: {result.validation}."
    )
    body += table_html(pd.DataFrame(counts, columns=["patients or rows", "count"]))
    if result.encoding:
        reference = pd.DataFrame(
            [(c, e["reference"], ", ".join(e["levels"])) for c, e in result.encoding.items()],
            columns=["covariate", "reference level", "levels"],
        )
        body += paragraph("Categorical covariates are one-hot encoded against the reference level:") + table_html(reference)
    return Section("Cohort", body)


def write_survival_report(result: SurvivalResult, directory: Path) -> Path:
    """``km.png``, ``td_auc.png``, ``calibration.png`` and ``report.html`` in ``directory``."""
    sections = survival_sections(result, directory)
    return write_report(directory / "report.html", "pathomics survival report", sections,
                        subtitle=f"time unit: {result.config.time_unit}")


def write_report(path: Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """Write a self-contained HTML report atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(html_report(title, sections, subtitle=subtitle), encoding="utf-8")
    return path


def coefficients_table(result: SurvivalResult) -> pd.DataFrame:
    """All models' coefficients, columns ``model, covariate, coef, hr, hr_low, hr_high, p``."""
    return pd.concat([r.coefficients.assign(model=name) for name, r in result.models.items()], ignore_index=True)[
        ["model", "covariate", "coef", "hr", "hr_low", "hr_high", "p", "flag"]
    ]


def survival_sections(result: SurvivalResult, directory: Path) -> list[Section]:
    """The prognosis report's sections; its plots are written to ``directory``."""
    from pathomics.survival.translation import translation_sections

    config, unit = result.config, result.config.time_unit
    km = plot_km(
        {n: r.groups for n, r in result.models.items()},
        {n: r.metrics["risk_groups"]["logrank_p"] for n, r in result.models.items()},
        directory / "km.png",
        unit,
    )
    auc = plot_td_auc({n: r.td_auc_curve for n, r in result.models.items()}, directory / "td_auc.png", unit)
    calibration = plot_calibration(
        {n: r.calibration for n, r in result.models.items()}, config.calibration_time, directory / "calibration.png", unit
    )
    settings = pd.DataFrame([(k, str(v)) for k, v in config.to_dict().items()], columns=["setting", "value"])
    return [
        _cohort_section(result),
        Section(
            "Model comparison",
            paragraph(
                f"Validated metrics ({result.validation}); {config.ci_level:.0%} bootstrap CIs of the C-index "
                f"({config.n_bootstrap} resamples of patients); td-AUC at times in {unit}."
            )
            + table_html(_comparison(result)),
        ),
        Section(
            "Kaplan–Meier risk groups",
            paragraph(f"Risk groups ({config.risk_groups}) cut at training-data quantiles.")
            + image_html(km, "Kaplan-Meier curves by risk group"),
        ),
        Section("Time-dependent AUC", image_html(auc, "time-dependent AUC")),
        Section("Calibration", image_html(calibration, "calibration plot")),
        *translation_sections(result, directory),
        Section(
            "Hazard ratios",
            paragraph("Per unit of each covariate (models fitted on all patients).")
            + table_html(coefficients_table(result), digits=4),
        ),
        Section("Configuration", table_html(settings)),
    ]
