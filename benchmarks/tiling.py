"""Tiling throughput, start-up and memory, side by side on the same slide, coordinates and machine.

On a synthetic 0.25 µm/px Aperio-style slide (256-px JPEG tiles) tiled to 0.5 µm/px × 256 px, every
reader gets the same patch coordinates (those pathomics keeps) and produces the same 256-px patches:
  pathomics  ``tile_slide`` end to end (tissue detection, grid, decoding, resampling, QC, zstd, writing), with
             1 decoding thread and all cores (a writer thread beside them scores and compresses finished
             shards, so the CPU column is the one-core figure); the same without QC and compression
             ("lean": the work the peers do, plus tissue detection and writing raw patches); and
             ``pathomics tile --threads 1`` from the shell, start-up included;
  openslide  per-patch ``read_region`` of the level-0 box + area resize (the CLAM-style loop);
  tiffslide  the same through tiffslide (array output);
  cucim      cuCIM's CPU reader per patch, and batched ``read_region`` with as many workers as cores
             (skipped with a note when cuCIM is not installed);
  decode     the bound: each needed JPEG tile decoded once at the scale pathomics decodes it, one core;
  write      writing the same number of real patches to a patch store alone, one thread.
Also: peak RSS of pathomics on this slide and on one with 10x fewer pixels, bytes per stored patch,
the start-up split (interpreter + imports, tissue detection, grid planning), the streaming phase alone
against cuCIM, and each run's CPU ceiling (all cores busy at its CPU cost per patch) against the decode
bound. Each measurement runs in its own subprocess (its own peak RSS and CPU time); repeats are
interleaved and medians reported.

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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TARGET_MPP, PATCH = 0.5, 256
IMPORTS = "import pathomics.tiling, pathomics.cli.main, zarr, cv2, openslide, tifffile, simplejpeg, imagecodecs"


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block: ``with Clock() as clock: ...; clock.times()``."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def times(self) -> dict:
        return {"seconds": self.wall, "cpu_seconds": self.cpu}


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


def preload() -> None:
    """Import what tiling imports lazily, before timing: a long-running batch pays this once (the CLI run includes it)."""
    import google_crc32c, imagecodecs, pandas, pyarrow.parquet, simplejpeg, tifffile, zarr, cv2  # noqa: E401, F401


def run_pathomics(slide: Path, threads: int, lean: bool = False) -> dict:
    """``tile_slide`` with the default settings, or ``lean``: no QC, no compression."""
    preload()

    from pathomics.store import open_patch_store
    from pathomics.tiling import TileConfig, tile_slide

    import pathomics.tiling

    settings = {"qc": None, "compression": "none"} if lean else {}
    stream = pathomics.tiling._stream_patches
    phase = Clock()

    def timed_stream(*args: object, **kwargs: object) -> None:  # the streaming phase alone: no tissue detection, grid, QC summary
        with phase:
            stream(*args, **kwargs)

    pathomics.tiling._stream_patches = timed_stream
    out = Path(tempfile.mkdtemp(prefix="bench-tile-"))
    try:
        with Clock() as clock:
            result = tile_slide(slide, out, TileConfig(target_mpp=TARGET_MPP, patch_size=PATCH, threads=threads, **settings))
        store = open_patch_store(result.path)
        np.save(os.environ["BENCH_COORDS"], store.coords)
        stored = sum(f.stat().st_size for f in (result.path / "images").rglob("*") if f.is_file() and f.name != "zarr.json")
        return {"patches": result.n_patches, **clock.times(), "stream_seconds": phase.wall, "read_level": store.attrs["read_level"],
                "patch_size_level0": store.attrs["patch_size_level0"], "bytes_per_patch": stored / max(1, result.n_patches),
                "compression": store.attrs["compression"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_startup(slide: Path) -> dict:
    """Tissue detection and grid planning, each timed alone (the imports are timed by the parent)."""
    from pathomics.slide import open_slide
    from pathomics.tiling import TileConfig, plan_grid
    from pathomics.tissue import detect_tissue

    config = TileConfig(target_mpp=TARGET_MPP, patch_size=PATCH)
    with open_slide(slide) as handle, Clock() as clock:
        with Clock() as tissue_clock:
            tissue = detect_tissue(handle, config.tissue)
        with Clock() as grid_clock:
            grid = plan_grid(handle, tissue.polygons, config)
    return {"patches": len(grid.coords), **clock.times(), "tissue_s": tissue_clock.wall, "tissue_cpu_s": tissue_clock.cpu,
            "grid_s": grid_clock.wall, "grid_cpu_s": grid_clock.cpu}


def area(region: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(region, (PATCH, PATCH), interpolation=cv2.INTER_AREA)


def run_openslide_loop(slide: Path, coords: np.ndarray, size0: int) -> dict:
    import openslide

    handle = openslide.OpenSlide(str(slide))
    with Clock() as clock:
        for x, y in coords:
            area(np.asarray(handle.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB")))
    return {"patches": len(coords), **clock.times()}


def run_tiffslide_loop(slide: Path, coords: np.ndarray, size0: int) -> dict:
    import tiffslide

    handle = tiffslide.TiffSlide(str(slide))
    with Clock() as clock:
        for x, y in coords:
            area(np.asarray(handle.read_region((int(x), int(y)), 0, (size0, size0), as_array=True))[..., :3])
    return {"patches": len(coords), **clock.times()}


def run_cucim(slide: Path, coords: np.ndarray, size0: int, workers: int) -> dict:
    """cuCIM's CPU reader: per patch (``workers`` = 0) or batched ``read_region`` with ``workers`` threads."""
    from cucim import CuImage

    image = CuImage(str(slide))
    with Clock() as clock:
        if workers == 0:
            for x, y in coords:
                area(np.asarray(image.read_region((int(x), int(y)), (size0, size0), 0))[..., :3])
        else:
            locations = [(int(x), int(y)) for x, y in coords]
            for batch in image.read_region(locations, (size0, size0), 0, num_workers=workers, batch_size=64):
                for region in np.asarray(batch).reshape(-1, size0, size0, np.asarray(batch).shape[-1]):
                    area(region[..., :3])
    return {"patches": len(coords), **clock.times()}


