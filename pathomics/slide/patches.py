"""Patch reading beside the slide readers: patches at a target resolution from a slide, or from a patch store
(its pixels, or the slide again for a coords-only store)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from pathomics.errors import StoreError
from pathomics.slide import SlideReader, open_slide, open_tile_source, source_stat
from pathomics.slide.tiff_tiles import map_in_parts
from pathomics.store import PatchStore

STRIP_PIXELS = 4096  # width of a processing strip at the read level
THUMB_BAND_ROWS = 512  # decoded level rows read at a time when making a thumbnail


class PatchReader:
    """Reads patches (level-0 top-left corners) at the target resolution, the fastest way the slide allows.

    ``resample="fast"`` decodes JPEG tiles at 1/2, 1/4 or 1/8 scale when the patch shrinks by at least
    that much from the read level, then area-resamples only the remainder; ``"exact"`` decodes at full
    size and area-resamples (pixels identical to OpenSlide's ``read_region`` + area resize).
    """

    def __init__(self, slide: SlideReader, level: int, read_size: int, patch_size: int, threads: int = 1,
                 resample: str = "exact") -> None:
        self.slide, self.level, self.read_size, self.patch_size = slide, level, read_size, patch_size
        self.downsample = slide.level_downsamples[level]
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pathomics-read") if threads > 1 else None  # 1: inline
        self.tiles = open_tile_source(slide.path, slide.level_dimensions)
        self.scale = 1  # DCT scaling denominator the tiles are decoded at
        if self.tiles is not None:
            if resample == "fast":
                self.scale = self.tiles.jpeg_scale(level, read_size / patch_size)
            self.tiles.capacity = strip_tiles(self.tiles.tile_shape(level), read_size)

    @property
    def method(self) -> str:
        return self.tiles.method if self.tiles is not None else f"{self.slide.backend}-read-region"

    def read(self, coords: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Patches at ``coords`` as (n, P, P, 3) uint8, written into ``out`` when given (one copy fewer)."""
        out = np.empty((len(coords), self.patch_size, self.patch_size, 3), np.uint8) if out is None else out
        parts = 2 * self.threads
        if self.tiles is None:
            def one(i: int) -> None:
                self._read_one(coords[i], out[i])
        else:
            boxes = self._boxes(coords)
            self.tiles.prefetch(self.tiles.tiles_for(self.level, [box for box, _ in boxes], self.scale), self.pool, parts)
            whole = self.read_size == self.patch_size * self.scale  # decoded tiles are at the target resolution

            def one(i: int) -> None:
                (x, y, w, h), (ox, oy) = boxes[i]
                if whole and ox == oy == 0:  # the patch is a box of whole decoded pixels: assemble it in place
                    self.tiles.assemble(self.level, (x, y, self.patch_size, self.patch_size), self.scale, out=out[i])
                else:
                    self._fit(self.tiles.assemble(self.level, (x, y, w, h), self.scale), ox, oy, out[i])
        map_in_parts(one, range(len(coords)), self.pool, parts)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.tiles is not None:
            self.tiles.close()

    def _boxes(self, coords: np.ndarray) -> list[tuple[tuple[int, int, int, int], tuple[float, float]]]:
        """Each patch's box in pixels of the read level as decoded (at 1/``scale``), and the patch origin inside it.

        At full scale the box is the patch rounded to whole pixels (as OpenSlide reads it); when scaled,
        the origin keeps the sub-pixel position and the box has a pixel of margin for the resampling,
        except where the patch is exactly a box of whole decoded pixels (no tile is decoded for nothing).
        """
        if self.scale == 1:
            s = self.read_size
            corners = read_corners(coords, self.downsample, s, self.slide.level_dimensions[self.level])
            return [((int(x), int(y), s, s), (0.0, 0.0)) for x, y in corners]
        lw, lh = (d // self.scale for d in self.slide.level_dimensions[self.level])
        ds, size = self.downsample * self.scale, self.read_size / self.scale
        x0, y0 = np.minimum(coords[:, 0] / ds, lw - size), np.minimum(coords[:, 1] / ds, lh - size)
        bx, by = np.floor(x0).astype(int), np.floor(y0).astype(int)
        margin = ((x0 != bx) | (y0 != by) | (size != self.patch_size)).astype(int)
        bw = np.minimum(np.ceil(x0 + size).astype(int) + margin, lw) - bx
        bh = np.minimum(np.ceil(y0 + size).astype(int) + margin, lh) - by
        return [((int(x), int(y), int(w), int(h)), (float(ox), float(oy)))
                for x, y, w, h, ox, oy in zip(bx, by, bw, bh, x0 - bx, y0 - by)]

    def _read_one(self, xy: np.ndarray, out: np.ndarray) -> None:
        region = self.slide.read_region((int(xy[0]), int(xy[1])), self.level, (self.read_size, self.read_size))
        self._resize(region, out)

    def _fit(self, region: np.ndarray, ox: float, oy: float, out: np.ndarray) -> None:
        """The patch from its decoded box, into ``out``: an area resize at full scale; for scaled decodes only the remainder.

        The remainder (less than 2x unless the slide lacks pyramid levels) is resampled bilinearly along
        the patch's exact sub-pixel footprint: nearer the area-resampled truth than an area resize of
        the box rounded to whole pixels (measured mean abs diff 0.3 vs 1.3 grey levels).
        """
        import cv2

        p, size = self.patch_size, self.read_size / self.scale
        r = size / p
        if self.scale == 1:
            self._resize(region, out)
        elif r > 2:  # coarse remainder: the rounding error is below a quarter of an output pixel
            x, y, s = round(ox), round(oy), round(size)
            self._resize(region[y:y + s, x:x + s], out)
        else:
            m = np.array([[r, 0, ox + 0.5 * r - 0.5], [0, r, oy + 0.5 * r - 0.5]], dtype=np.float64)
            cv2.warpAffine(region, m, (p, p), dst=out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)

    def _resize(self, region: np.ndarray, out: np.ndarray) -> None:
        import cv2

        if region.shape[0] == self.patch_size:
            out[...] = region
        else:
            cv2.resize(region, (self.patch_size, self.patch_size), dst=out, interpolation=cv2.INTER_AREA)


def read_thumbnail(slide: SlideReader, mpp: float, resample: str = "exact") -> tuple[np.ndarray, float]:
    """The whole slide at about ``mpp`` µm/px, read from the best level and area-resized; returns (image, downsample).

    Direct tile sources (TIFF tiles, DICOM JPEG frames) are read tile by tile, without ``read_region``'s
    compositing cost. ``resample`` as for patches: ``"exact"`` decodes at full size (pixels identical to
    OpenSlide's); ``"fast"`` decodes JPEG tiles DCT-scaled towards the thumbnail (a biopsy's 4x level at 1/4:
    a quarter of the decoding and no large resize), so a slide and its DICOM copy with the same JPEG frames still
    find the same tissue, while a copy re-encoded otherwise (JPEG-LS, JPEG 2000) may differ at the outline's pixels.
    """
    import cv2

    downsample = max(mpp / slide.mpp, 1.0)
    level = slide.best_level(downsample)
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    tiles = open_tile_source(slide.path, slide.level_dimensions)
    fast = tiles is not None and resample == "fast"
    scale = tiles.jpeg_scale(level, downsample / slide.level_downsamples[level]) if fast else 1
    width, height = (d // scale for d in slide.level_dimensions[level])  # pixels of the level as decoded
    rows = height / out_h  # decoded rows per thumbnail row
    rows_per_band = max(1, int(THUMB_BAND_ROWS / rows))
    bands = []
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="pathomics-thumb") as pool:
            for r0 in range(0, out_h, rows_per_band):  # in bands, so memory stays bounded on single-level slides
                r1 = min(out_h, r0 + rows_per_band)
                y0, y1 = int(r0 * rows), min(height, max(int(r0 * rows) + 1, int(round(r1 * rows))))
                if tiles is None:
                    band = slide.read_region((0, int(y0 * slide.level_downsamples[level])), level, (width, y1 - y0))
                else:
                    tiles.prefetch(tiles.tiles_for(level, [(0, y0, width, y1 - y0)], scale), pool)
                    band = tiles.assemble(level, (0, y0, width, y1 - y0), scale)
                bands.append(cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA))
    finally:
        if tiles is not None:
            tiles.close()
    return np.concatenate(bands), w0 / out_w


def strip_tiles(tile_shape: tuple[int, int], read_size: int) -> int:
    """Tiles a strip's row of patches touches, with margin: the tile cache's capacity."""
    tw, th = tile_shape
    return (STRIP_PIXELS // tw + read_size // tw + 3) * (read_size // th + 3)


def read_corners(coords: np.ndarray, downsample: float, read_size: int, level_size: tuple[int, int]) -> np.ndarray:
    """Top-left corners (n, 2), in pixels of the read level, of patches read as OpenSlide reads them: level-0
    corners divided by the level's downsample and rounded, kept inside the level."""
    corners = np.rint(np.asarray(coords, dtype=np.float64) / downsample).astype(np.int64)
    return np.minimum(corners, np.array(level_size, dtype=np.int64) - read_size)


def stale_source(store: PatchStore) -> str | None:
    """Why a store's source slide cannot be read again (missing, or not the file it was tiled from), or None."""
    source = Path(store.attrs["source_path"])
    if not source.exists() or source_stat(source)[0] != store.attrs["source_size_bytes"]:
        return f"its source slide {source} is missing or has changed; re-run `pathomics tile`"
    return None


def read_patches(store: PatchStore, start: int, stop: int) -> np.ndarray:
    """Patches ``start:stop`` of a store as (n, P, P, 3) uint8: its pixels, or re-read from the slide when coords-only."""
    if store.has_pixels:
        return store.read_images(start, stop)
    if why := stale_source(store):
        raise StoreError(f"{store.path}: {why}")
    attrs = store.attrs
    reader = _slide_reader(str(attrs["source_path"]), float(attrs["mpp_level0"]), int(attrs["read_level"]),
                           int(attrs["read_size"]), int(attrs["patch_size"]), attrs.get("resample", "exact"))
    return reader.read(store.coords[start:stop])


@lru_cache(maxsize=4)
def _slide_reader(source: str, mpp: float, level: int, read_size: int, patch_size: int, resample: str) -> PatchReader:
    """A per-process patch reader for coords-only stores (slides stay open for the next batch)."""
    return PatchReader(open_slide(source, mpp=mpp), level, read_size, patch_size, threads=1, resample=resample)


os.register_at_fork(after_in_child=_slide_reader.cache_clear)  # a forked child must not reuse the parent's thread pool
