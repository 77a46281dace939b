"""Archive scaling: the per-slide stages (tile + embed) of one archive on 1, 2, ... Dask workers.

The same synthetic archive (cached) is processed from scratch with each worker count, side by side in
one run; prints slides/hour and the speed-up over one worker, and writes JSON. Embedding uses
``shufflenet-v2`` with random weights (labelled as such) so that nothing needs downloading.

Two thread settings are measured. ``auto`` is what ``pathomics run`` does: the cores are shared out,
cores / workers threads each, so the speed-up is what more workers add on this machine. ``1`` pins every
worker to one thread: its speed-up is how well the scale-out itself scales when each worker has a core.

It also times the re-run of the finished archive (every slide skipped), with the per-slide stamps that
let it skip without a cluster or opening a slide, and without them (the path every re-run took before).

    python benchmarks/archive_scaling.py [--slides 16] [--workers 1 2] [--threads-per-worker auto 1] [--repeats 3] [--rerun-only] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pathomics.embed import EmbedConfig
from pathomics.layout import OutputLayout
from pathomics.manifest import SlideEntry
from pathomics.runner.pipeline import RunConfig, dask_client, run_slides, worker_backbone
from pathomics.store import open_patch_store
from pathomics.synthetic import write_slide
from pathomics.tiling import TileConfig


def archive(cache: Path, n: int, size: tuple[int, int]) -> list[SlideEntry]:
    """``n`` Aperio-style slides at 0.5 µm/px, written once and cached."""
    cache.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        path = cache / f"archive_{size[0]}x{size[1]}_{i}.svs"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.partial")
            write_slide(tmp, *size, mpp=0.5, layout=("blob", "pieces", "ring")[i % 3], seed=100 + i)
            os.replace(tmp, path)
        entries.append(SlideEntry(path, path.stem, f"P{i}"))
    return entries


def _warm_up(embed: EmbedConfig) -> None:
    """Import the stages and build the backbone on a worker, as a long-running cluster already has."""
    import pathomics.tiling  # noqa: F401

    worker_backbone(embed)


def time_archive(entries: list[SlideEntry], config: RunConfig) -> tuple[float, int]:
    """Seconds to tile and embed ``entries`` from scratch on a started cluster, and the patches they gave."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-archive-{config.workers}-"))
    try:
        with dask_client(config) as client:
            client.run(_warm_up, config.embed)  # cluster start, imports and model build are not archive throughput
            start = time.perf_counter()
            rows = run_slides(entries, out, config, client=client, show_progress=False)
            seconds = time.perf_counter() - start
        failed = [r for r in rows if r.state == "failed"]
        if failed:
            raise SystemExit(f"benchmark slides failed: {failed}")
        return seconds, sum(len(open_patch_store(p)) for p in (out / "tiles").glob("*.zarr"))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def time_rerun(entries: list[SlideEntry], config: RunConfig, repeats: int) -> dict:
    """Seconds per slide of re-running a finished archive, as a user's re-run does (cluster start included):
    with the per-slide stamps, and with them removed, which takes the path every re-run took before them
    (a cluster started, every slide opened and its store and features checked)."""
    out = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    try:
        run_slides(entries, out, config, show_progress=False)
        stamps = OutputLayout(out).slide_stamp(entries[0].slide_id).parent
        seconds: dict[str, list[float]] = {"stamped": [], "unstamped": []}
        for _ in range(repeats):
            for kind in seconds:
                if kind == "unstamped":
                    shutil.rmtree(stamps)
                start = time.perf_counter()
                rows = run_slides(entries, out, config, show_progress=False)
                seconds[kind].append(time.perf_counter() - start)
                if {r.state for r in rows} != {"skipped"}:
                    raise SystemExit(f"re-run of a finished archive did work: {rows}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {kind: {"seconds": statistics.median(s), "all_seconds": s, "ms_per_slide": 1000 * statistics.median(s) / len(entries)}
            for kind, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(8192, 6144), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", nargs="+", default=["auto", "1"], help="'auto' (cores / workers) or a number")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every setting; the median is reported")
    parser.add_argument("--rerun-only", action="store_true", help="time only the re-run of a finished archive")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "archive_scaling.json")
    args = parser.parse_args()

    entries = archive(args.cache, args.slides, tuple(args.size))
    tile = TileConfig(target_mpp=1.0, patch_size=128)
    embed = EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=64)
    configs = {(threads, workers): RunConfig(tile=tile, embed=embed, workers=workers,
                                             threads_per_worker=None if threads == "auto" else int(threads))
               for threads, workers in itertools.product(args.threads_per_worker, args.workers)}
    rerun = time_rerun(entries, RunConfig(tile=tile, embed=embed, workers=1), args.repeats)
    load = os.getloadavg()[0]
    print(f"Re-run of the finished archive ({args.slides} slides, all skipped, cluster start included; load {load:.1f}):")
    for kind, r in rerun.items():
        print(f"  {kind:>9}: {r['seconds']:6.2f} s, {r['ms_per_slide']:7.1f} ms/slide")
    if args.rerun_only:
        write_document(args.json, {"slides": args.slides, "size": list(args.size), "cpu_count": os.cpu_count(),
                                   "load_average": load, "repeats": args.repeats, "rerun": rerun})
        return
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    patches = 0
    for _ in range(args.repeats):  # interleaved, so that a noisy spell hits every setting alike
        for key, config in configs.items():
            elapsed, patches = time_archive(entries, config)
            seconds[key].append(elapsed)
    results = []
    for (threads, workers), config in configs.items():
        median = statistics.median(seconds[threads, workers])
        results.append({"threads_per_worker": threads, "worker_threads": config.worker_threads, "workers": workers,
                        "seconds": median, "all_seconds": seconds[threads, workers], "slides": len(entries),
                        "slides_per_hour": len(entries) / median * 3600, "patches": patches, "patches_per_s": patches / median})
    for r in results:  # over the fewest workers of the same thread setting
        base = next(b for b in results if b["threads_per_worker"] == r["threads_per_worker"])
        r["speedup"] = r["slides_per_hour"] / base["slides_per_hour"]
    document = {"slides": args.slides, "size": list(args.size), "cpu_count": os.cpu_count(), "repeats": args.repeats,
                "tile": {"target_mpp": tile.target_mpp, "patch_size": tile.patch_size},
                "embed": {"model": embed.model, "weights": "random", "precision": embed.precision}, "runs": results,
                "load_average": load, "rerun": rerun}
    write_document(args.json, document)
    print(f"Archive benchmark: {args.slides} slides of {args.size[0]}x{args.size[1]} px, tile + embed "
          f"(shufflenet-v2, RANDOM weights), {os.cpu_count()} cores, median of {args.repeats}")
    print(f"  {'threads/worker':>14} {'workers':>7} {'seconds':>9} {'slides/hour':>12} {'patches/s':>10} {'speed-up':>9}")
    for r in results:
        threads = f"{r['threads_per_worker']} ({r['worker_threads']})" if r["threads_per_worker"] == "auto" else r["threads_per_worker"]
        print(f"  {threads:>14} {r['workers']:>7} {r['seconds']:>9.1f} {r['slides_per_hour']:>12.0f} "
              f"{r['patches_per_s']:>10.0f} {r['speedup']:>8.2f}x")


def write_document(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
