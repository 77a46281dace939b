"""The report's clinical-translation sections: calibration slope and intercept, decision curves, the nomogram,
and, for an external cohort, the training cohort's values beside the external ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pathomics.layout import ResultFiles
from pathomics.survival import metrics as m
from pathomics.survival.decision import plot_decision_curves
from pathomics.survival.figures import Section, image_html, paragraph, table_html

if TYPE_CHECKING:
    from pathomics.survival import SurvivalResult

SIDE_BY_SIDE = (  # after the registered fold metrics (survival.metrics.FOLD_METRICS)
    ("calibration slope", lambda b: b["calibration_slope"]),
    ("calibration intercept", lambda b: b["calibration_intercept"]),
    ("integrated Brier score", lambda b: b["ibs"]),
    ("patients", lambda b: b["n"]),
    ("events", lambda b: b["events"]),
)


def translation_sections(result: SurvivalResult, directory: Path) -> list[Section]:
    """Calibration slope/intercept, decision curves (and the training ones beside them), and the nomogram."""
    unit, external = result.config.time_unit, result.validation.startswith("external")
    calibration = pd.DataFrame(
        [
            {"model": name, "calibration slope": r.metrics["calibration_slope"],
             "calibration intercept": r.metrics["calibration_intercept"]}
            for name, r in result.models.items()
        ]
    )
    sections = [
        Section(
            "Calibration slope and intercept",
            paragraph(
                "Slope: the Cox coefficient of the model's linear predictor refitted on this cohort (1 is ideal; below 1, "
                "predictions too extreme). Intercept: log(observed / expected recurrences), the expected count being each "
                "patient's predicted cumulative hazard at their own follow-up (0 is ideal; above 0, the model predicts too "
                "few recurrences). Cross-validated values pool the out-of-fold predictions."
            )
            + table_html(calibration),
        )
    ]
    if external:
        sections.append(Section("Training and external cohorts side by side", _side_by_side(result)))
    curves = {name: r.metrics["decision_curve"] for name, r in result.models.items()}
    images = image_html(plot_decision_curves(curves, ResultFiles(directory).figure("decision_curve"), unit), "decision curves")
    training = {name: result.study.training[name]["decision_curve"] for name in result.models if name in result.study.training}
    if external and training:
        plot = plot_decision_curves(training, ResultFiles(directory).figure("decision_curve_training"), unit, title="training cohort, ")
        images = (
            paragraph("External cohort:") + images
            + paragraph("Training cohort (in-sample):") + image_html(plot, "training decision curves")
        )
    sections.append(
        Section(
            "Decision curves",
            paragraph(
                "Net benefit of treating the patients whose predicted probability of recurrence by each time is at least "
                "the threshold, against treating everyone and no one; censoring handled by Kaplan–Meier (Vickers et al. 2008)."
            )
            + images,
        )
    )
    nomogram = result.study.nomogram
    if nomogram is not None:
        png = nomogram.plot(ResultFiles(directory).figure("nomogram"), unit)
        sections.append(
            Section(
                "Nomogram",
                paragraph(
                    "Points of each covariate (the widest-ranging covariate spans 0–100 over the training cohort); their "
                    "sum, the total points, gives the predicted recurrence-free probability (RFS) at each time. "
                    "The same as a table in nomogram.csv."
                )
                + image_html(png, "nomogram")
                + table_html(nomogram.table()),
            )
        )
    return sections


def _side_by_side(result: SurvivalResult) -> str:
    """A table of the frozen models' in-sample training metrics beside their values on this cohort."""
    rows: list[dict[str, Any]] = []
    registered = tuple((f.label, lambda b, key=f.key: b[key]["estimate"]) for f in m.FOLD_METRICS)
    for label, get in (*registered, *SIDE_BY_SIDE):
        row: dict[str, Any] = {"metric": label}
        for name, r in result.models.items():
            training = r.metrics.get("train") or {}
            row[f"{name}: training"] = get(training) if training else float("nan")
            row[f"{name}: external"] = get(r.metrics)
        rows.append(row)
    return paragraph(
        "The frozen models (no refit) and the training cohort's risk-group cut-offs; training values are in-sample."
    ) + table_html(pd.DataFrame(rows))
