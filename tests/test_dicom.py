"""DICOM whole-slide images: a DICOM copy of an SVS fixture opens, reads and tiles like its original; bad DICOM fails clearly."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest

from pathomics.cli.main import main
from pathomics.errors import SlideReadError
from pathomics.manifest import entries_from_paths, read_manifest
from pathomics.slide import DicomTileSource, Resolution, TiffTileSource, is_dicom_slide, open_slide
from pathomics.slide.patches import read_patches
from pathomics.store import open_patch_store
from pathomics.synthetic import SlideTruth
from pathomics.synthetic.dicom import write_dicom_copy, write_non_wsi_dicom
from pathomics.tiling import TileConfig, tile_slide

WSIDICOM = "wsidicom (the pathomics[dicom] extra) is not installed"


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory: pytest.TempPathFactory, aperio_slide: SlideTruth) -> Path:
    """The aperio fixture converted to a DICOM series (one file a level, the same JPEG tiles), in folder ``aperio_dicom``."""
    folder = tmp_path_factory.mktemp("dicom") / "aperio_dicom"
    write_dicom_copy(aperio_slide.path, folder, aperio_slide.mpp)
    return folder


@pytest.fixture
def damaged(tmp_path: Path, dicom_slide: Path) -> Path:
    """A copy of the DICOM slide folder, to damage."""
    return Path(shutil.copytree(dicom_slide, tmp_path / "damaged"))


@pytest.mark.parametrize("which", ["folder", "level_0.dcm", "level_1.dcm"])
def test_dicom_slide_opens_as_its_svs_with_mpp_from_pixel_spacing(dicom_slide, aperio_slide, which):
    path = dicom_slide if which == "folder" else dicom_slide / which
    with open_slide(path) as dcm, open_slide(aperio_slide.path) as svs:
        assert (dcm.backend, dcm.vendor) == ("openslide", "dicom")
        assert dcm.resolution == svs.resolution == Resolution(0.25, "metadata")
        assert dcm.level_dimensions == svs.level_dimensions and dcm.level_downsamples == svs.level_downsamples
        for level, xy, size in [(0, (1000, 700), (600, 500)), (1, (400, 800), (300, 200))]:
            np.testing.assert_array_equal(dcm.read_region(xy, level, size), svs.read_region(xy, level, size))


def test_wsidicom_backend_reads_the_same_pixels(dicom_slide, aperio_slide):
    pytest.importorskip("wsidicom", reason=WSIDICOM)
    with open_slide(dicom_slide, backend="wsidicom") as dcm, open_slide(aperio_slide.path) as svs:
        assert (dcm.backend, dcm.vendor, dcm.resolution) == ("wsidicom", "dicom", Resolution(0.25, "metadata"))
        assert dcm.level_dimensions == svs.level_dimensions and dcm.level_downsamples == svs.level_downsamples
        # level 1 at level-0 (400, 800) = level-1 (100, 200); the last box hangs over the corner: white there, as OpenSlide
        for level, xy, size in [(0, (1000, 700), (600, 500)), (1, (400, 800), (300, 200)), (0, (6000, 4000), (300, 200))]:
            np.testing.assert_array_equal(dcm.read_region(xy, level, size), svs.read_region(xy, level, size))


def test_direct_frame_decoding_is_bit_identical_to_openslide(dicom_slide, aperio_slide):
    with open_slide(dicom_slide) as reference:
        frames = DicomTileSource.open(dicom_slide, reference.level_dimensions)
        assert frames is not None and frames.method == "dicom-tiles" and frames.tile_shape(1) == (256, 256)
        with ThreadPoolExecutor(2) as pool:
            for level, box in [(0, (1000, 700, 600, 500)), (1, (100, 50, 300, 250)), (0, (6144 - 300, 4096 - 200, 300, 200))]:
                frames.prefetch(frames.tiles_for(level, [box]), pool)
                x, y, w, h = box
                ds = int(reference.level_downsamples[level])
                np.testing.assert_array_equal(frames.assemble(level, box), reference.read_region((x * ds, y * ds), level, (w, h)))
        frames.close()
    with open_slide(aperio_slide.path) as svs:  # the SVS the frames were copied from
        tiles, frames = TiffTileSource.open(svs.path, svs.level_dimensions), DicomTileSource.open(dicom_slide, svs.level_dimensions)
        for source in (tiles, frames):  # DCT-scaled decoding, as tiling with resample="fast" and its thumbnails use
            assert source.jpeg_scale(0, 4.0) == 4
            source.prefetch(source.tiles_for(0, [(100, 80, 600, 400)], 4))
        np.testing.assert_array_equal(frames.assemble(0, (100, 80, 600, 400), 4), tiles.assemble(0, (100, 80, 600, 400), 4))
        tiles.close()
        frames.close()


@pytest.mark.parametrize("backend,target_mpp,frames", [("auto", 0.5, True), ("auto", 1.0, True), ("openslide", 1.0, False),
                                                        ("wsidicom", 1.0, False)])
def test_tiling_a_dicom_copy_gives_the_svs_patches(tmp_path, dicom_slide, aperio_slide, monkeypatch, backend, target_mpp, frames):
    if backend == "wsidicom":
        pytest.importorskip("wsidicom", reason=WSIDICOM)
    if not frames:  # read patches through the backend's read_region, not the direct frame path
        monkeypatch.setattr("pathomics.slide.DicomTileSource.open", classmethod(lambda cls, *a: None))
    config = TileConfig(target_mpp=target_mpp, patch_size=128, threads=2)
    svs = open_patch_store(tile_slide(aperio_slide.path, tmp_path / "svs", config).path)
    dcm = open_patch_store(tile_slide(dicom_slide, tmp_path / "dcm", config, backend=backend).path)
    assert dcm.attrs["slide_id"] == "aperio_dicom" and dcm.attrs["backend"] == ("openslide" if backend == "auto" else backend)
    assert (dcm.attrs["mpp_level0"], dcm.attrs["mpp_source"]) == (svs.attrs["mpp_level0"], "metadata")
    assert dcm.attrs["read_level"] == svs.attrs["read_level"] == (0 if target_mpp == 0.5 else 1)
    assert len(svs) > 20
    np.testing.assert_array_equal(dcm.coords, svs.coords)
    difference = np.abs(dcm.read_images(0, len(dcm)).astype(int) - svs.read_images(0, len(svs)).astype(int))
    assert difference.mean() <= 1.0


def test_a_dicom_slide_openslide_cannot_read_falls_back_to_wsidicom(tmp_path, aperio_slide):
    pytest.importorskip("wsidicom", reason=WSIDICOM)
    folder = tmp_path / "jpegls"
    write_dicom_copy(aperio_slide.path, folder, aperio_slide.mpp, codec="jpeg-ls")
    with pytest.raises(openslide.OpenSlideError, match="Unsupported transfer syntax"):
        openslide.OpenSlide(str(folder / "level_0.dcm"))
    with open_slide(folder) as dcm, open_slide(aperio_slide.path) as svs:
        assert (dcm.backend, dcm.resolution) == ("wsidicom", Resolution(0.25, "metadata"))
        for level, xy, size in [(0, (1000, 700), (600, 500)), (1, (400, 800), (300, 200))]:
            np.testing.assert_array_equal(dcm.read_region(xy, level, size), svs.read_region(xy, level, size))
    # exact: the JPEG-LS copy holds decoded pixels, which cannot be DCT-scaled as the SVS's JPEG tiles are with
    # resample="fast" (there its thumbnail, and so the tissue's outline, may differ by a pixel)
    config = TileConfig(target_mpp=1.0, patch_size=64, threads=2, resample="exact")
    svs_store = open_patch_store(tile_slide(aperio_slide.path, tmp_path / "svs", config).path)
    dcm_store = open_patch_store(tile_slide(folder, tmp_path / "dcm", config).path)
    np.testing.assert_array_equal(dcm_store.coords, svs_store.coords)
    assert np.abs(dcm_store.read_images(0, len(dcm_store)).astype(int) - svs_store.read_images(0, len(svs_store))).mean() <= 1.0


def test_a_coords_only_store_of_a_dicom_folder_rereads_its_pixels(tmp_path, dicom_slide):
    config = TileConfig(target_mpp=1.0, patch_size=64, threads=1)
    full = open_patch_store(tile_slide(dicom_slide, tmp_path / "full", config).path)
    coords_only = open_patch_store(tile_slide(dicom_slide, tmp_path / "coords", TileConfig(**{**config.__dict__, "with_pixels": False})).path)
    np.testing.assert_array_equal(read_patches(coords_only, 0, 5), full.read_images(0, 5))
    assert tile_slide(dicom_slide, tmp_path / "full", config).state == "skipped"


def test_a_dicom_folder_is_one_slide_named_after_the_folder(tmp_path, dicom_slide, aperio_slide):
    assert is_dicom_slide(dicom_slide) and is_dicom_slide(dicom_slide / "level_1.dcm")
    assert not is_dicom_slide(aperio_slide.path) and not is_dicom_slide(aperio_slide.path.parent)
    assert [(e.slide_path, e.slide_id) for e in entries_from_paths([dicom_slide])] == [(dicom_slide, "aperio_dicom")]
    archive = tmp_path / "archive"
    shutil.copytree(dicom_slide, archive / "case7")
    shutil.copy(aperio_slide.path, archive / "case8.svs")
    assert [e.slide_id for e in entries_from_paths([archive])] == ["case7", "case8"]
    shutil.copy(dicom_slide / "level_1.dcm", archive / "case9.dcm")  # a one-file DICOM slide beside an SVS: an archive
    assert [e.slide_id for e in entries_from_paths([archive])] == ["case7", "case8", "case9"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_path\n{dicom_slide}\n")
    assert read_manifest(manifest)[0].slide_id == "aperio_dicom"


def test_viewer_serves_a_dicom_folder_from_its_frames_with_the_svs_tiles(dicom_slide, aperio_slide):
    from pathomics.viewer import DeepZoom
    from pathomics.viewer.catalog import SlideEntry as ViewerEntry
    from pathomics.viewer.catalog import slide_file

    entry = ViewerEntry("aperio_dicom", dicom_slide / "x.zarr", dicom_slide, 0.25, 6144, 4096, 256)
    dcm, svs = DeepZoom(open_slide(slide_file(entry))), DeepZoom(open_slide(aperio_slide.path))
    try:
        assert dcm.direct and dcm.dzi() == svs.dzi()
        for level in (dcm.level_count - 1, dcm.level_count - 2, dcm.level_count - 4):  # full size, 2x and 8x (level 1) down
            np.testing.assert_array_equal(dcm.tile_array(level, 1, 1), svs.tile_array(level, 1, 1))
    finally:
        dcm.close()
        svs.close()


@pytest.mark.parametrize("given", ["folder", "file"])
def test_truncated_dicom_file_is_named(damaged, given):
    data = (damaged / "level_1.dcm").read_bytes()
    (damaged / "level_1.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match=r"level_1\.dcm: the DICOM file ends at byte \d+, before the end of its 24 frames.*truncated"):
        open_slide(damaged if given == "folder" else damaged / "level_0.dcm")


def test_dicom_file_cut_inside_its_header_is_named(damaged):
    data = (damaged / "level_0.dcm").read_bytes()
    (damaged / "level_0.dcm").write_bytes(data[:1000])
    with pytest.raises(SlideReadError, match=r"level_0\.dcm: the DICOM file has no pixel data.*truncated"):
        open_slide(damaged)


def test_non_wsi_dicom_is_refused_naming_the_file(tmp_path):
    path = write_non_wsi_dicom(tmp_path / "chest.dcm")
    assert not is_dicom_slide(path) and not is_dicom_slide(tmp_path)
    with pytest.raises(SlideReadError, match=r"chest\.dcm: a DICOM file of class 'Secondary Capture Image Storage', not a whole-slide image"):
        open_slide(path)
    with pytest.raises(SlideReadError, match=r"a folder, and not a DICOM slide"):
        open_slide(tmp_path)


def test_folder_with_two_dicom_slides_is_refused(damaged, aperio_slide):
    write_dicom_copy(aperio_slide.path, damaged / "second", aperio_slide.mpp)
    for f in (damaged / "second").iterdir():
        f.rename(damaged / f"second_{f.name}")
    with pytest.raises(SlideReadError, match=r"damaged: the folder holds 2 DICOM slides"):
        open_slide(damaged)


def test_cli_tiles_a_dicom_folder_and_names_a_bad_file(tmp_path, dicom_slide, capsys):
    bad = write_non_wsi_dicom(tmp_path / "scan.dcm")
    code = main(["tile", str(dicom_slide), str(bad), "--out", str(tmp_path / "out"), "--mpp", "1.0", "--patch-size", "64"])
    assert code == 1
    assert open_patch_store(tmp_path / "out" / "tiles" / "aperio_dicom.zarr").attrs["mpp_source"] == "metadata"
    assert "scan.dcm: a DICOM file of class" in capsys.readouterr().out


@pytest.mark.parametrize("size", [0, 132, 300])
@pytest.mark.parametrize("given", ["folder", "level_1.dcm"])
def test_a_level_0_file_cut_to_a_few_bytes_fails_the_slide(damaged, size, given):
    """The unreadable level-0 file was skipped and the slide tiled from level 1, upsampled, with exit 0."""
    data = (damaged / "level_0.dcm").read_bytes()
    (damaged / "level_0.dcm").write_bytes(data[:size])
    with pytest.raises(SlideReadError, match=rf"level_0\.dcm: not a readable DICOM file \({size} bytes\).*re-copy it"):
        open_slide(damaged if given == "folder" else damaged / given)
