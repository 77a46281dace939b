"""What the viewer shows of an output directory: its slides and, per slide, the overlay data as JSON.

Everything is read from the files the stages write (the output contracts): patch stores under
``tiles/``, tissue GeoJSON beside them, ``attention/<slide_id>.h5``, ``signatures.parquet`` (risk) and
``qc/<slide_id>.parquet`` (per-patch flags). An optional file that is missing means no overlay; one
that is unreadable is reported as a problem next to the slide instead of failing the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from pathomics.errors import InputError, PathomicsError, SlideReadError, StoreError
from pathomics.layout import OutputLayout
from pathomics.store import open_patch_store
from pathomics.tissue import read_geojson

QC_REQUIRED = ("x", "y", "qc_pass")  # the QC columns the viewer needs; boolean columns besides qc_pass are flags
FLAG_PREFIX = "flag_"  # a flag column's name without it names the flag ("flag_pen" -> "pen")


@dataclass(frozen=True)
class SlideEntry:
    """A tiled slide of the output directory: its store, source file and level-0 geometry."""

    slide_id: str
    store: Path
    source_path: Path
    mpp: float
    width: int
    height: int
    patch_size_level0: int


def find_slides(layout: OutputLayout) -> tuple[dict[str, SlideEntry], list[str]]:
    """The complete patch stores under ``tiles/`` by slide id, and one message per store that was skipped."""
    slides: dict[str, SlideEntry] = {}
    problems = []
    for slide_id in layout.store_ids():
        try:
            entry = _entry(layout.store(slide_id))
        except PathomicsError as exc:
            problems.append(str(exc))
            continue
        slides[entry.slide_id] = entry
    return slides, problems


def find_slide(layout: OutputLayout, slide_id: str) -> SlideEntry:
    """The slide ``slide_id`` (an id, never a path: it must name a store of the listing); KeyError if none."""
    if slide_id not in layout.store_ids():
        raise KeyError(f"no slide {slide_id!r} in {layout.root}")
    return _entry(layout.store(slide_id))


def _entry(path: Path) -> SlideEntry:
    store = open_patch_store(path)
    a = store.attrs
    width, height = a.get("slide_width"), a.get("slide_height")
    if width is None or height is None:
        raise StoreError(f"{path}: the store does not record the slide size; re-run `pathomics tile` to view it")
    return SlideEntry(store.slide_id, path, Path(a["source_path"]), float(a["mpp_level0"]),
                      int(width), int(height), int(a["patch_size_level0"]))


def slide_file(entry: SlideEntry, slides_dir: Path | None = None) -> Path:
    """The slide of ``entry`` (a file, or a DICOM slide folder): its recorded source path, else one of that name in ``slides_dir``."""
    if entry.source_path.exists():
        return entry.source_path
    if slides_dir is not None and (slides_dir / entry.source_path.name).exists():
        return slides_dir / entry.source_path.name
    raise SlideReadError(f"{entry.source_path}: the slide file of {entry.slide_id} is not there any more; "
                         "pass --slide-dir DIR naming the folder it now lives in")


def read_risks(layout: OutputLayout) -> tuple[dict[str, float], str | None]:
    """Risk per slide id from ``signatures.parquet`` (empty when absent), and a problem message if unreadable."""
    import pyarrow.parquet as pq

    path = layout.signatures
    if not path.is_file():
        return {}, None
    try:
        table = pq.read_table(path, columns=["slide_id", "risk"]).to_pydict()
    except (OSError, ValueError, KeyError) as exc:
        return {}, f"{path}: cannot read slide_id and risk ({exc}); re-run `pathomics mil predict`"
    return {str(s): float(r) for s, r in zip(table["slide_id"], table["risk"])
            if r is not None and math.isfinite(r)}, None


def slide_index(layout: OutputLayout) -> dict[str, Any]:
    """The index page's data: each slide with its size, MPP, thumbnail and risk (rank 1 = highest of the cohort)."""
    slides, problems = find_slides(layout)
    risks, problem = read_risks(layout)
    problems += [problem] if problem else []
    items = [{"slide_id": s.slide_id, "width": s.width, "height": s.height, "mpp": s.mpp, "thumbnail": _thumbnail(layout, s.slide_id),
              **risk_summary(s.slide_id, risks)} for s in slides.values()]
    items.sort(key=lambda item: (item["risk"] is None, -(item["risk"] or 0.0), item["slide_id"]))
    return {"out": str(layout.root), "slides": items, "problems": problems}


