"""Tissue detection against the fixtures' true geometry, and GeoJSON round trips."""

from __future__ import annotations

import json

import pytest
from shapely.geometry import MultiPolygon, box

from pathomics.errors import PathomicsError
from pathomics.slide import open_slide
from pathomics.tissue import detect_tissue, read_geojson, write_geojson


def dice(a, b) -> float:
    return 2 * a.intersection(b).area / (a.area + b.area)


@pytest.mark.parametrize("fixture", ["aperio_slide", "generic_slide", "ring_slide"])
def test_detected_tissue_matches_truth(fixture, request):
    truth = request.getfixturevalue(fixture)
    with open_slide(truth.path) as slide:
        tissue = detect_tissue(slide)
    score = dice(tissue.polygons, truth.tissue())
    assert score >= 0.9, f"{fixture}: Dice {score:.3f}"


def test_ring_keeps_its_lumen(ring_slide):
    with open_slide(ring_slide.path) as slide:
        polygons = detect_tissue(slide).polygons
    centre = ring_slide.width / 2, ring_slide.height / 2
    assert not polygons.contains(box(centre[0] - 50, centre[1] - 50, centre[0] + 50, centre[1] + 50))
    assert sum(len(p.interiors) for p in polygons.geoms) >= 1


def test_separate_pieces_stay_separate(generic_slide):
    with open_slide(generic_slide.path) as slide:
        assert len(detect_tissue(slide).polygons.geoms) == 3


def test_blank_slide_has_no_tissue(blank_slide):
    with open_slide(blank_slide.path) as slide:
        assert detect_tissue(slide).polygons.is_empty


def test_geojson_round_trip_is_qupath_shaped(tmp_path, ring_slide):
    polygons = ring_slide.tissue()
    path = tmp_path / "t.geojson"
    write_geojson(polygons, path)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    assert data["features"][0]["properties"]["objectType"] == "annotation"
    back = read_geojson(path)
    assert isinstance(back, MultiPolygon)
    assert back.symmetric_difference(polygons).area < 1e-6 * polygons.area


def test_geojson_without_polygons_is_refused(tmp_path):
    path = tmp_path / "points.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}))
    with pytest.raises(PathomicsError, match="no Polygon"):
        read_geojson(path)
