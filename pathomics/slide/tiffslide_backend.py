"""tiffslide backend: the pure-Python fallback for TIFF-family files OpenSlide cannot open."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathomics.slide.base import Resolution, SlideReader, mpp_from_tiff_tags, plausible_mpp


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    def __init__(self, path: Path, handle: object, resolution: Resolution) -> None:
        super().__init__(path, resolution)
        self._slide = handle

    @staticmethod
    def open_handle(path: Path) -> object:
        import tiffslide

        return tiffslide.TiffSlide(str(path))

    @staticmethod
    def metadata_resolution(handle: object) -> Resolution | None:
        """MPP from vendor metadata, else from TIFF resolution tags."""
        props = handle.properties  # type: ignore[attr-defined]
        mpp = plausible_mpp(props.get("tiffslide.mpp-x"))
        if mpp is not None and props.get("tiffslide.vendor"):
            return Resolution(mpp, "metadata")
        tags = mpp_from_tiff_tags(props)
        return Resolution(tags, "tiff-resolution") if tags is not None else None

    @property
    def vendor(self) -> str:
        return str(self._slide.properties.get("tiffslide.vendor") or "generic-tiff")  # type: ignore[attr-defined]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._slide.level_dimensions)  # type: ignore[attr-defined]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._slide.level_downsamples)  # type: ignore[attr-defined]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            region = self._slide.read_region(location, level, size, as_array=True)  # type: ignore[attr-defined]
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._read_error(exc) from exc
        return np.ascontiguousarray(region[..., :3])

    def close(self) -> None:
        self._slide.close()  # type: ignore[attr-defined]
