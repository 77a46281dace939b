"""Deep Zoom tile throughput of the viewer, side by side on the same slide, tiles and core.

For a synthetic 0.25 µm/px Aperio-style slide, the tiles a 1024×768 viewport requests at every Deep Zoom
level from the whole-slide view down to full resolution (around the slide centre), produced and JPEG-encoded
(quality 85) by:
  (a) pathomics ``DeepZoom`` decoding the slide's JPEG tiles directly (what ``pathomics view`` serves);
  (b) pathomics ``DeepZoom`` over OpenSlide ``read_region``;
  (c) OpenSlide's ``DeepZoomGenerator`` with Pillow's JPEG encoder (OpenSlide's own deep-zoom server);
one thread each, fresh objects per run, runs interleaved; tiles/s, median of the repeats, and ratios to (c).

    python benchmarks/viewer.py [--width 12288 --height 9216] [--repeats 5] [--json benchmarks/results/viewer.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tiling import make_slide  # the tiling benchmark's slide writer and cache (this folder is on sys.path)

VIEW = (1024, 768)
QUALITY = 85


def viewport_tiles(level_dimensions: tuple[tuple[int, int], ...], tile: int) -> list[tuple[int, int, int]]:
    """(level, col, row) of the tiles a centred VIEW-sized viewport needs at each level from whole-slide to full size."""
    keys = []
    for level, (w, h) in enumerate(level_dimensions):
        if max(w, h) < VIEW[0] // 2:
            continue
        x0, y0 = max(0, (w - VIEW[0]) // 2), max(0, (h - VIEW[1]) // 2)
        x1, y1 = min(w, x0 + VIEW[0]), min(h, y0 + VIEW[1])
        keys += [(level, c, r) for r in range(y0 // tile, (y1 - 1) // tile + 1) for c in range(x0 // tile, (x1 - 1) // tile + 1)]
    return keys


def pathomics_run(slide: Path, keys: list, direct: bool) -> float:
    from pathomics.slide import open_slide
    from pathomics.viewer import DeepZoom

    start = time.perf_counter()
    zoom = DeepZoom(open_slide(slide, backend="openslide"), quality=QUALITY, direct=direct)
    for level, col, row in keys:
        zoom.tile_jpeg(level, col, row)
    zoom.close()
    return len(keys) / (time.perf_counter() - start)


def openslide_run(slide: Path, keys: list) -> float:
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    start = time.perf_counter()
    with OpenSlide(slide) as handle:
        generator = DeepZoomGenerator(handle, tile_size=254, overlap=1)
        for level, col, row in keys:
            generator.get_tile(level, (col, row)).save(io.BytesIO(), "jpeg", quality=QUALITY)
    return len(keys) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=12288)
    parser.add_argument("--height", type=int, default=9216)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "viewer.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)
    import pathomics.viewer.deepzoom
    from pathomics.slide import open_slide
    from pathomics.viewer import DeepZoom

    pathomics.viewer.deepzoom.DECODE_THREADS = 1  # one core for every method

    slide = make_slide(args.cache, args.width, args.height)
    zoom = DeepZoom(open_slide(slide))
    keys = viewport_tiles(zoom.level_dimensions, zoom.tile_size)
    zoom.close()
    runs: dict[str, Callable[[], float]] = {
        "pathomics_direct": lambda: pathomics_run(slide, keys, True),
        "pathomics_openslide": lambda: pathomics_run(slide, keys, False),
        "openslide_deepzoom": lambda: openslide_run(slide, keys),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every method alike
        for name, run in runs.items():
            rates[name].append(run())
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "benchmark": "viewer", "slide": f"{args.width}x{args.height}", "tiles": len(keys), "repeats": args.repeats,
        "tiles_per_s": median, "runs": rates,
        "ratio_to_openslide_deepzoom": {n: median[n] / median["openslide_deepzoom"] for n in runs},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"{len(keys)} Deep Zoom tiles of a {args.width}x{args.height} slide, one thread, median of {args.repeats}")
    for name in runs:
        print(f"  {name:22s} {median[name]:8.0f} tiles/s  ({result['ratio_to_openslide_deepzoom'][name]:.2f}x OpenSlide's DeepZoomGenerator)")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
