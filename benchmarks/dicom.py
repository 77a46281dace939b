"""DICOM reading speed beside the SVS it was copied from, side by side in one process.

A synthetic 0.25 µm/px Aperio-style slide and its DICOM copy (same JPEG tiles, one file a level) are
tiled to 0.5 µm/px x 256 px. Patch reading alone (the tiling grid's coordinates, one thread, 64 a batch)
is timed for: the SVS through the direct TIFF tile path; the DICOM copy through the direct frame path,
OpenSlide's ``read_region`` and wsidicom's ``read_region``; repeats interleaved, median reported, with
each rate's ratio to the SVS path. End-to-end ``tile_slide`` (one thread) is timed for both files too, and
decoding alone: 512 level-0 tiles, each once, from the TIFF tile source and from the DICOM frame source.

    python benchmarks/dicom.py [--width 16384 --height 12288] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

TARGET_MPP, PATCH = 0.5, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--height", type=int, default=12288)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pathomics-bench")
    args = parser.parse_args()

    from pathomics.slide import DicomTileSource, TiffTileSource, open_slide
    from pathomics.slide.patches import PatchReader
    from pathomics.store import open_patch_store
    from pathomics.synthetic import write_slide
    from pathomics.synthetic.dicom import write_dicom_copy
    from pathomics.tiling import TileConfig, tile_slide

    svs = args.cache / f"dicom_bench_{args.width}x{args.height}.svs"
    dicom = svs.with_suffix("")
    if not dicom.exists():
        args.cache.mkdir(parents=True, exist_ok=True)
        write_slide(svs, args.width, args.height, mpp=0.25, flavour="aperio", layout="pieces", seed=11)
        write_dicom_copy(svs, dicom, 0.25)
    config = TileConfig(target_mpp=TARGET_MPP, patch_size=PATCH, threads=1)
    out = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    readers = {  # name: (slide, backend, direct frame path allowed)
        "svs, direct TIFF tiles": (svs, "auto", True),
        "dicom, direct frames": (dicom, "auto", True),
        "dicom, OpenSlide read_region": (dicom, "auto", False),
        "dicom, wsidicom read_region": (dicom, "wsidicom", False),
    }
    rates: dict[str, list[float]] = {name: [] for name in [*readers, "svs, tile_slide", "dicom, tile_slide"]}
    decoders = {"svs, decode tiles": (TiffTileSource, svs), "dicom, decode frames": (DicomTileSource, dicom)}
    decode_rates: dict[str, list[float]] = {name: [] for name in decoders}
    try:
        store = open_patch_store(tile_slide(svs, out / "grid", config).path)
        coords, level, read_size = store.coords, store.attrs["read_level"], store.attrs["read_size"]
        for _ in range(args.repeats):
            for name, (path, backend, frames) in readers.items():
                with contextlib.ExitStack() as stack:
                    if not frames:
                        stack.enter_context(mock.patch.object(DicomTileSource, "open", classmethod(lambda cls, *a: None)))
                    slide = stack.enter_context(open_slide(path, backend=backend))
                    start = time.perf_counter()
                    reader = PatchReader(slide, level, read_size, PATCH, threads=1)
                    for i in range(0, len(coords), 64):
                        reader.read(coords[i:i + 64])
                    reader.close()
                    rates[name].append(len(coords) / (time.perf_counter() - start))
            for name, (source_cls, path) in decoders.items():
                with open_slide(path) as slide:
                    source = source_cls.open(path, slide.level_dimensions)
                    columns = -(-slide.dimensions[0] // source.tile_shape(0)[0])
                    keys = [(0, i // columns, i % columns) for i in range(512)]
                    start = time.perf_counter()
                    for key in keys:
                        source._decode(key)
                    decode_rates[name].append(len(keys) / (time.perf_counter() - start))
                    source.close()
            for name, path in [("svs, tile_slide", svs), ("dicom, tile_slide", dicom)]:
                shutil.rmtree(out / "run", ignore_errors=True)
                start = time.perf_counter()
                n = tile_slide(path, out / "run", config).n_patches
                rates[name].append(n / (time.perf_counter() - start))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(rates["svs, direct TIFF tiles"])
    print(f"{args.width}x{args.height}, {len(coords)} patches of {read_size} px at level {level} -> {PATCH} px, "
          f"one thread, median of {args.repeats}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"  {name:32s} {rate:7.0f} patches/s  {rate / base:5.2f}x svs direct" if "tile_slide" not in name
              else f"  {name:32s} {rate:7.0f} patches/s  (end to end)")
    tiles = statistics.median(decode_rates["svs, decode tiles"])
    for name, values in decode_rates.items():
        print(f"  {name:32s} {statistics.median(values):7.0f} tiles/s    {statistics.median(values) / tiles:5.2f}x svs tiles")


if __name__ == "__main__":
    main()
