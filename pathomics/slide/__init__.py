"""Open whole-slide images: ``open_slide`` picks a backend and settles the level-0 MPP.

OpenSlide is tried first and tiffslide second (wsidicom second for DICOM). A DICOM slide is one .dcm
file of its series or the folder holding the series; its files are checked before any backend opens them.
The MPP comes from the slide's vendor metadata (DICOM: the pixel spacing), else from its TIFF resolution
tags; a value the user gives (argument or manifest column) overrides both. Without any, opening fails
with a message telling the user to give the slide MPP (``--slide-mpp``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pathomics.errors import ConfigError, SlideReadError
from pathomics.slide.base import Resolution, SlideReader, magnification_to_mpp, plausible_mpp, source_stat
from pathomics.slide.dicom_backend import DicomSlideReader, dicom_series, is_dicom_file, is_dicom_slide
from pathomics.slide.dicom_tiles import DicomTileSource
from pathomics.slide.openslide_backend import OpenSlideReader
from pathomics.slide.tiff_tiles import TiffTileSource, TileSource
from pathomics.slide.tiffslide_backend import TiffSlideReader

__all__ = ["open_slide", "open_tile_source", "is_dicom_slide", "source_stat", "SlideReader", "Resolution", "TileSource",
           "TiffTileSource", "DicomTileSource", "magnification_to_mpp", "BACKENDS"]
log = logging.getLogger(__name__)
BACKENDS: dict[str, type[OpenSlideReader] | type[TiffSlideReader] | type[DicomSlideReader]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
    "wsidicom": DicomSlideReader,
}


def open_slide(path: str | os.PathLike, mpp: float | None = None, backend: str = "auto") -> SlideReader:
    """Open ``path`` with ``backend`` ("auto": OpenSlide, then tiffslide or wsidicom) and resolve its level-0 MPP."""
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path}: no such slide file; check the path or the manifest's slide_path column")
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    dicom = path.is_dir() or is_dicom_file(path)
    files = dicom_series(path) if dicom else [path]  # a DICOM slide's files are all checked first
    names = (["openslide", "wsidicom"] if dicom else ["openslide", "tiffslide"]) if backend == "auto" else [backend]
    reasons = []
    for name in names:
        reader_cls = BACKENDS[name]
        try:
            handle = reader_cls.open_handle(files[0])
        except SlideReadError as exc:
            if not dicom:  # a damaged file of a format this backend knows: no other backend reads it better
                raise
            reasons.append(f"{name}: {exc.__cause__ or exc}")  # a checked DICOM series: the next reader may support it
            continue
        except Exception as exc:  # noqa: BLE001 - each backend signals "not mine" with its own types
            reasons.append(f"{name}: {exc}".strip())
            continue
        try:
            resolution = _resolve_mpp(path, reader_cls.metadata_resolution(handle), mpp)
        except SlideReadError:
            handle.close()  # type: ignore[attr-defined]
            raise
        return reader_cls(path, handle, resolution)
    raise SlideReadError(f"{path}: not a slide that {' or '.join(names)} can read ({'; '.join(reasons)}); "
                         "check that the file is a whole-slide image and was copied completely")


def open_tile_source(path: Path, level_dimensions: Sequence[tuple[int, int]]) -> TileSource | None:
    """The direct tile reader of a slide (TIFF tiles, DICOM JPEG frames), or None: read it with ``read_region``."""
    return TiffTileSource.open(path, level_dimensions) or DicomTileSource.open(path, level_dimensions)


def _resolve_mpp(path: Path, found: Resolution | None, override: float | None) -> Resolution:
    """The user's MPP if given (warning when it contradicts the metadata), else the slide's own."""
    if override is not None:
        mpp = plausible_mpp(override)
        if mpp is None:
            raise SlideReadError(f"{path}: slide MPP {override} is not a plausible microns-per-pixel value (expected 0.02-50)")
        if found is not None and abs(found.mpp - mpp) > 0.1 * mpp:
            log.warning("%s: using the given slide MPP %.4g although the slide's %s says %.4g", path, mpp, found.source, found.mpp)
        return Resolution(mpp, "user")
    if found is None:
        raise SlideReadError(f"{path}: the slide records no microns-per-pixel (MPP); give it with --slide-mpp "
                             "(e.g. --slide-mpp 0.25 for a 40x scan) or an mpp column in the manifest")
    return found
