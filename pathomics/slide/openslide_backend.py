"""OpenSlide backend: reads every format OpenSlide supports (SVS, NDPI, MRXS, SCN, generic TIFF, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathomics.errors import SlideReadError
from pathomics.slide.base import Resolution, SlideReader, mpp_from_tiff_tags, plausible_mpp


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: Path, handle: object, resolution: Resolution) -> None:
        super().__init__(path, resolution)
        self._slide = handle

    @staticmethod
    def open_handle(path: Path) -> object:
        """Open ``path``; a file OpenSlide recognises but cannot read is corrupt, not someone else's format."""
        import openslide

        try:
            return openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{path}: OpenSlide recognises the file but cannot read it ({exc}); "
                                 "it may be truncated or corrupt — re-copy it from the scanner") from exc

    @staticmethod
    def metadata_resolution(handle: object) -> Resolution | None:
        """MPP from vendor metadata, else from TIFF resolution tags (what OpenSlide reports for generic TIFF)."""
        props = handle.properties  # type: ignore[attr-defined]
        tags = mpp_from_tiff_tags(props)
        mpp = plausible_mpp(props.get("openslide.mpp-x"))
        if mpp is not None and props.get("openslide.vendor") != "generic-tiff":
            return Resolution(mpp, "metadata")
        if tags is not None:
            return Resolution(tags, "tiff-resolution")
        return Resolution(mpp, "metadata") if mpp is not None else None

    @property
    def vendor(self) -> str:
        return str(self._slide.properties.get("openslide.vendor", "unknown"))  # type: ignore[attr-defined]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._slide.level_dimensions)  # type: ignore[attr-defined]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._slide.level_downsamples)  # type: ignore[attr-defined]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(self._slide.read_region(location, level, size))  # type: ignore[attr-defined]
        except openslide.OpenSlideError as exc:
            raise self._read_error(exc) from exc
        return _rgba_over_white(rgba)

    def close(self) -> None:
        self._slide.close()  # type: ignore[attr-defined]


def _rgba_over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA onto white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)
