"""open_slide: backends, the MPP chain, and one clear error per kind of bad file."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from pathomics.errors import SlideReadError
from pathomics.slide import TiffTileSource, magnification_to_mpp, open_slide
from pathomics.slide.patches import read_thumbnail


def test_aperio_slide_reports_vendor_and_metadata_mpp(aperio_slide):
    with open_slide(aperio_slide.path) as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == "aperio"
        assert slide.resolution.mpp == pytest.approx(0.25)
        assert slide.resolution.source == "metadata"
        assert slide.dimensions == (6144, 4096)
        assert slide.level_downsamples[:2] == pytest.approx((1.0, 4.0))


def test_generic_tiff_mpp_comes_from_resolution_tags(generic_slide):
    with open_slide(generic_slide.path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.resolution.mpp == pytest.approx(0.25)
        assert slide.resolution.source == "tiff-resolution"


def test_user_mpp_overrides_and_is_recorded(aperio_slide, no_mpp_slide):
    with open_slide(no_mpp_slide.path, mpp=0.5) as slide:
        assert (slide.mpp, slide.resolution.source) == (0.5, "user")
    with open_slide(aperio_slide.path, mpp=0.26) as slide:
        assert (slide.mpp, slide.resolution.source) == (0.26, "user")


def test_slide_without_mpp_says_how_to_give_it(no_mpp_slide):
    with pytest.raises(SlideReadError, match=r"nompp\.tif.*--slide-mpp"):
        open_slide(no_mpp_slide.path)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 1000])
def test_implausible_user_mpp_is_refused(aperio_slide, bad):
    with pytest.raises(SlideReadError, match="not a plausible"):
        open_slide(aperio_slide.path, mpp=bad)


def test_text_file_named_svs_is_not_a_slide(text_slide):
    with pytest.raises(SlideReadError, match=r"notes\.svs: not a slide"):
        open_slide(text_slide)


def test_missing_path(tmp_path):
    with pytest.raises(SlideReadError, match="no such slide file"):
        open_slide(tmp_path / "absent.svs")


def test_truncated_slide_fails_on_read_naming_the_file(truncated_slide):
    with pytest.raises(SlideReadError, match=r"truncated\.svs.*(truncated|corrupt)"):
        with open_slide(truncated_slide) as slide:
            read_thumbnail(slide, 8.0)
            w, h = slide.dimensions
            slide.read_region((0, 0), 0, (w, h))


def test_tiffslide_backend_reads_the_same_pixels(generic_slide):
    with open_slide(generic_slide.path, backend="tiffslide") as a, open_slide(generic_slide.path, backend="openslide") as b:
        assert a.backend == "tiffslide" and a.resolution.source == "tiff-resolution"
        np.testing.assert_array_equal(a.read_region((1000, 900), 0, (300, 200)), b.read_region((1000, 900), 0, (300, 200)))


def test_direct_tile_decoding_is_bit_identical_to_openslide(aperio_slide):
    reference = openslide.OpenSlide(str(aperio_slide.path))
    tiles = TiffTileSource.open(aperio_slide.path, reference.level_dimensions)
    assert tiles is not None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        for level, box in [(0, (1000, 700, 600, 500)), (1, (100, 50, 300, 250)), (0, (6144 - 300, 4096 - 200, 300, 200))]:
            tiles.prefetch(tiles.tiles_for(level, [box]), pool)
            x, y, w, h = box
            ds = int(reference.level_downsamples[level])
            expected = np.asarray(reference.read_region((x * ds, y * ds), level, (w, h)).convert("RGB"))
            np.testing.assert_array_equal(tiles.assemble(level, box), expected)
    tiles.close()


def test_magnification_converts_to_mpp():
    assert magnification_to_mpp(40) == 0.25
    assert magnification_to_mpp(20) == 0.5
    with pytest.raises(ValueError):
        magnification_to_mpp(0)


@pytest.mark.parametrize("resample", ["exact", "fast"])
def test_thumbnail_has_the_requested_scale(aperio_slide, resample):
    with open_slide(aperio_slide.path) as slide:
        image, downsample = read_thumbnail(slide, 4.0, resample)
        assert downsample == pytest.approx(16.0)
        assert image.shape == (256, 384, 3)
