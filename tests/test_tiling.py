"""Tile grid and patch store: exact physical size, pixels equal to OpenSlide's, schema, skip and rebuild."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import cv2
import numpy as np
import openslide
import pytest
import zarr

from pathomics.errors import StoreError
from pathomics.slide import open_slide
from pathomics.slide.patches import read_patches
from pathomics.io import partial_path
from pathomics.layout import OutputLayout
from pathomics.store import STORE_ATTRS, open_patch_store
from pathomics.tiling import TileConfig, patch_size_level0, tile_slide, tissue_fractions


def openslide_rgb(path, xy, level, size) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region(tuple(int(v) for v in xy), level, size).convert("RGB"))


def test_native_resolution_patches_equal_read_region(tmp_path, aperio_slide):
    result = tile_slide(aperio_slide.path, tmp_path, TileConfig(target_mpp=0.25, patch_size=256))
    store = open_patch_store(result.path)
    assert store.attrs["read_level"] == 0 and store.attrs["patch_size_level0"] == 256
    for i in [0, len(store) // 2, len(store) - 1]:
        np.testing.assert_array_equal(store.read_images(i, i + 1)[0], openslide_rgb(aperio_slide.path, store.coords[i], 0, (256, 256)))


@pytest.mark.parametrize("fixture,level", [("aperio_slide", 0), ("generic_slide", 1)])
def test_coarser_target_matches_area_downsampled_level0(tmp_path, fixture, level, request):
    truth = request.getfixturevalue(fixture)
    store = open_patch_store(tile_slide(truth.path, tmp_path, TileConfig(target_mpp=0.5, patch_size=128)).path)
    assert store.attrs["read_level"] == level  # generic slide has a 2x level: read it, never upsample
    assert store.attrs["patch_size_level0"] == 256
    for i in range(0, len(store), max(1, len(store) // 5)):
        level0 = openslide_rgb(truth.path, store.coords[i], 0, (256, 256))
        expected = cv2.resize(level0, (128, 128), interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(store.read_images(i, i + 1)[0].astype(int) - expected).mean() <= 2.0


def test_exact_physical_patch_size(tmp_path, slide_0263):
    assert patch_size_level0(256, 0.5, 0.263) == 487
    store = open_patch_store(tile_slide(slide_0263.path, tmp_path, TileConfig(target_mpp=0.5)).path)
    assert store.attrs["patch_size_level0"] == 487
    assert store.attrs["downsample"] == pytest.approx(0.5 / 0.263)
    steps = np.unique(np.diff(np.unique(store.coords[:, 0])))
    assert set(steps) <= {486, 487}  # the grid advances by 486.69 level-0 px, rounded
    with open_slide(slide_0263.path) as slide:
        x, y = store.coords[3]
        level0 = slide.read_region((int(x), int(y)), 0, (487, 487))
    expected = cv2.resize(level0, (256, 256), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(store.read_images(3, 4)[0].astype(int) - expected).mean() <= 1.0


def test_store_schema_and_tissue_rule(tmp_path, generic_slide):
    config = TileConfig(target_mpp=0.5, patch_size=128, overlap=32, min_tissue=0.75)
    store = open_patch_store(tile_slide(generic_slide.path, tmp_path, config).path)
    root = zarr.open_group(store.path, mode="r")
    assert root.metadata.zarr_format == 3
    assert set(STORE_ATTRS) <= set(store.attrs) and store.attrs["complete"] is True
    assert root["images"].dtype == np.uint8 and root["images"].shape == (len(store), 128, 128, 3)
    assert root["images"].shards is not None and root["images"].shards[0] > root["images"].chunks[0]
    assert root["coords"].dtype == np.int64 and root["tissue_fraction"].dtype == np.float32
    assert store.attrs["mpp_source"] == "tiff-resolution" and store.attrs["overlap"] == 32
    assert (store.tissue_fraction >= 0.75).all()
    truth = generic_slide.tissue()
    from shapely.geometry import box

    for (x, y), fraction in zip(store.coords[::7], store.tissue_fraction[::7]):
        assert truth.intersection(box(x, y, x + 256, y + 256)).area / 256**2 == pytest.approx(fraction, abs=0.08)
    assert len(np.unique(store.coords, axis=0)) == len(store)
    x_steps = np.diff(np.unique(store.coords[:, 0]))
    assert x_steps.min() == 192  # (128 - 32) px at 2x
    assert (store.path.parent / "generic.tissue.geojson").exists() and (store.path.parent / "generic.thumb.png").exists()


def test_tissue_fractions_equal_exact_intersections_inside_outside_on_edges_and_over_holes():
    from shapely.geometry import MultiPolygon, Polygon, box

    ring = Polygon([(0, 0), (1000, 0), (1000, 800), (0, 800)], [[(400, 300), (600, 300), (600, 500), (400, 500)]])
    tissue = MultiPolygon([ring, Polygon([(1200, 0), (1500, 300), (1200, 600)])])
    step = np.arange(-100, 1600, 37)
    xs, ys = (a.ravel() for a in np.meshgrid(step, step))
    fractions = tissue_fractions(tissue, xs, ys, 100)
    exact = [tissue.intersection(box(x, y, x + 100, y + 100)).area / 100**2 for x, y in zip(xs, ys)]
    np.testing.assert_allclose(fractions, exact, atol=1e-12)
    assert {0.0, 1.0} <= set(fractions.tolist()) and ((fractions > 0) & (fractions < 1)).sum() > 50


def test_all_background_slide_gives_empty_complete_store_and_warning(tmp_path, blank_slide, caplog):
    result = tile_slide(blank_slide.path, tmp_path, TileConfig())
    assert result.n_patches == 0
    assert len(open_patch_store(result.path)) == 0
    assert "no tissue" in caplog.text


def test_rerun_skips_unchanged_and_rebuilds_changed(tmp_path, aperio_slide):
    config = TileConfig(target_mpp=1.0, patch_size=64)
    first = tile_slide(aperio_slide.path, tmp_path, config)
    assert first.state == "done"
    assert tile_slide(aperio_slide.path, tmp_path, config).state == "skipped"
    changed = tile_slide(aperio_slide.path, tmp_path, replace(config, min_tissue=0.9))
    assert changed.state == "done"
    assert open_patch_store(changed.path).attrs["min_tissue"] == 0.9
    assert changed.n_patches < first.n_patches


def test_coords_only_store_reads_pixels_from_the_slide(tmp_path, aperio_slide):
    config = TileConfig(target_mpp=1.0, patch_size=64)
    with_pixels = open_patch_store(tile_slide(aperio_slide.path, tmp_path / "a", config).path)
    coords_only = open_patch_store(tile_slide(aperio_slide.path, tmp_path / "b", replace(config, with_pixels=False)).path)
    assert not coords_only.has_pixels and "images" not in zarr.open_group(coords_only.path, mode="r")
    np.testing.assert_array_equal(coords_only.coords, with_pixels.coords)
    np.testing.assert_array_equal(read_patches(coords_only, 5, 40), with_pixels.read_images(5, 40))
    with pytest.raises(StoreError, match="coords-only"):
        coords_only.read_images(0, 1)


def test_openslide_path_equals_tile_decoding_path(tmp_path, generic_slide, monkeypatch):
    config = TileConfig(target_mpp=0.5, patch_size=128)
    fast = open_patch_store(tile_slide(generic_slide.path, tmp_path / "fast", config).path)
    monkeypatch.setattr("pathomics.slide.TiffTileSource.open", classmethod(lambda cls, *a: None))
    slow = open_patch_store(tile_slide(generic_slide.path, tmp_path / "slow", config).path)
    np.testing.assert_array_equal(fast.read_images(0, len(fast)), slow.read_images(0, len(slow)))


def test_user_geojson_replaces_detection(tmp_path, aperio_slide):
    from shapely.geometry import MultiPolygon, box

    from pathomics.tissue import write_geojson

    region = MultiPolygon([box(1024, 1024, 2048, 2048)])
    write_geojson(region, tmp_path / "roi.geojson")
    store = open_patch_store(tile_slide(aperio_slide.path, tmp_path, TileConfig(target_mpp=0.5, patch_size=128),
                                        tissue_geojson=tmp_path / "roi.geojson").path)
    assert len(store) == 16 and store.attrs["tissue_method"].startswith("geojson:")
    assert store.coords.min() >= 1024 and store.coords.max() <= 2048 - 256


def test_incomplete_store_is_refused(tmp_path, aperio_slide):
    store = tile_slide(aperio_slide.path, tmp_path, TileConfig(target_mpp=1.0, patch_size=64)).path
    meta = store / "zarr.json"
    data = json.loads(meta.read_text())
    data["attributes"]["complete"] = False
    meta.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="incomplete"):
        open_patch_store(store)
    with pytest.raises(StoreError, match="no patch store"):
        open_patch_store(partial_path(store))


def test_invalid_config_is_refused():
    for bad in [dict(target_mpp=0), dict(patch_size=4), dict(overlap=256), dict(min_tissue=1.5)]:
        with pytest.raises(ValueError):
            TileConfig(**bad)



@pytest.mark.slow
def test_tiling_a_new_slide_imports_neither_pandas_nor_zarr(tmp_path, aperio_slide):
    """The tile stage writes its store, QC table and summary without them: their imports were a third of a CLI run."""
    script = (f"import sys; from pathomics.tiling import tile_slide; tile_slide({str(aperio_slide.path)!r}, {str(tmp_path)!r}); "
              "print(sorted({'pandas', 'zarr'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert open_patch_store(OutputLayout(tmp_path).store("aperio")).attrs["qc"]["patches"] > 0
