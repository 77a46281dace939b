"""Tissue detection on a low-resolution thumbnail, as shapely polygons in level-0 pixels.

H&E tissue is stained (saturated) and absorbs light; glass is white and grey. The mask is an Otsu
threshold on saturation, floored so that an empty slide stays empty, AND-ed with an optical-density
floor, cleaned by morphology, with small holes filled and small specks removed. Polygons keep real
holes (lumens, tears) and are saved as QuPath-compatible GeoJSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping, shape

from pathomics.errors import ConfigError, PathomicsError
from pathomics.slide import SlideReader
from pathomics.slide.patches import read_thumbnail
from pathomics.io import atomic_path

MIN_SATURATION = 20   # 0-255: below this nothing is stained, whatever Otsu says
MIN_OPTICAL_DENSITY = 0.05
# optical density -log10((v + 1) / 256) of each 8-bit value, looked up instead of computed per pixel
OPTICAL_DENSITY = -np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)


@dataclass(frozen=True)
class TissueConfig:
    """Parameters of the detector, in physical units so they mean the same on every scanner."""

    thumbnail_mpp: float = 8.0
    min_tissue_area_um2: float = 20_000.0   # specks smaller than ~140 µm across are dropped
    max_hole_area_um2: float = 10_000.0     # holes smaller than this are filled
    closing_um: float = 16.0

    def __post_init__(self) -> None:
        if self.thumbnail_mpp <= 0 or self.min_tissue_area_um2 < 0 or self.max_hole_area_um2 < 0 or self.closing_um < 0:
            raise ConfigError(f"invalid tissue detection parameters: {self}")


@dataclass(frozen=True)
class Tissue:
    """Detected (or user-given) tissue: polygons in level-0 pixels, plus the thumbnail they came from."""

    polygons: MultiPolygon
    thumbnail: np.ndarray
    thumbnail_downsample: float
    method: str


def tissue_mask(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``mpp`` µm wide."""
    import cv2

    smooth = cv2.medianBlur(np.ascontiguousarray(rgb), 3)
    saturation = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)[..., 1]
    optical_density = cv2.transform(cv2.LUT(smooth, OPTICAL_DENSITY), np.full((1, 3), 1 / 3, np.float32))
    if saturation.max() < MIN_SATURATION:
        return np.zeros(saturation.shape, dtype=bool)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    threshold = max(float(otsu), MIN_SATURATION)
    mask = (saturation > threshold) & (optical_density > MIN_OPTICAL_DENSITY)
    radius = max(1, round(config.closing_um / mpp / 2))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, disk)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    px_area = mpp * mpp
    mask = ~_without_small_components(~mask, max(1, int(config.max_hole_area_um2 / px_area)))
    return _without_small_components(mask, max(1, int(config.min_tissue_area_um2 / px_area)))


def _without_small_components(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` less its 4-connected components of at most ``max_size`` pixels (OpenCV: no scikit-image import at start-up)."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] > max_size
    keep[0] = False  # label 0: the pixels outside ``mask``
    return keep[labels]


def mask_to_polygons(mask: np.ndarray, downsample: float) -> MultiPolygon:
    """Polygons (with holes) outlining ``mask``, scaled to level-0 pixels by ``downsample``."""
    import cv2

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return MultiPolygon()
    # pixel i covers [i, i+1) in thumbnail space; contour points are pixel centres
    rings = [(c.reshape(-1, 2).astype(np.float64) + 0.5) * downsample for c in contours]
    polygons = []
    for i, (_, _, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(rings[i]) < 3:
            continue
        holes, child = [], first_child
        while child != -1:
            if len(rings[child]) >= 3:
                holes.append(rings[child])
            child = hierarchy[0][child][0]
        polygons.append(Polygon(rings[i], holes))
    return _as_multipolygon(shapely.make_valid(shapely.union_all(polygons)))


def detect_tissue(slide: SlideReader, config: TissueConfig = TissueConfig(), resample: str = "fast") -> Tissue:
    """Detect tissue on a thumbnail of ``slide`` at ``config.thumbnail_mpp`` (``resample`` as for tiling)."""
    thumbnail, downsample = read_thumbnail(slide, config.thumbnail_mpp, resample)
    mask = tissue_mask(thumbnail, slide.mpp * downsample, config)
    return Tissue(mask_to_polygons(mask, downsample), thumbnail, downsample, "otsu-saturation")


def load_tissue(slide: SlideReader, geojson: str | os.PathLike, config: TissueConfig = TissueConfig(),
                resample: str = "fast") -> Tissue:
    """Tissue from a user's GeoJSON (e.g. QuPath annotations, level-0 pixels) instead of detection."""
    thumbnail, downsample = read_thumbnail(slide, config.thumbnail_mpp, resample)
    return Tissue(read_geojson(geojson), thumbnail, downsample, f"geojson:{Path(geojson).name}")


def write_geojson(polygons: MultiPolygon, path: str | os.PathLike) -> None:
    """Save polygons as a QuPath-compatible GeoJSON FeatureCollection of tissue annotations."""
    features = [{
        "type": "Feature",
        "geometry": mapping(poly),
        "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
    } for poly in polygons.geoms]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def read_geojson(path: str | os.PathLike) -> MultiPolygon:
    """Polygons from a GeoJSON FeatureCollection, Feature or geometry (QuPath exports included)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PathomicsError(f"{path}: cannot read tissue GeoJSON ({exc})") from exc
    if isinstance(data, list):  # QuPath can export a bare list of features
        data = {"type": "FeatureCollection", "features": data}
    items = data.get("features", [data]) if isinstance(data, dict) else []
    geoms = [shape(f.get("geometry", f)) for f in items if isinstance(f, dict)]
    polygons = [g for g in geoms if g.geom_type in ("Polygon", "MultiPolygon")]
    if not polygons:
        raise PathomicsError(f"{path}: no Polygon or MultiPolygon in the GeoJSON; draw tissue annotations and export them again")
    return _as_multipolygon(shapely.make_valid(shapely.union_all(polygons)))


def _as_multipolygon(geom: shapely.Geometry) -> MultiPolygon:
    """Keep the areal parts of a geometry as one MultiPolygon."""
    if isinstance(geom, Polygon):
        return MultiPolygon([geom]) if not geom.is_empty else MultiPolygon()
    if isinstance(geom, MultiPolygon):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return _as_multipolygon(shapely.union_all(parts)) if parts else MultiPolygon()
