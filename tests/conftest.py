"""Shared fixtures: real pyramidal JPEG TIFF slides written once per session, opened like a user's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pathomics.synthetic import SlideTruth, write_slide


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def aperio_slide(slide_dir: Path) -> SlideTruth:
    """SVS-flavoured, 0.25 µm/px, one elliptical piece of tissue, pyramid downsamples 1 and 4."""
    return write_slide(slide_dir / "aperio.svs", 6144, 4096, mpp=0.25, flavour="aperio", layout="blob", seed=1)


@pytest.fixture(scope="session")
def generic_slide(slide_dir: Path) -> SlideTruth:
    """Generic tiled TIFF with resolution tags, three pieces of tissue, pyramid downsamples 1, 2, 4."""
    return write_slide(slide_dir / "generic.tif", 5120, 4096, mpp=0.25, flavour="generic", layout="pieces", seed=2, level_factor=2)


@pytest.fixture(scope="session")
def ring_slide(slide_dir: Path) -> SlideTruth:
    """Tissue with a large lumen that must stay a hole."""
    return write_slide(slide_dir / "ring.svs", 5120, 4096, mpp=0.25, layout="ring", seed=3)


@pytest.fixture(scope="session")
def blank_slide(slide_dir: Path) -> SlideTruth:
    return write_slide(slide_dir / "blank.svs", 4096, 3072, mpp=0.25, layout="none")


@pytest.fixture(scope="session")
def no_mpp_slide(slide_dir: Path) -> SlideTruth:
    return write_slide(slide_dir / "nompp.tif", 4096, 3072, mpp=None, flavour="generic", layout="blob")


@pytest.fixture(scope="session")
def slide_0263(slide_dir: Path) -> SlideTruth:
    """A 0.263 µm/px scan: 256 px at 0.5 µm/px must read 487 level-0 px."""
    return write_slide(slide_dir / "mpp0263.svs", 6144, 4096, mpp=0.263, layout="blob", seed=4)


@pytest.fixture(scope="session")
def aperio_rgb(slide_dir: Path) -> SlideTruth:
    """Tiles as Aperio writes them: RGB JPEG with no colour marker, abbreviated streams sharing JPEGTables."""
    return write_slide(slide_dir / "aperio_rgb.svs", 3072, 2048, mpp=0.25, seed=6, rgb_jpeg=True)


@pytest.fixture(scope="session")
def slide_240(slide_dir: Path) -> SlideTruth:
    """240-px tiles at 0.263 µm/px, one level: every target MPP is a non-integer downsample of level 0."""
    return write_slide(slide_dir / "t240.svs", 2880, 1920, mpp=0.263, seed=7, tile=240, min_level_size=4096)


@pytest.fixture(scope="session")
def truncated_slide(slide_dir: Path, aperio_slide: SlideTruth) -> Path:
    path = slide_dir / "truncated.svs"
    data = aperio_slide.path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.fixture(scope="session")
def text_slide(slide_dir: Path) -> Path:
    path = slide_dir / "notes.svs"
    path.write_text("this is a text file, not a slide\n")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process() -> None:
    """One numeric thread per test process, in this process and the ones it starts: the suite runs one process
    per core (pytest -n auto), and two threads each oversubscribe the cores (a tiny MIL model trained 8-18x slower
    on two threads than on one with the other core busy)."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