def run_decode_bound(slide: Path, coords: np.ndarray) -> dict:
    """Each JPEG tile the patches need, decoded once at the scale pathomics decodes it, on one core."""
    from pathomics.slide import open_slide
    from pathomics.slide.patches import PatchReader
    from pathomics.tiling import TileConfig, patch_size_level0

    with open_slide(slide) as handle:
        size0 = patch_size_level0(PATCH, TARGET_MPP, handle.mpp)
        level = handle.best_level(TARGET_MPP / handle.mpp)
        reader = PatchReader(handle, level, round(size0 / handle.level_downsamples[level]), PATCH, 1, TileConfig().resample)
        keys = sorted(reader.tiles.tiles_for(level, [box for box, _ in reader._boxes(coords)], reader.scale))
        with Clock() as clock:
            for key in keys:
                reader.tiles._decode(key)
        reader.close()
    return {"patches": len(coords), "tiles": len(keys), "scale": reader.scale, **clock.times()}


def run_write(patches: np.ndarray, n: int) -> dict:
    """Writing ``n`` real patches (the first ones repeated as needed) to a patch store, one thread, default compression."""
    from pathomics.store import PatchStoreWriter

    preload()
    images = patches[np.arange(n) % len(patches)]
    attrs = {"patch_size": PATCH, "slide_id": "bench"}
    out = Path(tempfile.mkdtemp(prefix="bench-write-"))
    try:
        with Clock() as clock:
            writer = PatchStoreWriter(out / "bench.zarr", attrs, np.zeros((n, 2), np.int64), np.ones(n, np.float32))
            for first in range(0, n, writer.shard):
                writer.write(first, images[first:first + writer.shard])
            writer.publish()
        return {"patches": n, **clock.times()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def child(kind: str, slide: Path, threads: int) -> None:
    """One measurement in this process; prints its JSON result including the peak RSS."""
    coords = np.load(os.environ["BENCH_COORDS"]) if kind not in ("pathomics", "pathomics-lean", "startup") else None
    size0 = int(os.environ.get("BENCH_SIZE0", "0"))
    if kind in ("pathomics", "pathomics-lean"):
        result = run_pathomics(slide, threads, lean=kind == "pathomics-lean")
    elif kind == "startup":
        result = run_startup(slide)
    elif kind == "openslide":
        result = run_openslide_loop(slide, coords, size0)
    elif kind == "tiffslide":
        result = run_tiffslide_loop(slide, coords, size0)
    elif kind == "cucim":
        result = run_cucim(slide, coords, size0, 0)
    elif kind == "cucim-batched":
        result = run_cucim(slide, coords, size0, threads)
    elif kind == "decode":
        result = run_decode_bound(slide, coords)
    else:
        result = run_write(np.load(os.environ["BENCH_PATCHES"]), len(coords))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited through fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """Run ``cmd``; (stdout, wall seconds, CPU seconds of the child, user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(kind: str, slide: Path, threads: int, env: dict) -> dict:
    out, _, cpu = timed([sys.executable, __file__, "--child", kind, "--slide", str(slide), "--threads", str(threads)], env)
    result = json.loads(out.strip().splitlines()[-1])
    result["patches_per_s"] = result["patches"] / result["seconds"]
    if "stream_seconds" in result:
        result["stream_patches_per_s"] = result["patches"] / result["stream_seconds"]
    result["patches_per_cpu_s"] = result["patches"] / result["cpu_seconds"]
    result["process_cpu_s"] = cpu
    return result


def measure_cli(slide: Path, n: int, env: dict, options: Sequence[str] = ()) -> dict:
    """``pathomics tile --threads 1 [OPTIONS]`` as a user runs it, timed from the shell: interpreter start-up included.

    The default resolution and patch size are this benchmark's (0.5 µm/px, 256 px), so no option names them."""
    out = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    try:
        _, wall, cpu = timed([sys.executable, "-m", "pathomics.cli.main", "tile", str(slide), "--out", str(out), "--threads", "1",
                              *options], env)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"patches": n, "seconds": wall, "process_cpu_s": cpu, "patches_per_s": n / wall, "patches_per_cpu_s": n / cpu}


