"""Deep Zoom (DZI) pyramids read straight from a slide through any pathomics slide reader.

The tile geometry is OpenSlide's ``DeepZoomGenerator`` (``limit_bounds=False``): level ``L`` of
``max_level + 1`` is the slide halved (rounding up) ``max_level - L`` times, tiles are ``tile_size``
square plus ``overlap`` pixels on each inner side. Pixels come from the coarsest pyramid level at or
below the tile's downsample and are area-resized. TIFF-family slides (SVS, pyramidal TIFF) and JPEG DICOM
slides are read by decoding their tiles directly (``open_tile_source``, the tiling fast path, pixels
identical to OpenSlide's); other formats through the slide reader's ``read_region``.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from pathomics.slide import SlideReader, open_tile_source

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"
TILE_CACHE = 32  # decoded slide tiles kept per open slide (256² px: 6 MB)
DECODE_THREADS = 2  # slide tiles of one Deep Zoom tile decoded in parallel


@dataclass(frozen=True)
class TileBox:
    """Where a Deep Zoom tile comes from: the slide level read, the box there (x, y, w, h), the output size."""

    slide_level: int
    level_box: tuple[int, int, int, int]
    tile_size: tuple[int, int]


class DeepZoom:
    """The Deep Zoom pyramid of one open slide: DZI descriptor and JPEG tiles (thread-safe).

    ``direct``: decode TIFF tiles or DICOM frames directly when the slide allows (else, or when False, ``read_region``).
    Closing it closes ``reader``.
    """

    def __init__(self, reader: SlideReader, tile_size: int = 254, overlap: int = 1, quality: int = 85,
                 direct: bool = True) -> None:
        if tile_size < 1 or overlap < 0:
            raise ValueError(f"tile size must be positive and overlap not negative, got {tile_size}, {overlap}")
        self.reader, self.tile_size, self.overlap, self.quality = reader, tile_size, overlap, quality
        width, height = reader.dimensions
        self.max_level = math.ceil(math.log2(max(width, height, 1)))
        self.level_dimensions = tuple((-(-width // 2 ** (self.max_level - z)), -(-height // 2 ** (self.max_level - z)))
                                      for z in range(self.max_level + 1))
        self._tiles = open_tile_source(reader.path, reader.level_dimensions) if direct else None
        self.direct = self._tiles is not None  # whether tiles are decoded directly
        if self._tiles is not None:
            self._tiles.capacity = TILE_CACHE
        self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="dzi-decode") if self._tiles is not None else None
        # OpenSlide handles are safe to share between threads (and read in parallel); the tile cache and other backends are not
        self._lock: AbstractContextManager = nullcontext() if self._tiles is None and reader.backend == "openslide" else threading.Lock()

    def close(self) -> None:
        """Close the slide (and the direct tile reader)."""
        if self._tiles is not None:
            self._pool.shutdown()  # type: ignore[union-attr]
            self._tiles.close()
        self.reader.close()

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
        lx, ly = min(lw - 1, int(x0 * scale / ds)), min(lh - 1, int(y0 * scale / ds))
        w, h = min(lw - lx, math.ceil((x1 - x0) * scale / ds)), min(lh - ly, math.ceil((y1 - y0) * scale / ds))
        return TileBox(slide_level, (lx, ly, max(1, w), max(1, h)), (x1 - x0, y1 - y0))

    def tile_array(self, level: int, col: int, row: int) -> np.ndarray:
        """Tile (col, row) at ``level`` as RGB uint8 (h, w, 3)."""
        import cv2

        box = self.tile_box(level, col, row)
        region = self._read(box.slide_level, box.level_box)
        if region.shape[1::-1] == box.tile_size:
            return region
        return cv2.resize(region, box.tile_size, interpolation=cv2.INTER_AREA)

    def _read(self, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Pixels of ``box`` (x, y, w, h in pixels of slide ``level``)."""
        x, y, w, h = box
        with self._lock:
            if self._tiles is None:
                ds = self.reader.level_downsamples[level]
                return self.reader.read_region((round(x * ds), round(y * ds)), level, (w, h))
            self._tiles.prefetch(self._tiles.tiles_for(level, [box]), self._pool)
            return self._tiles.assemble(level, box)

    def tile_jpeg(self, level: int, col: int, row: int) -> bytes:
        """Tile (col, row) at ``level`` encoded as JPEG."""
        import cv2

        ok, data = cv2.imencode(".jpg", self.tile_array(level, col, row)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise ValueError(f"could not encode Deep Zoom tile ({col}, {row}) at level {level}")
        return data.tobytes()
