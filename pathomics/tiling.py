"""Tile grid at an exact physical resolution, streamed into the Zarr patch store.

A patch of ``patch_size`` pixels at ``target_mpp`` covers ``round(patch_size * target_mpp / mpp0)``
level-0 pixels (a 0.263 µm/px slide at 0.5 µm/px × 256 px reads 487, not 512). Patches are read from
the coarsest pyramid level at or below the target resolution and area-resampled to the target. For TIFF
slides each needed tile is decoded once (``TiffTileSource``), for JPEG DICOM slides each needed frame
(``DicomTileSource``); with ``resample="fast"`` (the default) JPEG TIFF tiles are decoded at 1/2, 1/4 or
1/8 scale in the DCT domain when the patch shrinks at least that much, so only the remainder is
resampled; ``"exact"`` keeps pixels identical to OpenSlide's. Other formats go through the backend's
``read_region``. Patches are processed in vertical strips, so the tile cache, and with it memory, is
bounded by the strip, not the slide. The store is written shard by shard and published atomically;
an interrupted run resumes from its last full shard.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon

from pathomics import __version__
from pathomics.errors import ConfigError, StoreError
from pathomics.layout import DONE, SKIPPED, OutputLayout
from pathomics.manifest import default_slide_id
from pathomics.qc import SCORE_CHUNK, BatchScores, QCConfig, score_batch, update_slide_qc
from pathomics.shards import COMPRESSIONS
from pathomics.slide import SlideReader, open_slide, source_stat
from pathomics.slide.patches import STRIP_PIXELS, PatchReader
from pathomics.slide.tiff_tiles import map_in_parts
from pathomics.io import write_png
from pathomics.store import PatchStore, PatchStoreWriter, open_patch_store
from pathomics.tissue import Tissue, TissueConfig, detect_tissue, load_tissue, write_geojson

log = logging.getLogger(__name__)
PROVENANCE_SKIP = ("pathomics_version", "complete", "patches_written")
RESAMPLE = ("fast", "exact")  # fast: JPEG tiles decoded at 1/2, 1/4, 1/8 scale where the patch shrinks that much


@dataclass(frozen=True)
class TileConfig:
    """What to tile: patch size and overlap in pixels at ``target_mpp``; keep patches with ≥ ``min_tissue`` tissue."""

    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    with_pixels: bool = True
    tissue: TissueConfig = field(default_factory=TissueConfig)
    batch_size: int = 64
    threads: int = max(1, os.cpu_count() or 1)
    qc: QCConfig | None = field(default_factory=QCConfig)  # None: no quality control
    resample: str = "fast"
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ConfigError(f"target MPP must be positive, got {self.target_mpp}")
        if self.patch_size < 8:
            raise ConfigError(f"patch size must be at least 8 pixels, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise ConfigError(f"overlap must be in [0, patch size), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min tissue fraction must be in [0, 1], got {self.min_tissue}")
        if self.batch_size < 1 or self.threads < 1:
            raise ConfigError("batch size and threads must be at least 1")
        if self.resample not in RESAMPLE:
            raise ConfigError(f"resample must be one of {', '.join(RESAMPLE)}, got {self.resample!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")


@dataclass(frozen=True)
class Grid:
    """The kept patches of a slide: level-0 top-left corners, in processing order, and their tissue fractions."""

    coords: np.ndarray
    tissue_fraction: np.ndarray
    patch_size_level0: int
    read_level: int
    read_size: int


@dataclass(frozen=True)
class TileResult:
    """The outcome of tiling one slide."""

    slide_id: str
    path: Path
    n_patches: int
    state: str  # "done" or "skipped"
    seconds: float


def patch_size_level0(patch_size: int, target_mpp: float, mpp0: float) -> int:
    """Level-0 pixels covered by a patch of ``patch_size`` pixels at ``target_mpp`` (exact physical size)."""
    return max(1, round(patch_size * target_mpp / mpp0))


def plan_grid(slide: SlideReader, tissue: MultiPolygon, config: TileConfig) -> Grid:
    """The patches whose tissue fraction is at least ``min_tissue``, in strip-major processing order."""
    mpp0 = slide.mpp
    size0 = patch_size_level0(config.patch_size, config.target_mpp, mpp0)
    step0 = (config.patch_size - config.overlap) * config.target_mpp / mpp0
    level = slide.best_level(config.target_mpp / mpp0)
    read_size = max(1, round(size0 / slide.level_downsamples[level]))
    empty = Grid(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), size0, level, read_size)
    width, height = slide.dimensions
    if tissue.is_empty or size0 > min(width, height):
        return empty
    minx, miny, maxx, maxy = tissue.bounds
    cols = np.arange(max(0, int((minx - size0) // step0)), int(min(width - size0, maxx) // step0) + 1)
    rows = np.arange(max(0, int((miny - size0) // step0)), int(min(height - size0, maxy) // step0) + 1)
    col, row = (a.ravel() for a in np.meshgrid(cols, rows))
    xs, ys = np.rint(col * step0).astype(np.int64), np.rint(row * step0).astype(np.int64)
    inside = (xs + size0 <= width) & (ys + size0 <= height)
    col, row, xs, ys = col[inside], row[inside], xs[inside], ys[inside]
    fraction = tissue_fractions(tissue, xs, ys, size0)
    keep = fraction >= max(config.min_tissue, 1e-9)
    per_strip = max(1, STRIP_PIXELS // max(1, round(step0 / slide.level_downsamples[level])))
    order = np.lexsort((col[keep], row[keep], col[keep] // per_strip))
    coords = np.stack([xs[keep], ys[keep]], axis=1)[order]
    return Grid(coords, fraction[keep][order].astype(np.float32), size0, level, read_size)


def tissue_fractions(tissue: MultiPolygon, xs: np.ndarray, ys: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each square patch (level-0 top-left xs, ys) covered by the tissue polygons.

    Only patches on a polygon's edge need an intersection; those inside it (most of them) are wholly covered.
    """
    boxes = shapely.box(xs, ys, xs + size0, ys + size0)
    parts = np.asarray(list(tissue.geoms), dtype=object)
    # the tree holds the boxes and the prepared polygons query it: each test is then logarithmic in the polygon's
    # vertices (the other way round, every box was tested against the whole unprepared outline: 0.55 s a resection)
    shapely.prepare(parts)
    part_idx, box_idx = shapely.STRtree(boxes).query(parts, predicate="intersects")
    areas = np.full(len(box_idx), float(size0 * size0))
    edge = ~shapely.contains_properly(parts[part_idx], boxes[box_idx])
    areas[edge] = shapely.area(shapely.intersection(boxes[box_idx[edge]], parts[part_idx[edge]]))
    covered = np.zeros(len(xs), dtype=np.float64)
    np.add.at(covered, box_idx, areas)
    return np.clip(covered / float(size0 * size0), 0.0, 1.0)


