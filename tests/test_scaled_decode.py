"""Decoding at the scale a patch needs: JPEG stream repair, DCT-scaled decode, fast vs exact resampling."""

from __future__ import annotations

import cv2
import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from pathomics.cli.main import main
from pathomics.slide import TiffTileSource, open_slide
from pathomics.slide.jpeg import complete_stream, decode_scaled, scale_for
from pathomics.slide.patches import PatchReader, read_thumbnail
from pathomics.store import open_patch_store
from pathomics.synthetic import write_slide
from pathomics.tiling import TileConfig, tile_slide


def tissue_tile(path):
    """(level-0 page, tile index, raw bytes) of the largest level-0 tile (one full of tissue texture)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = int(np.argmax(page.databytecounts))
        _ = page.jpegtables, page.is_jfif
        tif.filehandle.seek(page.dataoffsets[index])
        return page, index, tif.filehandle.read(page.databytecounts[index])


def test_aperio_rgb_tiles_decode_only_with_tables_and_the_rgb_marker(aperio_rgb):
    page, index, data = tissue_tile(aperio_rgb.path)
    assert page.photometric == 2 and page.jpegtables is not None and not page.is_jfif
    truth, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
    truth = truth.reshape(256, 256, 3)
    with pytest.raises(Exception):  # noqa: B017 - an abbreviated stream has no tables of its own
        imagecodecs.jpeg8_decode(data)
    guessed = decode_scaled(complete_stream(data, page.jpegtables, rgb=False), (256, 256), 1)
    assert np.abs(guessed.astype(int) - truth).mean() > 20  # read as YCbCr: wrong colours
    np.testing.assert_array_equal(decode_scaled(complete_stream(data, page.jpegtables, rgb=True), (256, 256), 1), truth)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_dct_scaled_decode_is_close_to_full_decode_then_area_resize(aperio_slide, scale):
    page, index, data = tissue_tile(aperio_slide.path)
    full = page.decode(data, index)[0].reshape(256, 256, 3)
    scaled = decode_scaled(complete_stream(data, page.jpegtables, rgb=False), (256, 256), scale)
    assert scaled.shape == (256 // scale, 256 // scale, 3)
    area = cv2.resize(full, scaled.shape[:2], interpolation=cv2.INTER_AREA)
    assert np.abs(scaled.astype(int) - area).mean() < 1.0


def test_scale_is_the_largest_power_of_two_that_fits_the_factor_and_the_tile():
    assert [scale_for(f, (256, 256)) for f in (1.0, 1.9, 2.0, 3.8, 4.0, 7.9, 8.0, 20.0)] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert scale_for(8.0, (240, 240)) == 8 and scale_for(8.0, (100, 100)) == 4


@pytest.mark.parametrize("fixture,target,scale", [
    ("aperio_rgb", 0.5, 2),   # 512 level-0 px -> 256: decoded at 1/2, nothing left to resample
    ("slide_240", 1.0, 2),    # 487 -> 128: 1/2, then 1.90x
    ("slide_240", 2.0, 4),    # 973 -> 128: 1/4, then 1.90x
    ("slide_240", 2.5, 8),    # 1217 -> 128: 1/8, then 1.19x
    ("aperio_slide", 0.9, 2),  # 922 -> 256 from level 0 (the next level is 4x): 1/2, then 1.80x
])
def test_fast_path_is_within_two_grey_levels_of_openslide_area_resized(tmp_path, fixture, target, scale, request):
    truth = request.getfixturevalue(fixture)
    patch = 128 if fixture == "slide_240" else 256
    store = open_patch_store(tile_slide(truth.path, tmp_path, TileConfig(target_mpp=target, patch_size=patch)).path)
    assert store.attrs["resample"] == "fast" and store.attrs["read_level"] == 0
    with open_slide(truth.path) as slide:
        reader = PatchReader(slide, 0, store.attrs["read_size"], patch, resample="fast")
        assert reader.scale == scale
        reader.close()
    size0 = store.attrs["patch_size_level0"]
    with openslide.OpenSlide(str(truth.path)) as reference:
        for i in range(0, len(store), max(1, len(store) // 8)):
            x, y = (int(v) for v in store.coords[i])
            level0 = np.asarray(reference.read_region((x, y), 0, (size0, size0)).convert("RGB"))
            expected = cv2.resize(level0, (patch, patch), interpolation=cv2.INTER_AREA).astype(int)
            assert np.abs(store.read_images(i, i + 1)[0].astype(int) - expected).mean() <= 2.0


def test_exact_path_is_bit_identical_to_openslide_read_then_area_resize(tmp_path, aperio_rgb):
    config = TileConfig(target_mpp=0.5, patch_size=256, resample="exact")
    store = open_patch_store(tile_slide(aperio_rgb.path, tmp_path, config).path)
    assert store.attrs["resample"] == "exact"
    with openslide.OpenSlide(str(aperio_rgb.path)) as reference:
        for i in range(0, len(store), max(1, len(store) // 6)):
            x, y = (int(v) for v in store.coords[i])
            level0 = np.asarray(reference.read_region((x, y), 0, (512, 512)).convert("RGB"))
            np.testing.assert_array_equal(store.read_images(i, i + 1)[0], cv2.resize(level0, (256, 256), interpolation=cv2.INTER_AREA))


def test_lossless_tiles_fall_back_to_full_decode(tmp_path):
    truth = write_slide(tmp_path / "lzw.tif", 2048, 1536, mpp=0.25, flavour="generic", seed=8, compression="lzw")
    with openslide.OpenSlide(str(truth.path)) as reference:
        tiles = TiffTileSource.open(truth.path, reference.level_dimensions)
    assert tiles is not None and tiles.jpeg_scale(0, 4.0) == 1
    tiles.close()
    fast = open_patch_store(tile_slide(truth.path, tmp_path / "fast", TileConfig(target_mpp=1.0, patch_size=64)).path)
    exact = open_patch_store(tile_slide(truth.path, tmp_path / "exact", TileConfig(target_mpp=1.0, patch_size=64, resample="exact")).path)
    assert len(fast) > 0
    np.testing.assert_array_equal(fast.read_images(0, len(fast)), exact.read_images(0, len(exact)))


def test_resample_choice_is_provenance_and_a_change_rebuilds(tmp_path, aperio_slide):
    args = ["tile", str(aperio_slide.path), "--out", str(tmp_path), "--mpp", "0.9", "--patch-size", "64"]
    assert main([*args, "--resample", "exact"]) == 0
    store = tmp_path / "tiles" / "aperio.zarr"
    exact = open_patch_store(store)
    assert exact.attrs["resample"] == "exact"
    first = exact.read_images(0, len(exact))
    assert main(args) == 0
    fast = open_patch_store(store)
    assert fast.attrs["resample"] == "fast"
    assert not np.array_equal(fast.read_images(0, len(fast)), first)  # rebuilt, with scaled decoding
    with pytest.raises(ValueError, match="resample"):
        TileConfig(resample="nearest")


@pytest.mark.parametrize("fixture", ["aperio_rgb", "slide_240"])
def test_thumbnail_from_tiles_equals_the_read_region_thumbnail(fixture, request, monkeypatch):
    truth = request.getfixturevalue(fixture)
    with open_slide(truth.path) as slide:
        direct, downsample = read_thumbnail(slide, 4.0, "exact")
        monkeypatch.setattr("pathomics.slide.tiff_tiles.TiffTileSource.open", classmethod(lambda cls, *a: None))
        reference, same = read_thumbnail(slide, 4.0, "exact")
    assert downsample == same
    np.testing.assert_array_equal(direct, reference)


def test_a_fast_thumbnail_decodes_the_jpeg_tiles_scaled_and_stays_near_the_exact_one(tmp_path, monkeypatch):
    """A biopsy-like slide with no 16x level: the 8 µm/px thumbnail comes from the 4x level, decoded at 1/4."""
    truth = write_slide(tmp_path / "biopsy.svs", 4096, 3072, mpp=0.5, seed=3)
    decoded: list[int] = []
    decode = TiffTileSource._decode
    monkeypatch.setattr(TiffTileSource, "_decode", lambda self, key: decoded.append(key[1]) or decode(self, key))
    with open_slide(truth.path) as slide:
        assert slide.level_downsamples == (1.0, 4.0)
        exact, downsample = read_thumbnail(slide, 8.0, "exact")
        assert set(decoded) == {1}
        decoded.clear()
        fast, same = read_thumbnail(slide, 8.0, "fast")
        assert set(decoded) == {4} and same == downsample and fast.shape == exact.shape
        assert np.abs(fast.astype(int) - exact).mean() < 2.0
