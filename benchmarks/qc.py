"""What quality control adds to tiling, side by side on the benchmark slide of ``benchmarks/tiling.py``.

Runs ``tile_slide`` on the same synthetic 40000 x 30000 Aperio-style slide (0.25 µm/px -> 0.5 µm/px x 256 px)
with QC (the default) and without (``TileConfig(qc=None)``), interleaved, each run in its own subprocess
(imports done before timing, as in a long-running batch), and reports the median seconds of each and their
ratio; the target is at most 1.15. The machine this runs on is shared, so beside wall time it reports CPU
time (all threads of the tiling process), which other processes disturb far less, and the CPU time of
``score_batch`` alone on the slide's patches.

    python benchmarks/qc.py [--repeats 5] [--json benchmarks/results/qc.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tiling import PATCH, TARGET_MPP, make_slide


def child(slide: Path, qc: bool, threads: int) -> dict:
    """One tiling run in this process; with ``qc``, also QC scoring alone on the stored patches."""
    import pandas  # noqa: F401 - imported before timing, as in a long-running batch
    import pyarrow.parquet  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import skimage.filters
    import skimage.morphology  # noqa: F401
    import zarr  # noqa: F401

    from pathomics.qc import QCConfig, score_batch
    from pathomics.store import open_patch_store
    from pathomics.tiling import TileConfig, tile_slide

    out = Path(tempfile.mkdtemp(prefix="bench-qc-"))
    try:
        config = TileConfig(target_mpp=TARGET_MPP, patch_size=PATCH, threads=threads, qc=QCConfig() if qc else None)
        cpu = time.process_time()
        result = tile_slide(slide, out, config)
        row = {"qc": qc, "patches": result.n_patches, "seconds": result.seconds, "cpu_seconds": time.process_time() - cpu}
        if qc:
            store = open_patch_store(result.path)
            batches = [store.read_images(i, min(i + config.batch_size, len(store))) for i in range(0, len(store), config.batch_size)]
            start = time.process_time()
            for images in batches:
                score_batch(images, config.qc)
            row["score_batch_cpu_seconds"] = time.process_time() - start
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(slide: Path, qc: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "qc" if qc else "plain", "--slide", str(slide), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, interleaved; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qc.json")
    parser.add_argument("--child", choices=("qc", "plain"))
    parser.add_argument("--slide", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.slide, args.child == "qc", args.threads)))
        return

    slide = make_slide(args.cache, args.width, args.height)
    measure(slide, True, args.threads)  # warm the page cache
    runs: dict[str, list[dict]] = {"plain": [], "qc": []}
    for _ in range(args.repeats):
        for name in ("plain", "qc"):
            runs[name].append(measure(slide, name == "qc", args.threads))
    plain = statistics.median(r["seconds"] for r in runs["plain"])
    with_qc = statistics.median(r["seconds"] for r in runs["qc"])
    pairs = [q["seconds"] / p["seconds"] for p, q in zip(runs["plain"], runs["qc"])]
    patches = runs["qc"][0]["patches"]
    score = statistics.median(r["score_batch_cpu_seconds"] for r in runs["qc"])
    plain_cpu = statistics.median(r["cpu_seconds"] for r in runs["plain"])
    qc_cpu = statistics.median(r["cpu_seconds"] for r in runs["qc"])
    result = {
        "slide": {"width": args.width, "height": args.height, "mpp": 0.25, "target_mpp": TARGET_MPP, "patch_size": PATCH,
                  "patches": patches},
        "threads": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "tile_seconds_without_qc": plain, "tile_seconds_with_qc": with_qc, "ratio_with_over_without": with_qc / plain,
        "ratio_of_interleaved_pairs_median": statistics.median(pairs),
        "tile_cpu_seconds_without_qc": plain_cpu, "tile_cpu_seconds_with_qc": qc_cpu, "cpu_ratio_with_over_without": qc_cpu / plain_cpu,
        "score_batch_cpu_ms_per_patch": 1000 * score / patches, "score_batch_cpu_over_tiling_cpu": score / plain_cpu,
        "target_ratio": 1.15, "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"QC benchmark: {args.width}x{args.height} px at 0.25 µm/px -> {TARGET_MPP} µm/px x {PATCH} px, {patches:,} patches, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    rows = [("tile_slide without QC", f"{plain:.2f} s", f"{patches / plain:,.0f} patches/s"),
            ("tile_slide with QC", f"{with_qc:.2f} s", f"{patches / with_qc:,.0f} patches/s"),
            ("with / without (medians)", f"{with_qc / plain:.3f}", "target <= 1.15"),
            ("with / without (median of pairs)", f"{statistics.median(pairs):.3f}", ""),
            ("CPU time without QC", f"{plain_cpu:.2f} s", f"{1000 * plain_cpu / patches:.2f} ms/patch"),
            ("CPU time with QC", f"{qc_cpu:.2f} s", f"{1000 * qc_cpu / patches:.2f} ms/patch"),
            ("CPU with / without", f"{qc_cpu / plain_cpu:.3f}", "target <= 1.15"),
            ("score_batch alone, CPU", f"{1000 * score / patches:.3f} ms/patch", f"{score / plain_cpu:.1%} of tiling's CPU")]
    for name, value, note in rows:
        print(f"  {name:<36} {value:>18}   {note}")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
