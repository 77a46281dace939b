"""JPEG tiles decoded in batches by NVIDIA nvImageCodec, on the GPU, straight into the encoder's input tensors.

For a coords-only patch store of a JPEG TIFF slide (SVS, generic pyramidal TIFF), embedded on a CUDA device:
each batch's missing tiles are read (``pread``), made self-contained (``complete_stream``: JPEGTables spliced
in, Aperio's RGB marked) and decoded in one nvImageCodec call into device memory; patches are assembled from
the cached tiles and area-resampled to the target resolution there. Only compressed bytes cross the bus and
the CPU does no pixel work. Tiles are decoded at full size and averaged down (nvJPEG has no DCT scaling):
the area rule of the exact path, but with nvJPEG's IDCT and float rounding, so pixels agree with the CPU
paths to within a grey level or so, not bit for bit; stores tiled with ``resample="exact"`` keep the CPU path.

``pip install 'pathomics[gpu]'`` installs nvImageCodec with nvJPEG. nvImageCodec's CPU-only backend runs the
same path on the host, which is how machines without a GPU test it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pathomics.errors import ConfigError
from pathomics.slide import open_slide
from pathomics.slide.patches import read_corners, stale_source, strip_tiles
from pathomics.slide.tiff_tiles import TiffTileSource, TileKey
from pathomics.store import PatchStore

INSTALL = "pip install 'pathomics[gpu]'"
CPU = torch.device("cpu")


def nvimgcodec_available() -> bool:
    """Whether nvImageCodec's Python package imports here."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _decoder(device: torch.device):  # noqa: ANN202 - nvimgcodec.Decoder, imported lazily
    """One nvImageCodec decoder per device and process (creating one sets up nvJPEG): the GPU's, or the CPU-only backend."""
    from nvidia import nvimgcodec

    if device.type == "cuda":  # fancy upsampling: chroma upsampled as libjpeg-turbo does, not by pixel replication
        return nvimgcodec.Decoder(device_id=device.index if device.index is not None else torch.cuda.current_device(),
                                  options=":fancy_upsampling=1")
    return nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])


