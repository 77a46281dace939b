"""The prognosis report: Kaplan-Meier, td-AUC and calibration plots, the model comparison, and
``write_survival_report`` assembling them (the HTML building blocks are in ``survival.figures``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pathomics.layout import ResultFiles
from pathomics.survival import metrics as m
from pathomics.survival.figures import (
    Section,
    format_ci,
    image_html,
    panels,
    paragraph,
    save_figure,
    table_html,
    write_report,
)
from pathomics.survival.sections import translation_sections

if TYPE_CHECKING:
    from pathomics.survival import SurvivalResult

def plot_km(groups: Mapping[str, pd.DataFrame], logrank: Mapping[str, float], path: Path, time_unit: str) -> Path:
    """Kaplan–Meier curves of the risk groups, one panel per model, with censoring ticks, the numbers at risk
    below each panel (lifelines' ``add_at_risk_counts``) and the log-rank p-value."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    figure, axes = panels(len(groups), height=4.6)
    for ax, (name, frame) in zip(axes, groups.items(), strict=True):
        fitters = []
        for label, members in frame.groupby("group", observed=True):
            fitter = KaplanMeierFitter(label=f"{label} (n={len(members)})").fit(members["time"], members["event"])
            fitter.plot_survival_function(ax=ax, ci_show=False, show_censors=True, censor_styles={"ms": 5, "marker": "|"})
            fitters.append(fitter)
        ax.set(
            title=f"{name}: log-rank p = {logrank[name]:.2g}",
            xlabel=f"time ({time_unit})",
            ylabel="recurrence-free probability",
            ylim=(0, 1.02),
        )
        ax.legend(fontsize="small")
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], fig=figure)
    return save_figure(figure, path)


def plot_forest(coefficients: pd.DataFrame, path: Path) -> Path:
    """Hazard ratios with their confidence intervals, one row per model and covariate, on a log axis."""
    rows = coefficients[np.isfinite(coefficients[["hr", "hr_low", "hr_high"]]).all(axis=1)].iloc[::-1]
    figure, (ax,) = panels(1, width=6.5, height=0.8 + 0.3 * len(rows))
    y = np.arange(len(rows))
    ax.errorbar(rows["hr"], y, xerr=[rows["hr"] - rows["hr_low"], rows["hr_high"] - rows["hr"]], fmt="o", capsize=3)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(y, [f"{model}: {c}" for model, c in zip(rows["model"], rows["covariate"], strict=True)], fontsize="small")
    ax.set(xscale="log", xlabel="hazard ratio per unit (log scale)")
    return save_figure(figure, path)


def small_cohort_warnings(result: SurvivalResult, coefficients: pd.DataFrame) -> list[str]:
    """Lines for estimates too uncertain to read: a C-index CI spanning over half of [0, 1], or a hazard ratio
    whose CI spans two orders of magnitude."""
    lines = []
    for name, model in result.models.items():
        c = model.metrics["c_index_harrell"]
        if np.isfinite([c["ci_low"], c["ci_high"]]).all() and c["ci_high"] - c["ci_low"] > 0.5:
            lines.append(f"{name}: the Harrell C interval [{c['ci_low']:.2f}, {c['ci_high']:.2f}] spans most of [0, 1]")
    with np.errstate(divide="ignore", invalid="ignore"):
        wide = coefficients[(coefficients["hr_high"] / coefficients["hr_low"]) >= 100]
    lines += [f"{r.model}: the hazard ratio of {r.covariate} has an interval [{r.hr_low:.3g}, {r.hr_high:.3g}] "
              "spanning two orders of magnitude or more" for r in wide.itertuples()]
    return lines


def plot_td_auc(curves: Mapping[str, pd.Series], path: Path, time_unit: str) -> Path:
    """Time-dependent AUC of each model over time."""
    figure, (ax,) = panels(1, width=6.0)
    for name, curve in curves.items():
        ax.plot(curve.index, curve.to_numpy(), label=name)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=f"time ({time_unit})", ylabel="cumulative/dynamic AUC", ylim=(0.4, 1.0))
    ax.legend(fontsize="small")
    return save_figure(figure, path)


def plot_calibration(tables: Mapping[str, pd.DataFrame], time: float, path: Path, time_unit: str) -> Path:
    """Predicted vs Kaplan–Meier observed event probability at ``time``, by quantile group of predicted risk."""
    figure, (ax,) = panels(1, width=5.0, height=4.6)
    for name, table in tables.items():
        error = [table["observed"] - table["observed_low"], table["observed_high"] - table["observed"]]
        ax.errorbar(table["predicted"], table["observed"], yerr=np.nan_to_num(error), marker="o", capsize=3, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=f"predicted event probability at {time:g} {time_unit}",
           ylabel="observed (Kaplan–Meier, 95% CI)")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize="small")
    return save_figure(figure, path)


def _comparison(result: SurvivalResult) -> pd.DataFrame:
    """One row per model: discrimination with CIs, td-AUC, IBS, log-rank p, and the in-sample C."""
    rows = []
    for name, model in result.models.items():
        metrics = model.metrics
        row: dict[str, Any] = {"model": name, "n": metrics["n"], "events": metrics["events"]}
        row.update({metric.label: format_ci(metrics[metric.key]) for metric in m.FOLD_METRICS})
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
    availability = pd.DataFrame(list(cohort["availability"].items()), columns=["modalities available", "patients"])
    body += paragraph("Patients by the modalities they have:") + table_html(availability)
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
    return write_report(ResultFiles(directory).report, "pathomics survival report", sections,
                        subtitle=f"time unit: {result.config.time_unit}")


def coefficients_table(result: SurvivalResult) -> pd.DataFrame:
    """All models' coefficients, columns ``model, covariate, coef, hr, hr_low, hr_high, p``."""
    return pd.concat([r.coefficients.assign(model=name) for name, r in result.models.items()], ignore_index=True)[
        ["model", "covariate", "coef", "hr", "hr_low", "hr_high", "p", "flag"]
    ]


def survival_sections(result: SurvivalResult, directory: Path) -> list[Section]:
    """The prognosis report's sections; its plots are written to ``directory``."""
    config, unit, files = result.config, result.config.time_unit, ResultFiles(directory)
    km = plot_km(
        {n: r.groups for n, r in result.models.items()},
        {n: r.metrics["risk_groups"]["logrank_p"] for n, r in result.models.items()},
        files.figure("km"),
        unit,
    )
    auc = plot_td_auc({n: r.td_auc_curve for n, r in result.models.items()}, files.figure("td_auc"), unit)
    calibration = plot_calibration(
        {n: r.calibration for n, r in result.models.items()}, config.calibration_time, files.figure("calibration"), unit
    )
    settings = pd.DataFrame([(k, str(v)) for k, v in config.to_dict().items()], columns=["setting", "value"])
    coefficients = coefficients_table(result)
    forest = plot_forest(coefficients, files.figure("forest"))
    warnings = small_cohort_warnings(result, coefficients)
    caution = [Section("Small-cohort warning", paragraph(
        "These estimates are too uncertain to read on their own; a larger cohort is needed:")
        + "".join(paragraph(line) for line in warnings))] if warnings else []
    return [
        *caution,
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
            + image_html(forest, "forest plot of hazard ratios")
            + table_html(coefficients, digits=4),
        ),
        Section("Configuration", table_html(settings)),
    ]