def measure_imports(env: dict) -> dict:
    """Interpreter start-up alone, and with the imports tiling needs (wall seconds of each process)."""
    _, bare, _ = timed([sys.executable, "-c", "pass"], env)
    _, loaded, _ = timed([sys.executable, "-c", IMPORTS], env)
    return {"interpreter_s": bare, "interpreter_and_imports_s": loaded}


def cucim_available() -> str | None:
    """None if cuCIM's CPU reader runs here, else why not."""
    try:
        subprocess.run([sys.executable, "-c", "from cucim import CuImage"], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cuCIM not usable here ({exc}); pip install cucim-cu13"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each measurement; medians reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="'all cores'")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, help="default: results/tiling.json (results/tiling_shell.json with --shell)")
    parser.add_argument("--child", choices=("pathomics", "pathomics-lean", "startup", "openslide", "tiffslide", "cucim", "cucim-batched", "decode", "write"))
    parser.add_argument("--slide", type=Path)
    parser.add_argument("--shell", nargs="+", metavar="LABEL=PATH[::OPTIONS]",
                        help="only the shell figure: `pathomics tile --threads 1` (start-up included) from each pathomics source "
                             "tree, with extra tile OPTIONS after '::', against the OpenSlide loop, interleaved; JSON to "
                             "results/tiling_shell.json")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.slide, args.threads)
        return
    results = Path(__file__).parent / "results"
    if args.shell:
        args.json = args.json or results / "tiling_shell.json"
        shell_figure(args, dict(item.split("=", 1) for item in args.shell))
        return
    args.json = args.json or results / "tiling.json"

    big = make_slide(args.cache, args.width, args.height)
    small_w, small_h = round(args.width / 10**0.5), round(args.height / 10**0.5)
    small = make_slide(args.cache, small_w, small_h)
    env = {"BENCH_COORDS": str(args.cache / "coords.npy")}
    first = measure("pathomics", big, 1, env)  # writes the coordinates every other reader uses
    env["BENCH_SIZE0"] = str(first["patch_size_level0"])
    sys.path.insert(0, str(Path(__file__).parent))
    from store_write import real_patches

    env["BENCH_PATCHES"] = str(args.cache / "patches_1024.npy")
    real_patches(args.cache, 1024)
    no_cucim = cucim_available()
    kinds = [("pathomics", 1), ("pathomics", args.threads), ("pathomics-lean", 1), ("pathomics-lean", args.threads), ("openslide", 1), ("tiffslide", 1), ("decode", 1), ("write", 1),
             ("startup", 1)]
    if no_cucim is None:
        kinds += [("cucim", 1), ("cucim-batched", args.threads)]
    runs: dict[str, list[dict]] = {f"{k}@{t}": [] for k, t in kinds}
    runs["cli@1"], runs["imports"] = [], []
    for _ in range(args.repeats):  # interleaved: each repeat runs every measurement once
        for kind, threads in kinds:
            runs[f"{kind}@{threads}"].append(measure(kind, big, threads, env))
        runs["cli@1"].append(measure_cli(big, first["patches"], env))
        runs["imports"].append(measure_imports(env))
    small_run = measure("pathomics", small, 1, {**env, "BENCH_COORDS": str(args.cache / "coords_small.npy")})

    def med(key: str, field: str = "patches_per_s") -> float:
        return statistics.median(r[field] for r in runs[key])

    def rates(field: str) -> dict:
        """Patches per second of each reader (``field``: per wall second, or per CPU second of all its threads)."""
        names = {"pathomics_1_thread": "pathomics@1", "pathomics_all_cores": f"pathomics@{args.threads}",
                 "pathomics_lean_1_thread": "pathomics-lean@1", "pathomics_lean_all_cores": f"pathomics-lean@{args.threads}",
                 "pathomics_cli_threads_1_with_startup": "cli@1", "openslide_loop": "openslide@1", "tiffslide_loop": "tiffslide@1",
                 "cucim_per_patch": "cucim@1", "cucim_batched_all_cores": f"cucim-batched@{args.threads}",
                 "decode_bound_one_core": "decode@1", "write_alone_one_thread": "write@1"}
        return {name: med(key, field) if runs.get(key) else None for name, key in names.items()}

    def stream_rates() -> dict:
        """Patches per second of the streaming phase (decode, resample, QC, write) of the same runs."""
        return {f"{kind.replace('-', '_')}_{'1_thread' if t == 1 else 'all_cores'}": med(f"{kind}@{t}", "stream_patches_per_s")
                for kind in ("pathomics", "pathomics-lean") for t in (1, args.threads)}

    def ratios(r: dict) -> dict:
        cucim = no_cucim is None
        return {"1_thread_over_openslide": r["pathomics_1_thread"] / r["openslide_loop"],
                "cli_1_thread_over_openslide": r["pathomics_cli_threads_1_with_startup"] / r["openslide_loop"],
                "1_thread_over_decode_bound": r["pathomics_1_thread"] / r["decode_bound_one_core"],
                "all_cores_over_1_thread": r["pathomics_all_cores"] / r["pathomics_1_thread"],
                "1_thread_over_cucim_per_patch": r["pathomics_1_thread"] / r["cucim_per_patch"] if cucim else None,
                "all_cores_over_cucim_batched": r["pathomics_all_cores"] / r["cucim_batched_all_cores"] if cucim else None,
                "lean_1_thread_over_openslide": r["pathomics_lean_1_thread"] / r["openslide_loop"],
                "lean_1_thread_over_decode_bound": r["pathomics_lean_1_thread"] / r["decode_bound_one_core"],
                "lean_1_thread_over_cucim_per_patch": r["pathomics_lean_1_thread"] / r["cucim_per_patch"] if cucim else None,
                "lean_all_cores_over_cucim_batched": r["pathomics_lean_all_cores"] / r["cucim_batched_all_cores"] if cucim else None,
                "write_share_of_tiling_time": r["pathomics_1_thread"] / r["write_alone_one_thread"]}

    def stream_over_cucim(stream: dict, wall: dict) -> dict | None:
        """The streaming phase (coordinates in, scored and compressed patches stored: the peers' task and more) over cuCIM."""
        if no_cucim is not None:
            return None
        return {"1_thread_over_cucim_per_patch": stream["pathomics_1_thread"] / wall["cucim_per_patch"],
                "all_cores_over_cucim_batched": stream["pathomics_all_cores"] / wall["cucim_batched_all_cores"]}

    def cpu_ceiling(cpu: dict, wall: dict, cores: int) -> dict:
        """The most a run's CPU work allows with every core busy (cores x patches per CPU second), over the decode bound."""
        return {name: cores * cpu[name] / wall["decode_bound_one_core"]
                for name in ("pathomics_1_thread", "pathomics_all_cores", "pathomics_lean_1_thread", "pathomics_lean_all_cores")}

    wall, cpu, stream = rates("patches_per_s"), rates("patches_per_cpu_s"), stream_rates()
    rss_big = max(r["peak_rss_mb"] for r in runs["pathomics@1"])
    startup = {"interpreter_s": med("imports", "interpreter_s"), "interpreter_and_imports_s": med("imports", "interpreter_and_imports_s"),
               "tissue_detection_s": med("startup@1", "tissue_s"), "tissue_detection_cpu_s": med("startup@1", "tissue_cpu_s"),
               "grid_planning_s": med("startup@1", "grid_s"), "grid_planning_cpu_s": med("startup@1", "grid_cpu_s"),
               "cli_total_s": med("cli@1", "seconds"), "cli_total_cpu_s": med("cli@1", "process_cpu_s")}
    result = {
        "slide": {"width": args.width, "height": args.height, "mpp": 0.25, "target_mpp": TARGET_MPP, "patch_size": PATCH,
                  "patches": first["patches"], "patch_size_level0": first["patch_size_level0"], "read_level": first["read_level"],
                  "tiles_decoded": runs["decode@1"][0]["tiles"], "decode_scale": runs["decode@1"][0]["scale"]},
        "threads_all_cores": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "patches_per_s": wall, "ratios": ratios(wall),
        "patches_per_cpu_s": cpu, "ratios_cpu": ratios(cpu),
        "stream_phase_patches_per_s": stream,
        "stream_phase_over_decode_bound": {k: v / wall["decode_bound_one_core"] for k, v in stream.items() if k.endswith("1_thread")},
        "stream_phase_over_cucim": stream_over_cucim(stream, wall),
        "cpu_ceiling_over_decode_bound": cpu_ceiling(cpu, wall, os.cpu_count() or 1),
        "startup": startup, "bytes_per_patch": first["bytes_per_patch"], "compression": first["compression"],
        "peak_rss_mb_big": rss_big, "peak_rss_mb_small": small_run["peak_rss_mb"], "peak_rss_ratio": rss_big / small_run["peak_rss_mb"],
        "small_slide": {"width": small_w, "height": small_h, "patches": small_run["patches"]},
        "cucim": no_cucim or "cucim CPU reader (cucim-cu13), no GPU used",
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"Tiling benchmark: {args.width}x{args.height} px at 0.25 µm/px -> {TARGET_MPP} µm/px x {PATCH} px, {first['patches']:,} "
          f"patches, tiles decoded at 1/{result['slide']['decode_scale']}, {args.threads} threads = all cores, median of {args.repeats}")
    print(f"  {'patches per second of wall time / of CPU time (all threads)':<58}")
    for name in wall:
        print(f"  {name:<42} " + ("skipped: " + no_cucim if wall[name] is None else f"{wall[name]:>9,.0f} {cpu[name]:>9,.0f}"))
    for name, value in ratios(wall).items():
        print(f"  {name:<42} " + ("-" if value is None else f"{value:>9.2f} {ratios(cpu)[name]:>9.2f}"))
    print("  streaming phase alone (wall; after tissue detection and grid planning, before the QC summary):")
    for name, value in stream.items():
        bound = f", {value / wall['decode_bound_one_core']:.2f} of the decode bound" if name.endswith("1_thread") else ""
        print(f"  {name:<42} {value:>9,.0f}{bound}")
    for name, value in (result["stream_phase_over_cucim"] or {}).items():
        print(f"  streaming {name:<32} {value:>9.2f}")
    print(f"  CPU ceiling over the decode bound (all {os.cpu_count()} cores busy with each run's CPU work):")
    for name, value in result["cpu_ceiling_over_decode_bound"].items():
        print(f"  {name:<42} {value:>9.2f}")
    print(f"  start-up: interpreter {startup['interpreter_s']:.2f} s, + imports {startup['interpreter_and_imports_s']:.2f} s, "
          f"tissue detection {startup['tissue_detection_s']:.2f} s ({startup['tissue_detection_cpu_s']:.2f} CPU), grid planning "
          f"{startup['grid_planning_s']:.2f} s ({startup['grid_planning_cpu_s']:.2f} CPU); CLI total {startup['cli_total_s']:.2f} s "
          f"({startup['cli_total_cpu_s']:.2f} CPU)")
    print(f"  bytes per patch {result['bytes_per_patch']:,.0f} ({result['compression']}); peak RSS {rss_big:,.0f} MB vs "
          f"{small_run['peak_rss_mb']:,.0f} MB on {small_w}x{small_h} (ratio {result['peak_rss_ratio']:.2f}); "
          f"load average {result['load_average_at_end'][0]:.1f} on {os.cpu_count()} cores")
    print(f"JSON: {args.json}")