def batch_parallelism(slides_at_once: int | None = None, threads: int | None = None,
                      slides: int | None = None) -> tuple[int, int]:
    """(slides at once, decoding threads per slide) for a batch of ``slides`` on this machine, as given or by default.

    By default two slides run at a time and share the cores: while one runs its serial steps (tissue detection,
    grid, store creation, QC summary, the compression of its last shard), the other's decoding keeps the cores
    busy. On two cores that was 1.09-1.14x the slides an hour of one slide at a time, on biopsies and on
    resections alike. A batch of one slide gets all the cores.
    """
    cores = os.cpu_count() or 1
    at_once = slides_at_once if slides_at_once is not None else min(2, cores)
    if at_once < 1:  # threads are checked by the TileConfig they go into
        raise ConfigError(f"slides at once must be at least 1, got {at_once}")
    at_once = min(at_once, max(1, slides)) if slides is not None else at_once
    return at_once, threads if threads is not None else max(1, cores // at_once)


def tile_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, config: TileConfig = TileConfig(),
               mpp: float | None = None, slide_id: str | None = None, tissue_geojson: str | os.PathLike | None = None,
               backend: str = "auto", progress: Callable[[int, int], None] | None = None) -> TileResult:
    """Tile one slide into ``<out_dir>/tiles/<slide_id>.zarr``; skip it when an identical complete store exists."""
    start_time = time.perf_counter()
    slide_path = Path(slide_path).resolve()
    slide_id = slide_id or default_slide_id(slide_path)
    layout = OutputLayout(out_dir)
    final = layout.store(slide_id)
    with open_slide(slide_path, mpp=mpp, backend=backend) as slide:
        attrs = store_attributes(slide, slide_id, config, tissue_geojson)
        if (existing := _unchanged(final, attrs)) is not None:
            log.info("%s: complete store with the same source and parameters exists; skipped", slide_id)
            update_slide_qc(out_dir, existing, config.qc)
            return TileResult(slide_id, final, len(existing), SKIPPED, time.perf_counter() - start_time)
        tissue = (load_tissue(slide, tissue_geojson, config.tissue, config.resample) if tissue_geojson
                  else detect_tissue(slide, config.tissue, config.resample))
        grid = plan_grid(slide, tissue.polygons, config)
        if len(grid.coords) == 0:
            log.warning("%s: no tissue patches found (%s); writing an empty store — check the slide or lower --min-tissue",
                        slide_path, "no tissue detected" if tissue.polygons.is_empty else f"none with ≥{config.min_tissue:.0%} tissue")
        final.parent.mkdir(parents=True, exist_ok=True)
        attrs.update(n_patches=len(grid.coords), read_level=grid.read_level, read_size=grid.read_size,
                     thumbnail_downsample=tissue.thumbnail_downsample)
        with ThreadPoolExecutor(1) as side:  # the outline and thumbnail are drawn and written while patches stream
            outlines = side.submit(_write_outlines, tissue, grid, layout, slide_id)
            writer = PatchStoreWriter(final, attrs, grid.coords, grid.tissue_fraction, config.with_pixels, config.compression)
            if 0 < writer.patches_written < len(grid.coords):
                log.info("%s: resuming an interrupted store at patch %d of %d", slide_id, writer.patches_written, len(grid.coords))
            scores: list[BatchScores] = []
            if config.with_pixels:
                _stream_patches(slide, grid, config, writer, progress, scores)
            thumbnail = outlines.result()
        writer.publish()
        update_slide_qc(out_dir, writer.store(), config.qc, scores, thumbnail=thumbnail)
    return TileResult(slide_id, final, len(grid.coords), DONE, time.perf_counter() - start_time)


