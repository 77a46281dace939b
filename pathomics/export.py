"""Exports of an output directory for the tools users open next: QuPath and scverse (AnnData).

``export_qupath`` writes ``<out>/export/qupath/<slide_id>.geojson``: every patch of the slide's patch store as a
QuPath detection object (a square in level-0 pixels) with its attention, the slide's risk and its QC scores and
flags as measurements, classified by its QC failure. ``export_anndata`` writes ``<out>/export/anndata/slides.h5ad``
(one row per slide: patient, risk, clinical columns; ``obsm["signature"]``) and one ``<slide_id>.h5ad`` per feature
file (one row per embedded patch: x, y, attention, QC; ``obsm["features"]``; the encoder's attributes in ``uns``).

Both read only the documented stores (tiles/, features/, attention/, qc/, signatures.parquet) and write
atomically. What a run did not produce (no MIL stage: no attention, risk or signatures; no QC table) is left
out, and each omission is named in the result's ``notes``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathomics.errors import ConfigError, StoreError
from pathomics.io import atomic_path, json_ready
from pathomics.layout import OutputLayout
from pathomics.mil.artifacts import read_attention, read_attention_attrs
from pathomics.qc import FLAG_COLORS, read_qc
from pathomics.store import open_patch_store, read_feature_file

QC_CAUSES = ("pen", "bubble", "fold", "blur")  # a patch failing several is classified by the likelier cause first
NOT_MEASUREMENTS = ("x", "y")


@dataclass(frozen=True)
class ExportResult:
    """The files an export wrote and what it had to leave out (one line each)."""

    paths: tuple[Path, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class PatchTable:
    """Per patch (in the order asked for): x, y, QC scores and flags, attention; and the slide's attention attributes."""

    table: pd.DataFrame
    attention_attrs: dict[str, Any]


def patch_table(layout: OutputLayout, slide_id: str, coords: np.ndarray) -> PatchTable:
    """The QC table's and the attention file's values for the patches at ``coords`` (level-0 x, y), matched by
    coordinates: a feature file may hold fewer patches than its store (``--qc-exclude``).

    A patch without attention (left out of the MIL bag) gets NaN; QC or attention is absent when its file is.
    """
    table = pd.DataFrame({"x": coords[:, 0].astype(np.int64), "y": coords[:, 1].astype(np.int64)})
    qc_path = layout.qc_table(slide_id)
    if qc_path.exists():
        qc, _ = read_qc(qc_path)
        table = _match(table, qc, qc_path, every_patch=True)
    attention_path = layout.attention_file(slide_id)
    attrs: dict[str, Any] = {}
    if attention_path.exists():
        result = read_attention(attention_path)
        attention = pd.DataFrame({"x": result.coords[:, 0], "y": result.coords[:, 1], "attention": result.attention})
        table = _match(table, attention, attention_path, every_patch=False)
        attrs = read_attention_attrs(attention_path)
    return PatchTable(table, attrs)


def _match(table: pd.DataFrame, other: pd.DataFrame, path: Path, every_patch: bool) -> pd.DataFrame:
    """``table`` (order kept) with ``other``'s columns, matched on (x, y). ``every_patch``: each of ``table``'s
    patches must be in ``other`` (a QC table covers its store); else each of ``other``'s must be in ``table``."""
    ours, theirs = (pd.MultiIndex.from_arrays([f.x.astype(np.int64), f.y.astype(np.int64)]) for f in (table, other))
    missing = ~ours.isin(theirs) if every_patch else ~theirs.isin(ours)
    if missing.any():
        x, y = (ours if every_patch else theirs)[int(np.flatnonzero(missing)[0])]
        what = "lacks" if every_patch else "holds"
        raise StoreError(f"{path}: {what} {int(missing.sum())} patch(es) of the slide's current patches (e.g. x={x}, y={y}); "
                         "it is older than the patch store or the features: re-run the stage that wrote it")
    return table.merge(other.astype({"x": np.int64, "y": np.int64}), on=["x", "y"], how="left", validate="one_to_one")


def measurements(table: pd.DataFrame, risk: float | None) -> list[dict[str, float]]:
    """Per patch, its numeric columns as a flat name → number mapping (flags as 0/1; NaN left out: QuPath reads
    measurements as doubles and has no null), with the slide's ``risk`` when known."""
    numeric = table.drop(columns=list(NOT_MEASUREMENTS)).select_dtypes(include=["number", "bool"]).astype(np.float64)
    if risk is not None:
        numeric = numeric.assign(risk=float(risk))
    names = list(numeric.columns)
    return [{n: v for n, v in zip(names, row) if v == v} for row in numeric.itertuples(index=False, name=None)]


