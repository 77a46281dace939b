"""DICOM whole-slide images: recognise a DICOM slide (one .dcm file of a series, or a folder), check it, read it.

A DICOM WSI is a series of VL Whole Slide Microscopy Image instances, usually one file per pyramid level.
OpenSlide 4 reads it given any one of those files (it finds the rest of the series in the same folder);
``DicomSlideReader`` (wsidicom, the ``dicom`` extra) is the fallback. Before either is tried, every file
of the series is checked with pydicom (headers, and that the pixel data is complete), so a non-WSI DICOM
or a truncated copy fails with one message naming the file.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pathomics.errors import SlideReadError
from pathomics.slide.base import Resolution, SlideReader, plausible_mpp

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "NumberOfFrames", "TotalPixelMatrixColumns"]
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


@dataclass(frozen=True)
class _Instance:
    path: Path
    sop_class: str
    series: str
    flavour: str  # VOLUME, LABEL, OVERVIEW, THUMBNAIL
    width: int


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file in the DICOM Part 10 format (the ``DICM`` marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_slide(path: str | os.PathLike) -> bool:
    """True when ``path`` is a VL Whole Slide Microscopy Image file, or a folder holding at least one.

    A folder that passes is one slide path (its slide_id is the folder name); ``open_slide`` refuses it
    with a clear message if its files turn out to hold several slides or to be damaged.
    """
    path = Path(path)
    if path.is_dir():
        return any(i.sop_class == WSI_SOP_CLASS for i in _headers(path))
    header = _header(path) if is_dicom_file(path) else None
    return header is not None and header.sop_class == WSI_SOP_CLASS


def dicom_series(path: Path) -> list[Path]:
    """The checked files of the DICOM slide at ``path`` (a .dcm file or a folder), level 0 first.

    Raises ``SlideReadError`` naming the file when a file is not a whole-slide image or is truncated,
    and naming the folder when it holds no DICOM slide or several.
    """
    files = slide_files(path)
    for file in files:
        _check_pixel_data(file)
    return files


def slide_files(path: Path) -> list[Path]:
    """The files of the DICOM slide at ``path`` (a .dcm file or a folder holding one series), level 0 first."""
    if not path.is_dir():
        return series_files(path)
    volumes = [i for i in _headers(path) if i.sop_class == WSI_SOP_CLASS and i.flavour == "VOLUME"]
    if not volumes:
        raise SlideReadError(f"{path}: a folder, and not a DICOM slide (no whole-slide-image .dcm files in it); "
                             "pass slide files, or a folder holding the .dcm files of one DICOM slide")
    series = sorted({i.series for i in volumes})
    if len(series) > 1:
        raise SlideReadError(f"{path}: the folder holds {len(series)} DICOM slides (series {', '.join(series)}); "
                             "put each slide's .dcm files in a folder of its own and pass those folders")
    return series_files(volumes[0].path)


def series_files(path: Path) -> list[Path]:
    """The whole-slide-image files of the series the DICOM file ``path`` belongs to (its folder), level 0 first."""
    target = _checked_header(path)
    if target.sop_class != WSI_SOP_CLASS:
        import pydicom.uid

        raise SlideReadError(f"{path}: a DICOM file of class {pydicom.uid.UID(target.sop_class).name!r}, not a whole-slide "
                             "image (VL Whole Slide Microscopy Image); pass the .dcm files of a slide, or their folder")
    _refuse_unreadable_neighbours(path.parent)
    members = [i for i in _headers(path.parent) if i.series == target.series and i.sop_class == WSI_SOP_CLASS]
    return [i.path for i in sorted(members, key=lambda i: (i.flavour != "VOLUME", -i.width, i.path.name))]


def _refuse_unreadable_neighbours(folder: Path) -> None:
    """Refuse a slide folder holding a ``.dcm`` file whose header cannot be read (a failed or empty copy).

    Such a file may be a level of the series (level 0, say): left out, the slide would silently be tiled
    from a coarser level, upsampled. Its series cannot be known, so any unreadable one fails the slide.
    """
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.suffix.lower() == ".dcm" or is_dicom_file(file)):
            try:
                _checked_header(file)
            except SlideReadError as exc:
                raise SlideReadError(f"{file}: not a readable DICOM file ({file.stat().st_size} bytes), in the folder of "
                                     "a DICOM slide whose level it may be; re-copy it from the archive, or move it out "
                                     "of the folder") from exc


def _headers(folder: Path) -> list[_Instance]:
    """The readable DICOM files of ``folder`` (not recursive)."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and is_dicom_file(f))
    return [i for i in map(_header, files) if i is not None]


def _header(path: Path) -> _Instance | None:
    """The identifying attributes of a DICOM file, or None when its header cannot be read."""
    try:
        return _checked_header(path)
    except SlideReadError:
        return None