def store_attributes(slide: SlideReader, slide_id: str, config: TileConfig, tissue_geojson: str | os.PathLike | None) -> dict:
    """The provenance attributes of a store: source identity, resolution and every tiling parameter."""
    size, mtime = source_stat(slide.path)
    level = slide.best_level(config.target_mpp / slide.mpp)
    return {
        "slide_id": slide_id, "source_path": str(slide.path), "source_size_bytes": size,
        "source_mtime": mtime, "backend": slide.backend, "vendor": slide.vendor,
        "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1],
        "mpp_level0": slide.mpp, "mpp_source": slide.resolution.source, "target_mpp": config.target_mpp,
        "read_level": level, "read_downsample": float(slide.level_downsamples[level]),
        "downsample": config.target_mpp / slide.mpp, "patch_size": config.patch_size,
        "patch_size_level0": patch_size_level0(config.patch_size, config.target_mpp, slide.mpp),
        "overlap": config.overlap, "min_tissue": config.min_tissue, "pixels": config.with_pixels,
        "resample": config.resample, "compression": config.compression,
        "tissue_method": f"geojson:{Path(tissue_geojson).resolve()}" if tissue_geojson else "otsu-saturation",
        "tissue_config": asdict(config.tissue), "n_patches": None, "pathomics_version": __version__,
    }


def _unchanged(final: Path, attrs: dict) -> PatchStore | None:
    """``final``, opened, when it is a complete store built from the same source file with the same parameters."""
    try:
        store = open_patch_store(final)
    except StoreError:
        return None
    same = all(store.attrs.get(k) == v for k, v in attrs.items() if k not in PROVENANCE_SKIP and v is not None)
    return store if same else None