def _thumbnail(layout: OutputLayout, slide_id: str) -> str | None:
    """The URL path of the slide's tiling thumbnail (served from OUT), if there is one."""
    path = layout.thumbnail(slide_id)
    return "out/" + quote(path.relative_to(layout.root).as_posix()) if path.is_file() else None


def risk_summary(slide_id: str, risks: dict[str, float]) -> dict[str, Any]:
    """``risk``, ``risk_rank`` (1 = highest), ``risk_percentile`` (0 lowest .. 1 highest) and ``cohort_size``."""
    if slide_id not in risks:
        return {"risk": None, "risk_rank": None, "risk_percentile": None, "cohort_size": len(risks)}
    values = np.array(list(risks.values()))
    risk = risks[slide_id]
    below = int((values < risk).sum())
    return {"risk": risk, "risk_rank": int((values > risk).sum()) + 1,
            "risk_percentile": below / (len(values) - 1) if len(values) > 1 else 1.0, "cohort_size": len(values)}


def slide_overlays(layout: OutputLayout, entry: SlideEntry) -> dict[str, Any]:
    """Overlay data of one slide, all in level-0 pixels: tissue rings, kept patches, QC flags, attention, risk."""
    store = open_patch_store(entry.store)
    risks, problem = read_risks(layout)
    problems = [problem] if problem else []
    data: dict[str, Any] = {
        "slide_id": entry.slide_id, "width": entry.width, "height": entry.height, "mpp": entry.mpp,
        "patch_size_level0": entry.patch_size_level0, **risk_summary(entry.slide_id, risks),
        "patches": _xy(store.coords), "tissue": None, "qc": None, "attention": None,
    }
    for key, reader in (("tissue", _tissue), ("qc", _qc), ("attention", _attention)):
        try:
            data[key] = reader(layout, entry.slide_id)
        except PathomicsError as exc:
            problems.append(str(exc))
    data["problems"] = problems
    return data


def _xy(coords: np.ndarray) -> dict[str, list[int]]:
    return {"x": coords[:, 0].astype(int).tolist(), "y": coords[:, 1].astype(int).tolist()}


def _tissue(layout: OutputLayout, slide_id: str) -> list[list[list[list[int]]]] | None:
    """Tissue polygons as lists of rings (exterior first, then holes) of [x, y] points."""
    path = layout.tissue_geojson(slide_id)
    if not path.is_file():
        return None
    return [[np.rint(np.asarray(ring.coords)).astype(int).tolist() for ring in (poly.exterior, *poly.interiors)]
            for poly in read_geojson(path).geoms]


def _attention(layout: OutputLayout, slide_id: str) -> dict[str, Any] | None:
    """Attention per patch with its coords, and its rank scaled to 0..1 (what the heatmap colours)."""
    path = layout.attention_file(slide_id)
    if not path.is_file():
        return None
    from pathomics.mil import read_attention  # imports torch: only when a slide has attention

    result = read_attention(path)
    order = np.argsort(np.argsort(result.attention, kind="stable"), kind="stable")
    scaled = order / max(len(order) - 1, 1)
    return {**_xy(result.coords), "value": result.attention.astype(float).tolist(), "scaled": scaled.tolist()}


def _qc(layout: OutputLayout, slide_id: str) -> dict[str, Any] | None:
    """Per-patch QC: x, y, qc_pass and every other boolean column as a flag (named without ``flag_``)."""
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    path = layout.qc_table(slide_id)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the QC table ({exc}); re-run `pathomics tile`") from exc
    missing = [c for c in QC_REQUIRED if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: QC table lacks column(s) {', '.join(missing)}; re-run `pathomics tile`")
    flags = [f.name for f in table.schema if pat.is_boolean(f.type) and f.name not in QC_REQUIRED]
    try:
        column = {name: table.column(name).to_numpy(zero_copy_only=False) for name in (*QC_REQUIRED, *flags)}
        return {"x": column["x"].astype(int).tolist(), "y": column["y"].astype(int).tolist(),
                "pass": column["qc_pass"].astype(bool).tolist(), "flags": {f.removeprefix(FLAG_PREFIX): column[f].astype(bool).tolist() for f in flags}}
    except (TypeError, ValueError) as exc:  # nulls or non-numeric coordinates
        raise InputError(f"{path}: QC columns x, y, qc_pass are not all numbers ({exc}); re-run `pathomics tile`") from exc

