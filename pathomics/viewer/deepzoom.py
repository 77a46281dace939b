"""Deep Zoom (DZI) pyramids read straight from a slide through any pathomics slide reader.

The tile geometry is OpenSlide's ``DeepZoomGenerator`` (``limit_bounds=False``): level ``L`` of
``max_level + 1`` is the slide halved (rounding up) ``max_level - L`` times, tiles are ``tile_size``
square plus ``overlap`` pixels on each inner side. Pixels come from the coarsest pyramid level at or
below the tile's downsample and are area-resized, so every backend ``open_slide`` knows (the TIFF
fast path, OpenSlide, tiffslide) serves tiles the same way.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from pathomics.slide import SlideReader

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"


@dataclass(frozen=True)
class TileBox:
    """Where a Deep Zoom tile comes from: level-0 top-left, the slide level read, its box there, output size."""

    location: tuple[int, int]
    slide_level: int
    level_size: tuple[int, int]
    tile_size: tuple[int, int]


class DeepZoom:
    """The Deep Zoom pyramid of one open slide: DZI descriptor and JPEG tiles (thread-safe)."""

    def __init__(self, reader: SlideReader, tile_size: int = 254, overlap: int = 1, quality: int = 85) -> None:
        if tile_size < 1 or overlap < 0:
            raise ValueError(f"tile size must be positive and overlap not negative, got {tile_size}, {overlap}")
        self.reader, self.tile_size, self.overlap, self.quality = reader, tile_size, overlap, quality
        width, height = reader.dimensions
        self.max_level = math.ceil(math.log2(max(width, height, 1)))
        self.level_dimensions = tuple((-(-width // 2 ** (self.max_level - z)), -(-height // 2 ** (self.max_level - z)))
                                      for z in range(self.max_level + 1))
        self._lock = threading.Lock()  # slide readers are not all safe to share between threads

    @property
    def level_count(self) -> int:
        return self.max_level + 1

    def level_tiles(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at Deep Zoom ``level``."""
        width, height = self.level_dimensions[level]
        return -(-width // self.tile_size), -(-height // self.tile_size)

    def dzi(self) -> str:
        """The DZI XML descriptor OpenSeadragon opens."""
        width, height = self.reader.dimensions
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{width}" Height="{height}"/></Image>')

    def tile_box(self, level: int, col: int, row: int) -> TileBox:
        """The source of tile (col, row) at ``level``; KeyError when there is no such tile."""
        if not 0 <= level < self.level_count:
            raise KeyError(f"no Deep Zoom level {level}")
        cols, rows = self.level_tiles(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise KeyError(f"no tile ({col}, {row}) at Deep Zoom level {level}")
        width, height = self.level_dimensions[level]
        scale = 2 ** (self.max_level - level)  # level-0 pixels per Deep Zoom pixel
        x0 = col * self.tile_size - (self.overlap if col else 0)
        y0 = row * self.tile_size - (self.overlap if row else 0)
        x1 = min(width, (col + 1) * self.tile_size + self.overlap)
        y1 = min(height, (row + 1) * self.tile_size + self.overlap)
        slide_level = self.reader.best_level(scale)
        ds = self.reader.level_downsamples[slide_level]
        lw, lh = self.reader.level_dimensions[slide_level]
        lx, ly = x0 * scale, y0 * scale
        size = (max(1, min(lw - int(lx / ds), math.ceil((x1 - x0) * scale / ds))),
                max(1, min(lh - int(ly / ds), math.ceil((y1 - y0) * scale / ds))))
        return TileBox((lx, ly), slide_level, size, (x1 - x0, y1 - y0))

    def tile_array(self, level: int, col: int, row: int) -> np.ndarray:
        """Tile (col, row) at ``level`` as RGB uint8 (h, w, 3)."""
        import cv2

        box = self.tile_box(level, col, row)
        with self._lock:
            region = self.reader.read_region(box.location, box.slide_level, box.level_size)
        if region.shape[1::-1] == box.tile_size:
            return region
        return cv2.resize(region, box.tile_size, interpolation=cv2.INTER_AREA)

    def tile_jpeg(self, level: int, col: int, row: int) -> bytes:
        """Tile (col, row) at ``level`` encoded as JPEG."""
        import cv2

        ok, data = cv2.imencode(".jpg", self.tile_array(level, col, row)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise ValueError(f"could not encode Deep Zoom tile ({col}, {row}) at level {level}")
        return data.tobytes()