def _stream_patches(slide: SlideReader, grid: Grid, config: TileConfig, writer: PatchStoreWriter,
                    progress: Callable[[int, int], None] | None, scores: list[BatchScores]) -> None:
    """Read patches batch by batch into shards; a writer thread QC-scores each batch (into ``scores``) as soon as
    it is decoded and writes each shard once its last batch is scored.

    Decoding is the one job that needs ``config.threads``; scoring a batch and compressing a shard overlap the
    decoding of the next batch, so on a biopsy of a shard or two the writer is not left with a whole shard
    to score after the last patch is decoded. Three shard buffers circulate (one filling, one queued, one
    being scored and written): reused memory is not page-faulted in again for every shard, which cost as
    much system time as the writing itself.
    """
    reader = PatchReader(slide, grid.read_level, grid.read_size, config.patch_size, config.threads, config.resample)
    n, shard, batch, p = len(grid.coords), writer.shard, config.batch_size, config.patch_size
    batches: queue.Queue = queue.Queue(maxsize=max(2, 2 * shard // batch))  # the reader runs up to two shards ahead
    free: queue.Queue = queue.Queue()
    for _ in range(min(3, -(-(n - writer.patches_written) // shard))):
        free.put(np.empty((shard, p, p, 3), np.uint8))
    failure: list[BaseException] = []

    def write_shards() -> None:
        while (item := batches.get()) is not None:
            shard_start, buffer, start, stop, last = item
            if not failure:
                try:
                    if config.qc:  # scored, like the chunks encoded, by the decode threads (by this one at 1 thread)
                        scores.extend(map_in_parts(lambda i: score_batch(buffer[i:min(stop, i + SCORE_CHUNK)], config.qc),
                                                   range(start, stop, SCORE_CHUNK), reader.pool, config.threads))
                    if last:
                        writer.write(shard_start, buffer[:stop], pool=reader.pool)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread
                    failure.append(exc)
            if last:
                free.put(buffer)

    thread = threading.Thread(target=write_shards, name="pathomics-write", daemon=True)
    thread.start()
    try:
        for shard_start in range(writer.patches_written, n, shard):
            buffer = free.get()
            count = min(n, shard_start + shard) - shard_start
            for i in range(0, count, batch):
                stop = min(count, i + batch)
                reader.read(grid.coords[shard_start + i:shard_start + stop], out=buffer[i:stop])  # the one copy of the patches
                if failure:
                    break
                batches.put((shard_start, buffer, i, stop, stop == count))
            if failure:
                break
            if progress:
                progress(shard_start + count, n)
    finally:
        batches.put(None)
        thread.join()
        reader.close()
    if failure:
        raise failure[0]


def _write_outlines(tissue: Tissue, grid: Grid, layout: OutputLayout, slide_id: str) -> np.ndarray:
    """Save the tissue polygons as GeoJSON, the plain thumbnail, and the thumbnail with the tissue outline (green)
    and the kept patches (blue) drawn on it; returns that thumbnail (BGR), which the QC thumbnail is drawn over."""
    import cv2

    write_geojson(tissue.polygons, layout.tissue_geojson(slide_id))
    image = cv2.cvtColor(tissue.thumbnail, cv2.COLOR_RGB2BGR)
    write_png(layout.plain_thumbnail(slide_id), image)
    scale = 1.0 / tissue.thumbnail_downsample
    size = max(1, int(grid.patch_size_level0 * scale))
    for x, y in grid.coords:
        x0, y0 = int(x * scale), int(y * scale)
        cv2.rectangle(image, (x0, y0), (x0 + size, y0 + size), (200, 90, 40), 1)
    for poly in tissue.polygons.geoms:
        for ring in [poly.exterior, *poly.interiors]:
            pts = np.rint(np.asarray(ring.coords) * scale).astype(np.int32)
            cv2.polylines(image, [pts], True, (0, 170, 0), 2)
    write_png(layout.thumbnail(slide_id), image)
    return image