def _checked_header(path: Path) -> _Instance:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        image_type = list(ds.get("ImageType", []))
        return _Instance(path, str(ds.SOPClassUID), str(ds.get("SeriesInstanceUID", "")),
                         str(image_type[2]) if len(image_type) > 2 else "", int(ds.get("TotalPixelMatrixColumns", 0)))
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
        raise SlideReadError(f"{path}: not a readable DICOM file ({exc}); re-copy it from the archive") from exc


def _check_pixel_data(path: Path) -> None:
    """Refuse a file whose pixel data is missing or ends early (a truncated copy), reading only item headers."""
    size = path.stat().st_size
    layout = pixel_data_layout(path)
    if layout.end is None:
        raise SlideReadError(f"{path}: the DICOM file has no pixel data (it ends at byte {size}); "
                             "it is truncated or not an image — re-copy it from the archive")
    if layout.end > size:
        raise SlideReadError(f"{path}: the DICOM file ends at byte {size}, before the end of its {layout.frames} frames of "
                             "pixel data; it is truncated — re-copy it from the archive")


@dataclass(frozen=True)
class PixelDataLayout:
    """Where a DICOM file's pixel data lies: its header, encapsulated fragments and end (None: no pixel data)."""

    header: Dataset
    frames: int
    fragments: tuple[int, ...] | None  # file offset of each fragment's item tag; None for native pixel data
    end: int | None  # byte offset where the pixel data ends (beyond the file's size: truncated)


def pixel_data_layout(path: Path) -> PixelDataLayout:
    """The layout of ``path``'s pixel data, from element and item headers only (no pixels are read).

    Walking the fragments costs about 10 µs a frame, so the result is kept while the file is unchanged
    (opening the slide checks it, the frame reader then uses it).
    """
    stat = path.stat()
    return _layout(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _layout(path: Path, size: int, mtime_ns: int) -> PixelDataLayout:
    import pydicom
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    with open(path, "rb") as fp:
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            frames = int(ds.get("NumberOfFrames", 1))
            header = fp.read(8 if ds.file_meta.TransferSyntaxUID.is_implicit_VR else 12)
            if header[:4] != _PIXEL_DATA_TAG:
                return PixelDataLayout(ds, frames, None, None)
            length = int.from_bytes(header[-4:], "little")
            if length != _UNDEFINED_LENGTH:
                return PixelDataLayout(ds, frames, None, fp.tell() + length)
            parse_basic_offsets(fp)
            _, offsets = parse_fragments(fp)
            if len(offsets) < frames:
                return PixelDataLayout(ds, frames, tuple(offsets), sys.maxsize)
            fp.seek(offsets[-1] + 4)
            return PixelDataLayout(ds, frames, tuple(offsets), offsets[-1] + 8 + int.from_bytes(fp.read(4), "little"))
        except (OSError, ValueError, AttributeError, EOFError) as exc:
            raise SlideReadError(f"{path}: not a readable DICOM file ({exc}); re-copy it from the archive") from exc


class DicomSlideReader(SlideReader):
    """wsidicom backend for DICOM slides OpenSlide cannot read; regions outside the image read as white."""

    backend = "wsidicom"

    def __init__(self, path: Path, handle: object, resolution: Resolution) -> None:
        super().__init__(path, resolution)
        self._slide = handle
        self._levels = list(handle.levels)  # type: ignore[attr-defined]

    @staticmethod
    def open_handle(path: Path) -> object:
        """Open the series that the .dcm file ``path`` belongs to."""
        try:
            from wsidicom import WsiDicom
        except ImportError as exc:
            raise ImportError("wsidicom is not installed; pip install 'pathomics[dicom]'") from exc
        return WsiDicom.open(series_files(path))

    @staticmethod
    def metadata_resolution(handle: object) -> Resolution | None:
        """MPP from the base level's DICOM pixel spacing."""
        from wsidicom.errors import WsiDicomNoResolutionError

        try:
            mpp = plausible_mpp(handle.levels.base_level.mpp.width)  # type: ignore[attr-defined]
        except WsiDicomNoResolutionError:
            return None
        return Resolution(mpp, "metadata") if mpp is not None else None

    @property
    def vendor(self) -> str:
        return "dicom"

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.size.width, lv.size.height) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        (w0, h0), dims = self.level_dimensions[0], self.level_dimensions
        return tuple((w0 / w + h0 / h) / 2 for w, h in dims)  # as OpenSlide computes it

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels at ``level``; the part of the box outside the image is white, as OpenSlide's transparent."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        x, y = round(location[0] / ds), round(location[1] / ds)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size[0], lw), min(y + size[1], lh)
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            region = self._slide.read_region((x0, y0), self._levels[level].level, (x1 - x0, y1 - y0), as_array=True)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - wsidicom, pydicom and the JPEG decoders each raise their own types
            raise self._read_error(exc) from exc
        out[y0 - y:y1 - y, x0 - x:x1 - x] = region[..., :3]
        return out

    def close(self) -> None:
        self._slide.close()  # type: ignore[attr-defined]
