"""The reader interface every slide backend implements, and the MPP rules shared by all of them."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathomics.errors import ConfigError, SlideReadError

MPP_RANGE = (0.02, 50.0)  # µm/px a microscope slide can plausibly have at level 0
_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


@dataclass(frozen=True)
class Resolution:
    """Level-0 microns per pixel and where the value came from (`metadata`, `tiff-resolution`, `user`)."""

    mpp: float
    source: str


def magnification_to_mpp(magnification: float) -> float:
    """Convert an objective magnification to µm/px by the usual convention (40x = 0.25, 20x = 0.5)."""
    if magnification <= 0:
        raise ConfigError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification


def plausible_mpp(value: object) -> float | None:
    """``value`` as a float if it is a plausible level-0 MPP, else None."""
    try:
        mpp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return mpp if math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1] else None


def mpp_from_tiff_tags(properties: Mapping[str, object]) -> float | None:
    """MPP from the TIFF XResolution/ResolutionUnit tags, when they carry a physical unit."""
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    try:
        pixels_per_unit = float(properties.get("tiff.XResolution", 0))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if unit not in _UNIT_UM or pixels_per_unit <= 0:
        return None
    return plausible_mpp(_UNIT_UM[unit] / pixels_per_unit)


def source_stat(path: Path) -> tuple[int, float]:
    """(bytes, last modification time) of a slide file, or of all the files in a slide folder (DICOM)."""
    files = [f.stat() for f in path.iterdir() if f.is_file()] if path.is_dir() else [path.stat()]
    return sum(f.st_size for f in files), max((f.st_mtime for f in files), default=0.0)


class SlideReader(ABC):
    """An open whole-slide image. Coordinates are level-0 pixels (x, y); arrays are RGB uint8 (h, w, 3)."""

    backend: str = ""

    def __init__(self, path: Path, resolution: Resolution) -> None:
        self.path = path
        self.resolution = resolution

    @property
    def mpp(self) -> float:
        return self.resolution.mpp

    @property
    @abstractmethod
    def vendor(self) -> str: ...

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]: ...

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of ``size`` (w, h) at ``level``, whose top-left is ``location`` in level-0 pixels."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at or below ``downsample`` (never upsample)."""
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-3)]
        return max(fits, key=lambda i: self.level_downsamples[i]) if fits else 0

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_error(self, exc: BaseException) -> SlideReadError:
        return SlideReadError(f"{self.path}: cannot read pixels ({exc}); the file may be truncated or corrupt — re-copy it from the scanner")