def qc_classes(table: pd.DataFrame) -> list[dict[str, Any] | None]:
    """Per patch, a QuPath classification ``{"name": "QC <flag>", "color": [r, g, b]}`` for a QC-failed patch
    (its likelier cause first), None for a patch that passed or has no QC table."""
    flags = [f for f in QC_CAUSES if f"flag_{f}" in table.columns]
    classes: list[dict[str, Any] | None] = [None] * len(table)
    for flag in reversed(flags):  # the likelier cause, last written, wins
        for i in np.flatnonzero(table[f"flag_{flag}"].to_numpy(bool)):
            classes[i] = {"name": f"QC {flag}", "color": list(FLAG_COLORS[flag])}
    return classes


def qupath_collection(coords: np.ndarray, size: int, table: pd.DataFrame, risk: float | None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of QuPath detections: one ``size``-pixel square per patch at level-0 ``coords``."""
    features = []
    for (x, y), values, cls in zip(coords.tolist(), measurements(table, risk), qc_classes(table)):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        properties: dict[str, Any] = {"objectType": "detection", "measurements": values}
        if cls is not None:
            properties["classification"] = cls
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def export_qupath(out_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None) -> ExportResult:
    """``export/qupath/<slide_id>.geojson`` for each slide with a patch store (or those of ``slide_ids``)."""
    layout = OutputLayout(out_dir)
    ids = _wanted(slide_ids, [s for s in layout.store_ids() if layout.store(s).is_dir()], layout.tiles,
                  "patch store", "run `pathomics tile` or `pathomics run` first")
    paths, without_attention, without_qc = [], [], []
    for slide_id in ids:
        store = open_patch_store(layout.store(slide_id))
        patches = patch_table(layout, slide_id, store.coords)
        risk = patches.attention_attrs.get("risk")
        collection = qupath_collection(store.coords, int(store.attrs["patch_size_level0"]), patches.table,
                                       None if risk is None else float(risk))
        without_attention += [slide_id] if "attention" not in patches.table else []
        without_qc += [slide_id] if "qc_pass" not in patches.table else []
        with atomic_path(layout.qupath_geojson(slide_id)) as tmp:
            tmp.write_text(json.dumps(collection, separators=(",", ":")))
        paths.append(layout.qupath_geojson(slide_id))
    notes = [_omitted(without_attention, "no attention file (no MIL stage): attention and risk left out"),
             _omitted(without_qc, "no QC table: QC scores, flags and classes left out")]
    return ExportResult(tuple(paths), tuple(n for n in notes if n))


def export_anndata(out_dir: str | os.PathLike, clinical: str | os.PathLike | None = None, patient_col: str = "patient_id",
                   slide_ids: Sequence[str] | None = None) -> ExportResult:
    """``export/anndata/slides.h5ad`` from signatures.parquet (joined with the ``clinical`` table by patient) and
    ``export/anndata/<slide_id>.h5ad`` for each feature file (or those of ``slide_ids``)."""
    layout = OutputLayout(out_dir)
    if not layout.signatures.exists() and not layout.feature_ids():
        raise StoreError(f"{layout.root}: neither {layout.signatures.name} nor feature files under {layout.features}; "
                         "run `pathomics embed` (and `pathomics mil train`) or `pathomics run` first")
    ids = _wanted(slide_ids, layout.feature_ids(), layout.features, "feature file", "run `pathomics embed` first") \
        if layout.feature_ids() or slide_ids else []
    if layout.anndata_slides in {layout.anndata_patches(s) for s in ids}:
        raise ConfigError(f"a slide named {layout.anndata_slides.stem!r} would overwrite {layout.anndata_slides.name}; "
                          "leave it out with --slide-id, or rename its feature file")
    paths, notes = [], []
    if layout.signatures.exists():
        slides, unmatched = slides_anndata(layout, clinical, patient_col, slide_ids)
        _write_h5ad(slides, layout.anndata_slides)
        paths.append(layout.anndata_slides)
        notes += [f"{unmatched} slide(s) have no row in {Path(clinical).name}: their clinical columns are empty"] if unmatched else []
    else:
        notes.append(f"no {layout.signatures.name} (no MIL stage): {layout.anndata_slides.name} not written")
    without_attention = []
    for slide_id in ids:
        adata = patches_anndata(layout, slide_id)
        without_attention += [slide_id] if "attention" not in adata.obs else []
        _write_h5ad(adata, layout.anndata_patches(slide_id))
        paths.append(layout.anndata_patches(slide_id))
    notes.append(_omitted(without_attention, "no attention file (no MIL stage): attention left out"))
    return ExportResult(tuple(paths), tuple(n for n in notes if n))


def slides_anndata(layout: OutputLayout, clinical: str | os.PathLike | None, patient_col: str,
                   slide_ids: Sequence[str] | None = None) -> tuple[Any, int]:
    """One row per slide of signatures.parquet (obs: patient_id, risk, model, fold and the clinical table's columns;
    ``obsm["signature"]``); returns it with the number of slides whose patient the clinical table lacks."""
    import anndata as ad
    import pyarrow.parquet as pq

    signatures = pq.read_table(layout.signatures)
    provenance = (signatures.schema.metadata or {}).get(b"pathomics", b"{}").decode()
    table = signatures.to_pandas()
    if slide_ids is not None:
        table = table[table.slide_id.isin(_wanted(slide_ids, list(table.slide_id), layout.signatures, "row", ""))]
    columns = [c for c in table.columns if c.startswith("sig_")]
    obs = table.drop(columns=columns).set_index("slide_id")
    obs.index = obs.index.astype(str)
    unmatched = 0
    if clinical is not None:
        records = clinical_records(clinical, patient_col)
        unmatched = int((~obs.patient_id.astype(str).isin(records.index)).sum())
        obs = obs.join(records, on="patient_id", rsuffix="_clinical")
    uns = {"signatures": json.loads(provenance)} if provenance else {}
    return ad.AnnData(obs=_h5ad_columns(obs), obsm={"signature": table[columns].to_numpy(np.float32)},
                      uns=_uns(uns)), unmatched


def clinical_records(path: str | os.PathLike, patient_col: str) -> pd.DataFrame:
    """The clinical table indexed by patient id (one row per patient, refused otherwise)."""
    from pathomics.survival.cohort import InputTable

    table = InputTable.read(path, "clinical", patient_col)
    table.require([patient_col], "name the patient column with --patient-col")
    ids = table.unique_ids(patient_col)
    return table.frame.drop(columns=patient_col).set_index(pd.Index(ids, name=patient_col))


def patches_anndata(layout: OutputLayout, slide_id: str) -> Any:
    """One row per patch of the slide's feature file (obs: x, y, attention, QC; ``obsm["features"]`` and
    ``obsm["spatial"]``, level-0 x, y), the feature file's attributes (encoder, weights, recipe) in ``uns``."""
    import anndata as ad

    features = read_feature_file(layout.feature_file(slide_id))
    patches = patch_table(layout, slide_id, features.coords)
    obs = patches.table.set_axis(pd.Index([str(i) for i in range(len(patches.table))], name="patch"))
    uns = {"slide_id": slide_id, "encoder": features.attrs, "coords": features.coords_attrs}
    if patches.attention_attrs:
        uns["attention"] = patches.attention_attrs
    return ad.AnnData(obs=_h5ad_columns(obs), uns=_uns(uns),
                      obsm={"features": features.features, "spatial": features.coords.astype(np.float64)})


