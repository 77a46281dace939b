"""Tiling throughput and memory, side by side on the same slide and cores.

Measures, on a synthetic 0.25 µm/px Aperio-style slide tiled to 0.5 µm/px × 256 px:
  (a) pathomics ``tile_slide`` end to end (tissue detection, reading, resampling, Zarr writing), patches/s;
  (b) a per-patch OpenSlide ``read_region`` loop over the same coordinates with an area resize
      (the CLAM-style baseline), patches/s;
  (c) the raw decode bound: every JPEG tile those patches need, decoded once (no assembly, no
      resampling, no writing), with the same number of threads as (a), and (c1) on one core as
      DESIGN.md defines it, patches/s;
and the ratios a/b, a/c and a/c1, plus the peak RSS of (a) on this slide and on one with 10x fewer pixels.
Each measurement runs in its own subprocess so that peak RSS is its own.

    python benchmarks/tiling.py [--width 40000 --height 30000] [--repeats 3] [--json benchmarks/results/tiling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TARGET_MPP, PATCH = 0.5, 256


def make_slide(cache: Path, width: int, height: int) -> Path:
    """The benchmark slide, written once and cached (it takes a minute or two at full size)."""
    from pathomics.synthetic import write_slide

    path = cache / f"bench_{width}x{height}.svs"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.svs")
        write_slide(tmp, width, height, mpp=0.25, flavour="aperio", layout="pieces", seed=11)
        os.replace(tmp, path)
    return path


def run_pathomics(slide: Path, threads: int) -> dict:
    import scipy.ndimage  # noqa: F401 - imported before timing, as in a long-running batch
    import skimage.filters  # noqa: F401
    import skimage.morphology  # noqa: F401
    import zarr  # noqa: F401

    from pathomics.tiling import TileConfig, tile_slide

    out = Path(tempfile.mkdtemp(prefix="bench-tile-"))
    try:
        result = tile_slide(slide, out, TileConfig(target_mpp=TARGET_MPP, patch_size=PATCH, threads=threads))
        coords_file = Path(os.environ["BENCH_COORDS"])
        from pathomics.store import open_patch_store

        store = open_patch_store(result.path)
        np.save(coords_file, store.coords)
        return {"patches": result.n_patches, "seconds": result.seconds, "read_level": store.attrs["read_level"],
                "patch_size_level0": store.attrs["patch_size_level0"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_openslide_loop(slide: Path, coords: np.ndarray, size0: int) -> dict:
    import cv2
    import openslide

    handle = openslide.OpenSlide(str(slide))
    start = time.perf_counter()
    for x, y in coords:
        region = np.asarray(handle.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB"))
        cv2.resize(region, (PATCH, PATCH), interpolation=cv2.INTER_AREA)
    return {"patches": len(coords), "seconds": time.perf_counter() - start}


def run_decode_bound(slide: Path, coords: np.ndarray, size0: int, threads: int) -> dict:
    import openslide

    from pathomics.slide import TiffTileSource

    dims = openslide.OpenSlide(str(slide)).level_dimensions
    source = TiffTileSource.open(slide, dims)
    keys = sorted(source.tiles_for(0, [(int(x), int(y), size0, size0) for x, y in coords]))
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(source._decode, keys):
            pass
    return {"patches": len(coords), "tiles": len(keys), "seconds": time.perf_counter() - start}


def child(kind: str, slide: Path, threads: int) -> None:
    """One measurement in this process; prints its JSON result including the peak RSS."""
    coords = np.load(os.environ["BENCH_COORDS"]) if kind != "pathomics" else None
    size0 = int(os.environ.get("BENCH_SIZE0", "0"))
    if kind == "pathomics":
        result = run_pathomics(slide, threads)
    elif kind == "openslide":
        result = run_openslide_loop(slide, coords, size0)
    else:
        result = run_decode_bound(slide, coords, size0, threads)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited through fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, slide: Path, threads: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--slide", str(slide), "--threads", str(threads)]
    out = subprocess.run(cmd, env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["patches_per_s"] = result["patches"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a) and (c); the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tiling.json")
    parser.add_argument("--child", choices=("pathomics", "openslide", "decode"))
    parser.add_argument("--slide", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.slide, args.threads)
        return

    big = make_slide(args.cache, args.width, args.height)
    small_w, small_h = round(args.width / 10**0.5), round(args.height / 10**0.5)
    small = make_slide(args.cache, small_w, small_h)
    coords_file = args.cache / "coords.npy"
    env = {"BENCH_COORDS": str(coords_file)}

    runs = [measure("pathomics", big, args.threads, env) for _ in range(args.repeats)]
    env["BENCH_SIZE0"] = str(runs[0]["patch_size_level0"])
    decode = [measure("decode", big, args.threads, env) for _ in range(args.repeats)]
    decode_one = [measure("decode", big, 1, env) for _ in range(args.repeats)]
    loop = measure("openslide", big, args.threads, env)
    small_run = measure("pathomics", small, args.threads, env)

    a = statistics.median(r["patches_per_s"] for r in runs)
    c = statistics.median(r["patches_per_s"] for r in decode)
    c1 = statistics.median(r["patches_per_s"] for r in decode_one)
    b = loop["patches_per_s"]
    rss_big = max(r["peak_rss_mb"] for r in runs)
    result = {
        "slide": {"width": args.width, "height": args.height, "mpp": 0.25, "target_mpp": TARGET_MPP, "patch_size": PATCH,
                  "patches": runs[0]["patches"], "patch_size_level0": runs[0]["patch_size_level0"],
                  "read_level": runs[0]["read_level"], "tiles_decoded": decode[0]["tiles"]},
        "threads": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "a_pathomics_patches_per_s": a, "b_openslide_loop_patches_per_s": b, "c_decode_bound_patches_per_s": c,
        "c1_decode_bound_one_core_patches_per_s": c1,
        "ratio_a_over_b": a / b, "ratio_a_over_c": a / c, "ratio_a_over_c1": a / c1,
        "peak_rss_mb_big": rss_big, "peak_rss_mb_small": small_run["peak_rss_mb"],
        "small_slide": {"width": small_w, "height": small_h, "patches": small_run["patches"]},
        "peak_rss_ratio": rss_big / small_run["peak_rss_mb"],
        "runs": {"pathomics": runs, "decode": decode, "decode_one_core": decode_one, "openslide": loop, "pathomics_small": small_run},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    rows = [
        ("(a) pathomics tile_slide", f"{a:,.0f} patches/s", f"peak RSS {rss_big:,.0f} MB"),
        ("(b) OpenSlide read_region per patch", f"{b:,.0f} patches/s", f"peak RSS {loop['peak_rss_mb']:,.0f} MB"),
        (f"(c) decode needed JPEG tiles once, {args.threads} threads", f"{c:,.0f} patches/s", f"{decode[0]['tiles']:,} tiles"),
        ("(c1) the same on one core (DESIGN's bound)", f"{c1:,.0f} patches/s", ""),
        ("a/b", f"{a / b:.2f}x", "target >= 5"),
        ("a/c", f"{a / c:.2f}", "target >= 0.8 (same threads)"),
        ("a/c1", f"{a / c1:.2f}", "target >= 0.8 (one-core bound)"),
        (f"peak RSS {args.width}x{args.height} / {small_w}x{small_h}", f"{result['peak_rss_ratio']:.2f}", "target <= 1.5"),
    ]
    print(f"Tiling benchmark: {args.width}x{args.height} px at 0.25 µm/px -> {TARGET_MPP} µm/px x {PATCH} px, "
          f"{runs[0]['patches']:,} patches, {args.threads} threads, median of {args.repeats}")
    for name, value, note in rows:
        print(f"  {name:<44} {value:>18}   {note}")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
