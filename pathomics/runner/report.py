"""The report of an archive run, ``<out>/report.html``: what the slides were (encoder and weights, tiling and MIL
settings, quality control), each slide's risk with a link to its heatmap, the highest-risk slides' heatmaps beside
their thumbnails, then the survival report.

Everything is read back from the run's outputs (patch stores, feature files, QC tables, signatures, MIL metrics),
so the report says what the files hold, not what a configuration asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pathomics.errors import StoreError
from pathomics.io import json_ready
from pathomics.layout import FAILED, OutputLayout
from pathomics.survival.figures import Section, image_html, link_html, paragraph, table_html, write_report

if TYPE_CHECKING:
    from pathomics.runner.pipeline import RunConfig
    from pathomics.survival import SurvivalResult

HEATMAP_WIDTH = 800  # pixels of each panel: a heatmap to read attention on, not a thumbnail
HEATMAPS_SHOWN = 4  # the highest-risk slides whose heatmaps the report embeds; every slide's is linked
ENCODER_ATTRS = ("model", "weights", "weights_sha256", "precision", "input_size", "embedding_dim", "qc_exclude")
TILING_ATTRS = ("target_mpp", "patch_size", "patch_size_level0", "overlap", "min_tissue", "compression",
                "tissue_method", "mpp_level0")


def slide_frame(layout: OutputLayout) -> pd.DataFrame:
    """One row per slide of the run's signatures: slide_id, patient_id, risk, fold, sorted by risk (highest first)."""
    signatures = pd.read_parquet(layout.signatures, columns=["slide_id", "patient_id", "risk", "fold"])
    return signatures.sort_values("risk", ascending=False, kind="stable").reset_index(drop=True)


def encoder_table(layout: OutputLayout, slide_ids: Sequence[str]) -> pd.DataFrame:
    """The encoder attributes of each slide's feature file (``ENCODER_ATTRS`` and ``qc_dropped``), one row a slide."""
    import h5py

    rows = []
    for slide_id in slide_ids:
        with h5py.File(layout.feature_file(slide_id), "r") as h5:
            attrs = {k: json_ready(h5.attrs.get(k, "")) for k in (*ENCODER_ATTRS, "qc_dropped")}
            rows.append({"slide_id": slide_id, "patches": int(h5["features"].shape[0]), **attrs})
    return pd.DataFrame(rows)


def tiling_table(layout: OutputLayout, slide_ids: Sequence[str]) -> pd.DataFrame:
    """The tiling attributes of each slide's patch store (``TILING_ATTRS``), one row a slide."""
    from pathomics.store import open_patch_store

    rows = []
    for slide_id in slide_ids:
        attrs = open_patch_store(layout.store(slide_id)).attrs
        rows.append({"slide_id": slide_id, **{k: json_ready(attrs.get(k, "")) for k in TILING_ATTRS}})
    return pd.DataFrame(rows)


def qc_counts(layout: OutputLayout, slide_ids: Sequence[str]) -> pd.DataFrame:
    """Per slide, patches scored and, per QC flag, patches raising it (``flag_<name>`` columns) and ``flagged`` (any);
    a slide without a QC table (tiled with ``--no-qc``) has no row."""
    from pathomics.qc import FLAGS, read_qc

    rows = []
    for slide_id in slide_ids:
        path = layout.qc_table(slide_id)
        if not path.is_file():
            continue
        table = read_qc(path)[0]
        rows.append({"slide_id": slide_id, "scored": len(table), "flagged": int((~table["qc_pass"]).sum()),
                     **{f"flag_{f}": int(table[f"flag_{f}"].sum()) for f in FLAGS if f"flag_{f}" in table}})
    return pd.DataFrame(rows)


def _distinct(frame: pd.DataFrame, column: str) -> str:
    """The values of ``column`` across slides: one value, or each with its number of slides."""
    counts = frame[column].astype(str).value_counts()
    return counts.index[0] if len(counts) == 1 else "; ".join(f"{v} ({n} slides)" for v, n in counts.items())


def is_random(encoder: pd.DataFrame) -> bool:
    """Whether any slide was embedded with random (untrained) weights."""
    return bool((encoder["weights"].astype(str) == "random").any())


def settings_section(encoder: pd.DataFrame, tiling: pd.DataFrame, config: RunConfig, layout: OutputLayout) -> Section:
    """Encoder and weights, tiling and MIL settings, as the run's files record them."""
    rows = [("encoder", _distinct(encoder, "model")), ("weights", _distinct(encoder, "weights")),
            ("weights SHA-256", _distinct(encoder, "weights_sha256") or "—"),
            *((label, _distinct(encoder, key)) for label, key in (("precision", "precision"), ("input size (px)", "input_size"),
                                                                  ("embedding dimension", "embedding_dim"))),
            ("QC flags excluded before embedding", _distinct(encoder, "qc_exclude") or "none")]
    rows += [(f"tiling: {key.replace('_', ' ')}", _distinct(tiling, key)) for key in TILING_ATTRS]
    mil = config.mil
    rows += [("MIL aggregator", mil.model), ("MIL folds", mil.folds), ("MIL epochs", mil.epochs),
             ("MIL ensemble", mil.ensemble if mil.ensemble is not None else "by cohort size"),
             ("MIL learning rate", mil.lr), ("MIL hidden dimension", mil.hidden_dim), ("MIL seed", mil.seed)]
    if config.mil_model is not None:
        rows.append(("MIL model applied (not trained)", str(config.mil_model)))
    if layout.mil_metrics.is_file():
        pooled = json.loads(layout.mil_metrics.read_text()).get("pooled_out_of_fold", {})
        rows += [(f"MIL out-of-fold {name.replace('_', ' ')}", value) for name, value in pooled.items()]
    body = paragraph(f"{len(encoder)} slides embedded. Weights: RANDOM (untrained) — features carry texture only, not "
                     "what a pretrained encoder knows." if is_random(encoder) else f"{len(encoder)} slides embedded.")
    return Section("Slides, encoder and settings",
                   body + table_html(pd.DataFrame([(k, str(v)) for k, v in rows], columns=["setting", "value"])))