def shell_figure(args: argparse.Namespace, codes: dict[str, str]) -> None:
    """`pathomics tile --threads 1` from the shell with each source tree in ``codes``, over the OpenSlide loop, interleaved.

    A tree given as ``PATH::OPTIONS`` runs with those extra tile options (e.g. ``.::--no-qc --compression none``)."""
    big = make_slide(args.cache, args.width, args.height)
    env = {"BENCH_COORDS": str(args.cache / "coords.npy")}
    first = measure("pathomics", big, 1, env)
    env["BENCH_SIZE0"] = str(first["patch_size_level0"])
    runs: dict[str, list[dict]] = {"openslide": [], **{label: [] for label in codes}}
    for _ in range(args.repeats):
        runs["openslide"].append(measure("openslide", big, 1, env))
        for label, code in codes.items():
            path, _, options = code.partition("::")
            runs[label].append(measure_cli(big, first["patches"], {**env, "PYTHONPATH": path}, options.split()))
    seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["process_cpu_s"] for r in rs) for name, rs in runs.items()}  # steadier on a loaded machine
    result = {"slide": {"width": args.width, "height": args.height, "patches": first["patches"]}, "repeats": args.repeats,
              "code": codes, "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "median_seconds": seconds,
              "median_cpu_seconds": cpu, "cli_over_openslide": {label: seconds["openslide"] / seconds[label] for label in codes},
              "cli_over_openslide_cpu": {label: cpu["openslide"] / cpu[label] for label in codes}, "runs": runs}
    path = args.json
    path.write_text(json.dumps(result, indent=2))
    print(f"Shell figure, {args.width}x{args.height}, {first['patches']:,} patches, median of {args.repeats} interleaved runs "
          f"(load average {os.getloadavg()[0]:.1f}):")
    print(f"  OpenSlide loop {seconds['openslide']:.2f} s ({cpu['openslide']:.2f} CPU s)")
    for label in codes:
        print(f"  pathomics tile --threads 1 ({label}): {seconds[label]:.2f} s ({cpu[label]:.2f} CPU s), "
              f"{result['cli_over_openslide'][label]:.2f}x the loop ({result['cli_over_openslide_cpu'][label]:.2f}x in CPU time)")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