def _h5ad_columns(obs: pd.DataFrame) -> pd.DataFrame:
    """Text columns as categoricals: h5ad stores those with missing values, which a plain object column cannot."""
    return obs.astype({c: "category" for c in obs.columns if obs[c].dtype == object})


def _uns(document: dict[str, Any]) -> dict[str, Any]:
    """Attributes as h5ad can store them: JSON types, None and empty lists dropped, nested mappings kept."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None and v != []}
        return value

    return clean(json_ready(document))


def _write_h5ad(adata: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def _wanted(slide_ids: Sequence[str] | None, available: list[str], where: Path, what: str, hint: str) -> list[str]:
    """``slide_ids`` (all of them available) or every available id; none at all is an error."""
    if slide_ids is None:
        if not available:
            raise StoreError(f"{where}: no {what}s here; {hint}")
        return available
    absent = sorted(set(slide_ids) - set(available))
    if absent:
        raise ConfigError(f"{where}: no {what} for slide(s) {', '.join(absent)}; check the ids")
    return list(slide_ids)


def _omitted(slide_ids: list[str], why: str) -> str:
    if not slide_ids:
        return ""
    shown = ", ".join(slide_ids[:3]) + (", ..." if len(slide_ids) > 3 else "")
    return f"{len(slide_ids)} slide(s) ({shown}): {why}"
