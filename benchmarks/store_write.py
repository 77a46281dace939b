"""Patch-store write paths and compressions, side by side on the same real patches, one thread each.

Writes the same N patches (256 px, chunks of 4 patches, shards of 128, as the patch store does) with:
  zarr-python's sharded write (``array[a:b] = shard``), the ``zarrs`` Rust codec pipeline through the
  same call (``threading.max_workers`` = 1), and pathomics's own shard writer (``pathomics.shards``),
each with blosc-lz4, zstd-1 and no compression; plus JPEG per patch (imagecodecs, quality 90) for
its size and encode cost. Every store is read back with plain zarr-python and compared. Repeats are
interleaved and the median reported; bytes per patch are the shard files' sizes over N.

    python benchmarks/store_write.py [--patches 1024] [--repeats 5] [--json benchmarks/results/store_write.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiling import TARGET_MPP, make_slide  # noqa: E402

CHUNK, SHARD = 4, 128


def real_patches(cache: Path, n: int) -> np.ndarray:
    """The first ``n`` tissue patches of the benchmark slide at 0.5 µm/px × 256 px (cached as .npy)."""
    path = cache / f"patches_{n}.npy"
    if not path.exists():
        from pathomics.slide import open_slide
        from pathomics.slide.patches import PatchReader
        from pathomics.tiling import TileConfig, plan_grid
        from pathomics.tissue import detect_tissue

        config = TileConfig(target_mpp=TARGET_MPP)
        with open_slide(make_slide(cache, 40000, 30000)) as slide:
            grid = plan_grid(slide, detect_tissue(slide).polygons, config)
            reader = PatchReader(slide, grid.read_level, grid.read_size, config.patch_size, resample="fast")
            np.save(path, reader.read(grid.coords[:n]))
            reader.close()
    return np.load(path)


def zarr_write(root: Path, images: np.ndarray, compression: str, pipeline: str) -> None:
    import zarr

    from pathomics.shards import zarr_compressors

    settings = {"threading.max_workers": 1}
    if pipeline == "zarrs":
        import zarrs  # noqa: F401 - registers the pipeline

        settings["codec_pipeline.path"] = "zarrs.ZarrsCodecPipeline"
    with zarr.config.set(settings):
        p = images.shape[1]
        array = zarr.create_array(root, shape=images.shape, dtype="uint8", chunks=(CHUNK, p, p, 3), shards=(SHARD, p, p, 3),
                                  compressors=zarr_compressors(compression), fill_value=0, zarr_format=3)
        for start in range(0, len(images), SHARD):
            array[start:start + SHARD] = images[start:start + SHARD]


def own_write(root: Path, images: np.ndarray, compression: str) -> None:
    import zarr

    from pathomics.shards import chunk_encoder, write_shard, zarr_compressors

    p = images.shape[1]
    array = zarr.create_array(root, shape=images.shape, dtype="uint8", chunks=(CHUNK, p, p, 3), shards=(SHARD, p, p, 3),
                              compressors=zarr_compressors(compression), fill_value=0, zarr_format=3)
    encode = chunk_encoder(compression)
    for start in range(0, len(images), SHARD):
        key = array.metadata.encode_chunk_key((start // SHARD, 0, 0, 0))
        write_shard(root / key, images[start:start + SHARD], CHUNK, SHARD // CHUNK, encode)


def jpeg_encode(root: Path, images: np.ndarray, quality: int = 90) -> None:
    import imagecodecs

    root.mkdir(parents=True)
    with open(root / "patches.jpegs", "wb") as fh:
        for patch in images:
            fh.write(imagecodecs.jpeg8_encode(patch, level=quality))


def stored_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != "zarr.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "store_write.json")
    args = parser.parse_args()

    import zarr

    images = real_patches(args.cache, args.patches)
    options = {f"{writer} {c}": (writer, c) for writer in ("zarr-python", "zarrs", "pathomics shards") for c in ("lz4", "zstd", "none")}
    options["JPEG q90 per patch (not readable by zarr-python without registering a codec)"] = ("jpeg", "jpeg")
    times: dict[str, list[float]] = {name: [] for name in options}
    sizes: dict[str, int] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        for _ in range(args.repeats):  # interleaved: each repeat runs every option once
            for name, (writer, compression) in options.items():
                root = work / "store"
                start = time.perf_counter()
                if writer == "jpeg":
                    jpeg_encode(root, images)
                elif writer == "pathomics shards":
                    own_write(root, images, compression)
                else:
                    zarr_write(root, images, compression, "zarrs" if writer == "zarrs" else "default")
                times[name].append(time.perf_counter() - start)
                sizes[name] = stored_bytes(root)
                if writer != "jpeg" and not np.array_equal(zarr.open_array(root, mode="r")[:], images):
                    raise SystemExit(f"{name}: read back differs")
                shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(images)
    base = statistics.median(times["zarr-python lz4"])
    rows = {name: {"ms_per_patch": 1e3 * statistics.median(t) / n, "patches_per_s": n / statistics.median(t),
                   "bytes_per_patch": sizes[name] / n, "speed_vs_zarr_python_lz4": base / statistics.median(t)}
            for name, t in times.items()}
    result = {"patches": n, "patch_shape": list(images.shape[1:]), "chunk": CHUNK, "shard": SHARD,
              "raw_bytes_per_patch": int(np.prod(images.shape[1:])), "repeats": args.repeats, "options": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"Patch-store writes: {n} real patches of {images.shape[1]} px, one thread, median of {args.repeats} interleaved")
    print(f"  {'writer':<40} {'ms/patch':>9} {'patches/s':>10} {'bytes/patch':>12} {'vs zarr lz4':>12}")
    for name, row in rows.items():
        print(f"  {name[:40]:<40} {row['ms_per_patch']:>9.3f} {row['patches_per_s']:>10,.0f} {row['bytes_per_patch']:>12,.0f} "
              f"{row['speed_vs_zarr_python_lz4']:>11.2f}x")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