class NvImageCodecTiles(TiffTileSource):
    """A TIFF slide's tiles decoded by nvImageCodec in batches, cached as uint8 (h, w, 3) tensors on ``device``."""

    method = "nvimgcodec"

    def __init__(self, path: Path, pages: Sequence[object], tiff: object, device: torch.device = CPU) -> None:
        from nvidia import nvimgcodec

        self._decoder = _decoder(device)  # first: a decoder nvImageCodec cannot create fails before anything is opened
        super().__init__(path, pages, tiff)
        self.device = device
        self._codec = nvimgcodec
        self._params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB, apply_exif_orientation=False)

    def _decode_many(self, keys: Sequence[TileKey], pool: Executor | None, parts: int) -> list[torch.Tensor]:
        """The tiles of ``keys`` (full scale), the stored ones decoded in one batch on the device."""
        data = [self.tile_data(key) for key in keys]
        stored = [(key, d) for key, d in zip(keys, data) if d is not None]
        on_device = self.device.type == "cuda"  # the CPU-only backend's host images export no DLPack without CUDA
        stream = torch.cuda.current_stream(self.device).cuda_stream if on_device else 0
        streams = [self._codec.CodeStream(self.jpeg_stream(key, d)) for key, d in stored]
        images = self._decoder.decode(streams, params=self._params, cuda_stream=stream) if stored else []
        decoded = {}
        for (key, _), image in zip(stored, images):
            if image is None:
                raise self.undecodable(key, "nvImageCodec rejected its JPEG stream")
            decoded[key] = torch.from_dlpack(image.to_dlpack()) if on_device else torch.from_numpy(np.asarray(image))
        tw, th = self.tile_shape(keys[0][0]) if keys else (0, 0)
        return [decoded[key] if key in decoded else torch.full((th, tw, 3), 255, dtype=torch.uint8, device=self.device)
                for key in keys]

    def assemble_batch(self, level: int, corners: np.ndarray, size: int, out: torch.Tensor) -> None:
        """The ``size``-pixel boxes at ``corners`` (n, 2) of ``level`` (full scale), from cached tiles, into ``out``.

        Patches whose corners sit at the same offset inside their tiles take the same slices of the same
        grid of tiles, so each such group is assembled with one stacked copy per grid tile rather than one
        copy per patch and tile: on a tile-aligned grid, a handful of device operations a batch.
        """
        tw, th = self.tile_shape(level)
        col0, row0 = corners[:, 0] // tw, corners[:, 1] // th
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (ox, oy) in enumerate(zip((corners[:, 0] - col0 * tw).tolist(), (corners[:, 1] - row0 * th).tolist())):
            groups.setdefault((ox, oy), []).append(i)
        for (ox, oy), members in groups.items():
            contiguous = members[-1] - members[0] == len(members) - 1  # a slice copies; an index tensor scatters
            index = slice(members[0], members[-1] + 1) if contiguous else torch.as_tensor(members, device=out.device)
            for r in range((oy + size - 1) // th + 1):
                y0, y1, ty = max(0, r * th - oy), min(size, (r + 1) * th - oy), oy - r * th
                for c in range((ox + size - 1) // tw + 1):
                    x0, x1, tx = max(0, c * tw - ox), min(size, (c + 1) * tw - ox), ox - c * tw
                    tiles = torch.stack([self._cache[(level, 1, int(row0[i]) + r, int(col0[i]) + c)] for i in members])
                    out[index, y0:y1, x0:x1] = tiles[:, y0 + ty:y1 + ty, x0 + tx:x1 + tx, :3]


class DevicePatchReader:
    """Patches of a coords-only store at its target resolution, as uint8 (n, P, P, 3) tensors on ``device``.

    The boxes are the exact path's (level-0 corners rounded to the read level, ``read_size`` pixels), decoded
    by ``NvImageCodecTiles`` and area-resampled to ``patch_size`` on the device.
    """

    def __init__(self, store: PatchStore, device: torch.device) -> None:
        a = store.attrs
        source = Path(a["source_path"])
        why = _unsupported(store)
        if why:
            raise ConfigError(f"{store.path}: nvImageCodec cannot decode this store's patches: {why}")
        self.level, self.read_size, self.patch_size = int(a["read_level"]), int(a["read_size"]), int(a["patch_size"])
        with open_slide(source, mpp=float(a["mpp_level0"])) as slide:
            self.level_size = slide.level_dimensions[self.level]
            self.downsample = slide.level_downsamples[self.level]
            tiles = NvImageCodecTiles.open(slide.path, slide.level_dimensions, device=device)
        if tiles is None or not tiles.is_jpeg(self.level):
            if tiles is not None:
                tiles.close()
            raise ConfigError(f"{store.path}: nvImageCodec cannot decode this store's patches: {source} does not store "
                              f"level {self.level} as JPEG tiles of a TIFF pyramid; use --decoder workers")
        tiles.capacity = strip_tiles(tiles.tile_shape(self.level), self.read_size)
        self.tiles, self.device = tiles, device

    def read(self, coords: np.ndarray) -> torch.Tensor:
        """The patches at level-0 ``coords`` (n, 2), uint8 NHWC on the device."""
        s, p = self.read_size, self.patch_size
        corners = read_corners(coords, self.downsample, s, self.level_size)
        self.tiles.prefetch(self.tiles.tiles_for(self.level, [(int(x), int(y), s, s) for x, y in corners]))
        region = torch.empty((len(corners), s, s, 3), dtype=torch.uint8, device=self.device)
        self.tiles.assemble_batch(self.level, corners, s, region)
        if s == p:
            return region
        area = F.interpolate(region.permute(0, 3, 1, 2).float(), size=(p, p), mode="area")
        return area.round_().to(torch.uint8).permute(0, 2, 3, 1)

    def close(self) -> None:
        self.tiles.close()


def _unsupported(store: PatchStore) -> str | None:
    """Why nvImageCodec cannot decode the patches of ``store`` (None: it can)."""
    if store.has_pixels:
        return "the store holds its pixels (the path is for coords-only stores); use --decoder workers"
    if store.attrs.get("resample") != "fast":
        return "it was tiled with --resample exact, which promises OpenSlide's pixels; use --decoder workers"
    if why := stale_source(store):
        return why
    if not nvimgcodec_available():
        return f"nvImageCodec is not installed ({INSTALL})"
    return None