def qc_section(counts: pd.DataFrame, encoder: pd.DataFrame) -> Section:
    """Patches kept and flagged, per QC flag, across the run's slides."""
    if counts.empty:
        return Section("Quality control", paragraph("No QC tables: the slides were tiled without quality control."))
    scored = int(counts["scored"].sum())
    flags = [c for c in counts.columns if c.startswith("flag_")]
    rows = [(c.removeprefix("flag_"), int(counts[c].sum()), counts[c].sum() / max(scored, 1),
             int((counts[c] > 0).sum())) for c in flags]
    rows.append(("any flag", int(counts["flagged"].sum()), counts["flagged"].sum() / max(scored, 1),
                 int((counts["flagged"] > 0).sum())))
    table = pd.DataFrame(rows, columns=["flag", "patches flagged", "share of patches", "slides with any"])
    dropped = int(pd.to_numeric(encoder["qc_dropped"], errors="coerce").fillna(0).sum())
    return Section("Quality control", paragraph(
        f"{scored} patches scored on {len(counts)} slides; {scored - int(counts['flagged'].sum())} raise no flag. "
        f"{dropped} flagged patches were left out of the embeddings (QC flags excluded: "
        f"{_distinct(encoder, 'qc_exclude') or 'none'}); the others were kept.") + table_html(table))


def slides_section(slides: pd.DataFrame, layout: OutputLayout, heatmaps: dict[str, Path]) -> Section:
    """One row per slide, highest risk first, linking its heatmap PNG (relative to the report)."""
    here = layout.report.parent
    table = slides.assign(heatmap=[link_html(Path(os.path.relpath(heatmaps[s], here)).as_posix(), "heatmap")
                                   if s in heatmaps else "—" for s in slides["slide_id"]])
    return Section("Slides", paragraph(
        "Out-of-fold slide risk scores from the MIL model (higher: earlier recurrence predicted), highest first.")
        + table_html(table, raw=("heatmap",)))


def render_slide_heatmaps(layout: OutputLayout, slide_ids: Sequence[str]) -> dict[str, Path]:
    """``heatmaps/<slide_id>.png`` for each slide, its plain thumbnail beside its attention, ``HEATMAP_WIDTH`` px a
    panel (one already drawn so is kept); a slide without a thumbnail has none."""
    from pathomics.mil.heatmap import render_heatmaps

    rows = render_heatmaps(layout.root, layout.root, slide_ids, show_progress=False, size=HEATMAP_WIDTH, beside=True)
    return {r.slide_id: layout.heatmap(r.slide_id) for r in rows if r.state != FAILED and layout.heatmap(r.slide_id).is_file()}


def heatmap_section(slides: pd.DataFrame, heatmaps: dict[str, Path], shown: int) -> Section:
    """The ``shown`` highest-risk slides' heatmaps, embedded."""
    top = [s for s in slides["slide_id"] if s in heatmaps][:shown]
    risk = slides.set_index("slide_id")["risk"]
    body = paragraph(f"The {len(top)} highest-risk slides. Left: the slide's thumbnail; right: MIL attention over it, "
                     "coloured by rank within the slide; the colour bar gives the attention weight at each rank.")
    for slide_id in top:
        body += paragraph(f"{slide_id}: risk {risk[slide_id]:.3f}") + image_html(heatmaps[slide_id], f"attention heatmap of {slide_id}")
    return Section("Attention heatmaps", body)


def run_sections(layout: OutputLayout, config: RunConfig, heatmaps_shown: int = HEATMAPS_SHOWN) -> tuple[list[Section], bool]:
    """The report's sections about the slides, and whether random weights embedded any of them."""
    slides = slide_frame(layout)
    ids = list(slides["slide_id"])
    encoder, tiling, counts = encoder_table(layout, ids), tiling_table(layout, ids), qc_counts(layout, ids)
    try:
        heatmaps = render_slide_heatmaps(layout, ids)
    except StoreError:  # no attention file at all
        heatmaps = {}
    table = slides.merge(encoder[["slide_id", "patches"]], on="slide_id", how="left")
    if not counts.empty:
        table = table.merge(counts[["slide_id", "flagged"]].rename(columns={"flagged": "patches QC-flagged"}),
                            on="slide_id", how="left")
    sections = [settings_section(encoder, tiling, config, layout), qc_section(counts, encoder),
                slides_section(table, layout, heatmaps)]
    if heatmaps_shown:
        sections.append(heatmap_section(slides, heatmaps, heatmaps_shown))
    return sections, is_random(encoder)


def write_run_report(out_dir: str | os.PathLike, config: RunConfig, survival: SurvivalResult, name: str = "run",
                     before: Sequence[Section] = (), after: Sequence[Section] = (),
                     heatmaps_shown: int = HEATMAPS_SHOWN) -> Path:
    """``<out>/report.html``: ``before``, the slides' sections, the survival report, then ``after``. The title says
    RANDOM when random weights embedded any slide."""
    from pathomics.survival.report import survival_sections

    layout = OutputLayout(out_dir)
    slides, random = run_sections(layout, config, heatmaps_shown)
    title = f"pathomics {name} report" + (" (RANDOM backbone weights)" if random else "")
    sections = [*before, *slides, *survival_sections(survival, layout.survival), *after]
    return write_report(layout.report, title, sections, subtitle=f"time unit: {survival.config.time_unit}")
