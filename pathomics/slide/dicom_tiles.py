"""Direct frame decoding for DICOM slides: the fast read path, as ``TiffTileSource`` is for TIFF.

A TILED_FULL DICOM level is a row-major grid of JPEG frames, one encapsulated fragment each. Their file
offsets come from the fragment item headers (``pixel_data_layout``); each needed frame is read with
``pread`` and decoded once into the same tile cache the TIFF path uses. Only 8-bit JPEG baseline levels
with one focal plane and one optical path qualify; any other slide keeps its backend's ``read_region``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathomics.errors import SlideReadError
from pathomics.slide.dicom_backend import is_dicom_file, pixel_data_layout, slide_files
from pathomics.slide.jpeg import complete_stream, decode_scaled, scale_for, split_tables
from pathomics.slide.tiff_tiles import TileSource, misaligned_empty

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JCS_RGB, _JCS_YCBCR = 2, 3  # libjpeg colour spaces


@dataclass(frozen=True)
class _Level:
    file: Path
    width: int
    height: int
    tile_width: int
    tile_height: int
    fragments: tuple[int, ...]  # file offset of each frame's item tag, row-major
    colorspace: int  # how the JPEG frames are coded: RGB, or YCbCr (DICOM YBR_*)


class DicomTileSource(TileSource):
    """Decoded-once JPEG frames of a DICOM slide's levels, assembled into arbitrary boxes."""

    method = "dicom-tiles"

    def __init__(self, path: Path, levels: Sequence[_Level]) -> None:
        super().__init__(path)
        self._levels = list(levels)
        self._fds = {level.file: os.open(level.file, os.O_RDONLY) for level in levels}

    @classmethod
    def open(cls, path: Path, level_dimensions: Sequence[tuple[int, int]]) -> DicomTileSource | None:
        """The frame source for the DICOM slide ``path`` (file or folder) if every level qualifies, else None."""
        if not (path.is_dir() or is_dicom_file(path)):
            return None
        try:
            levels = [level for level in map(_jpeg_level, slide_files(path)) if level is not None]
        except SlideReadError:
            return None
        matches = [[level for level in levels if (level.width, level.height) == dims] for dims in level_dimensions]
        return cls(path, [m[0] for m in matches]) if all(len(m) == 1 for m in matches) else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        super().close()

    def tile_shape(self, level: int) -> tuple[int, int]:
        return self._levels[level].tile_width, self._levels[level].tile_height

    def jpeg_scale(self, level: int, factor: float) -> int:
        """Frames are JPEG baseline (the only ones this source takes): they scale during decode as TIFF tiles do."""
        return scale_for(factor, self.tile_shape(level))

    def _decode(self, key: tuple[int, int, int, int]) -> np.ndarray:
        import imagecodecs

        level, scale, row, col = key
        spec = self._levels[level]
        index = row * -(-spec.width // spec.tile_width) + col
        fd, item = self._fds[spec.file], spec.fragments[index]
        length = int.from_bytes(os.pread(fd, 4, item + 4), "little")
        data = os.pread(fd, length, item + 8)
        if len(data) != length:
            raise SlideReadError(f"{spec.file}: frame {index} is cut short; the file is truncated — re-copy it from the archive")
        try:
            if scale > 1:  # any APPn dropped, so only the Adobe marker says how the samples are coded
                tables, frame = split_tables(data)
                return decode_scaled(complete_stream(frame, tables, spec.colorspace == _JCS_RGB),
                                     (spec.tile_height, spec.tile_width), scale)
            out = misaligned_empty((spec.tile_height, spec.tile_width, 3))
            return imagecodecs.jpeg8_decode(data, colorspace=spec.colorspace, outcolorspace=_JCS_RGB,
                                            shape=(spec.tile_height, spec.tile_width), out=out)
        except Exception as exc:  # noqa: BLE001 - the codec raises its own error type for corrupt data
            raise SlideReadError(f"{spec.file}: frame {index} cannot be decoded ({exc}); the file is corrupt — re-copy it from the archive") from exc


def _jpeg_level(path: Path) -> _Level | None:
    """``path`` as a directly decodable level: a VOLUME of 8-bit RGB JPEG baseline frames, one per tile, else None."""
    layout = pixel_data_layout(path)
    ds = layout.header
    image_type = list(ds.get("ImageType", []))
    width, height = int(ds.get("TotalPixelMatrixColumns", 0)), int(ds.get("TotalPixelMatrixRows", 0))
    tile_w, tile_h = int(ds.get("Columns", 0)), int(ds.get("Rows", 0))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    qualifies = (len(image_type) > 2 and image_type[2] == "VOLUME"
                 and ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
                 and ds.get("DimensionOrganizationType", "TILED_FULL") == "TILED_FULL"
                 and int(ds.get("SamplesPerPixel", 0)) == 3 and int(ds.get("BitsAllocated", 0)) == 8
                 and (photometric == "RGB" or photometric.startswith("YBR_FULL"))
                 and tile_w > 0 and tile_h > 0
                 and layout.frames == -(-width // tile_w) * -(-height // tile_h)
                 and layout.fragments is not None and len(layout.fragments) == layout.frames)
    if not qualifies:
        return None
    colorspace = _JCS_RGB if photometric == "RGB" else _JCS_YCBCR
    return _Level(path, width, height, tile_w, tile_h, layout.fragments, colorspace)
