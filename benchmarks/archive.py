"""Archive throughput: slides per hour of a biopsy archive and of a resection archive, with each slide's fixed costs.

Two synthetic archives of 0.5 µm/px Aperio-style slides, tiled at 0.5 µm/px x 256 px (the default):
biopsies of about 150 tissue patches and resections of about 8,000. Each archive is processed from
scratch, in a fresh process as `pathomics tile` processes it (the batch loop with its status rows and
locks, start-up included), tile only and tile + embed (shufflenet-v2 and resnet50-trunc on the CPU,
RANDOM weights: throughput only). Beside them, on the same slides and patches: a plain per-slide
OpenSlide loop (``read_region`` of each patch pathomics kept + JPEG q90 to a file), and LazySlide's
tiling (tissue, tiles, every tile read into memory) when its environment exists (``--lazyslide-python``).

Each tiling slide's time is split into its stages (wrapped around the library's functions): open, tissue
detection, grid, store creation (and publish), patch work (decode, QC scores, compress, write),
QC summary and thumbnail, status, other; start-up is what the first slide costs beyond the others
(imports paid once) plus the process's own start. Fixed cost = a slide's time less its patch work.

The full archives (200 biopsies, 20 resections) take hours on 2 shared cores; the default is scaled down
(see --biopsies/--resections, --full) and the JSON says which ran. A few distinct slides are generated
(cached) and copied under each slide's own name.

    python benchmarks/archive.py [--full | --biopsies 40 --resections 2] [--embed-biopsies 4 --embed-resections 1]
        [--models shufflenet-v2 resnet50-trunc] [--lazyslide-python /tmp/lazyslide-venv/bin/python] [--json PATH]
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

TARGET_MPP, PATCH, SLIDE_MPP = 0.5, 256, 0.5
BIOPSY_SIZE = (6500, 4900)      # blob, pieces and ring layouts: 110-200 tissue patches, about 150 on average
RESECTION_SIZE = (32000, 24000)  # one ellipse over 68% of the slide: about 7,900 patches
DISTINCT = {"biopsy": 6, "resection": 1}  # slides generated; the archive copies them under its slides' names
# (label, module, attribute): the tiling stages timed per slide; the attribute is replaced by a timing wrapper
STAGES = (("open slide", "pathomics.tiling", "open_slide"), ("tissue detection", "pathomics.tiling", "detect_tissue"),
          ("grid", "pathomics.tiling", "plan_grid"), ("store creation", "pathomics.tiling", "PatchStoreWriter"),
          ("patch work", "pathomics.tiling", "_stream_patches"), ("QC summary and thumbnail", "pathomics.tiling", "update_slide_qc"),
          ("status", "pathomics.batch", "update_status"))


def make_archive(cache: Path, kind: str, n: int) -> list[Path]:
    """``n`` slides of ``kind`` (biopsy or resection): the distinct ones generated once, then copied under new names."""
    from pathomics.synthetic import write_slide
    from pathomics.synthetic.slides import Ellipse

    cache.mkdir(parents=True, exist_ok=True)
    width, height = BIOPSY_SIZE if kind == "biopsy" else RESECTION_SIZE
    sources = []
    for i in range(DISTINCT[kind]):
        path = cache / f"{kind}_source_{i}.svs"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.partial.svs")
            shapes = (Ellipse(0.5 * width, 0.5 * height, 0.47 * width, 0.46 * height, 5),) if kind == "resection" else None
            write_slide(tmp, width, height, mpp=SLIDE_MPP, layout=("blob", "pieces", "ring")[i % 3], shapes=shapes, seed=200 + i)
            os.replace(tmp, path)
        sources.append(path)
    folder = cache / f"{kind}_archive"
    folder.mkdir(exist_ok=True)
    slides = []
    for i in range(n):
        path = folder / f"{kind}_{i:03d}.svs"
        if not path.exists():
            shutil.copyfile(sources[i % len(sources)], path)
        slides.append(path)
    return slides


def timed_stages(seconds: dict[str, list[float]]) -> None:
    """Replace each stage's function by a wrapper adding its wall seconds to ``seconds[label]`` (one entry per slide)."""
    import importlib

    for label, module_name, attribute in STAGES:
        module = importlib.import_module(module_name)
        original = getattr(module, attribute)

        def wrapper(*args: object, _original=original, _label=label, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label].append(time.perf_counter() - start)

        setattr(module, attribute, wrapper)


def child_tile(slides: list[Path], out: Path, model: str | None, started: float, slides_at_once: int | None) -> dict:
    """Tile ``slides`` as `pathomics tile` does (then embed them as `pathomics embed` does, if ``model``), timing each
    stage: ``slides_at_once`` at a time, the cores shared among them (default: `pathomics tile`'s; a source tree from
    before that choice tiles one slide at a time with all cores)."""
    entered = time.time()
    import pathomics.tiling
    from pathomics.batch import run_jobs
    from pathomics.manifest import SlideEntry
    from pathomics.runner.jobs import tile_job
    from pathomics.tiling import TileConfig
    import pathomics.runner.jobs as jobs

    parallelism = getattr(pathomics.tiling, "batch_parallelism", None)
    at_once, threads = parallelism(slides_at_once, slides=len(slides)) if parallelism else (1, os.cpu_count() or 1)

    stages: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}
    timed_stages(stages)
    per_slide: list[float] = []
    tile_slide = jobs.tile_slide

    def timed_tile(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return tile_slide(*args, **kwargs)
        finally:
            per_slide.append(time.perf_counter() - start)

    jobs.tile_slide = timed_tile
    config = TileConfig(target_mpp=TARGET_MPP, patch_size=PATCH, threads=threads)
    imports = time.time() - entered
    start = time.perf_counter()
    batch = [tile_job(SlideEntry(p, p.stem, p.stem), out, config) for p in slides]
    rows = run_jobs("tile", batch, out, show_progress=False, **({"at_once": at_once} if at_once > 1 else {}))
    tile_s = time.perf_counter() - start
    if any(r.state != "done" for r in rows):
        raise SystemExit(f"tiling failed: {[r for r in rows if r.state != 'done']}")
    result = {"process_start_s": entered - started, "imports_s": imports, "tile_s": tile_s, "slide_s": per_slide, "at_once": at_once,
              "stages_s": stages, "patches": [r.patches for r in rows]}
    if model:
        from pathomics.batch import run_jobs as run_embed
        from pathomics.embed import EmbedConfig, config_backbone
        from pathomics.runner.jobs import embed_job

        start = time.perf_counter()
        embed = EmbedConfig(model=model, weights="random", device="cpu", precision="fp32")
        backbone = config_backbone(embed)
        result["model_build_s"] = time.perf_counter() - start
        stores = [out / "tiles" / f"{p.stem}.zarr" for p in slides]
        rows = run_embed("embed", [embed_job(s, out, embed, backbone) for s in stores], out, show_progress=False)
        result["embed_s"] = time.perf_counter() - start
        if any(r.state != "done" for r in rows):
            raise SystemExit(f"embedding failed: {[r for r in rows if r.state != 'done']}")
    return result


def child_openslide(slides: list[Path], coords_dir: Path, out: Path) -> dict:
    """Per slide: open it with OpenSlide, ``read_region`` each patch pathomics kept, encode it as JPEG q90 to a file."""
    import numpy as np
    import openslide
    from PIL import Image

    coords = {p: np.load(coords_dir / f"{p.stem}.npy") for p in slides}
    start = time.perf_counter()
    for path in slides:
        folder = out / path.stem
        folder.mkdir(parents=True)
        with openslide.OpenSlide(str(path)) as slide:
            for x, y in coords[path]:
                patch: Image.Image = slide.read_region((int(x), int(y)), 0, (PATCH, PATCH)).convert("RGB")
                patch.save(folder / f"{x}_{y}.jpg", quality=90)
    return {"seconds": time.perf_counter() - start, "patches": [len(coords[p]) for p in slides]}


def child_lazyslide(slides: list[Path]) -> dict:
    """Per slide, LazySlide's tiling: open, find tissue, tile at 0.5 µm/px x 256 px, read every tile into memory."""
    entered = time.time()
    import lazyslide as zs
    from wsidata import open_wsi

    imports = time.time() - entered
    start = time.perf_counter()
    patches = []
    for path in slides:
        wsi = open_wsi(str(path))
        zs.pp.find_tissues(wsi)
        zs.pp.tile_tissues(wsi, PATCH, mpp=TARGET_MPP)
        tiles = wsi["tiles"]
        spec = wsi.tile_spec("tiles")
        for geometry in tiles.geometry:
            x, y = int(geometry.bounds[0]), int(geometry.bounds[1])
            wsi.read_region(x, y, spec.ops_width, spec.ops_height, level=spec.ops_level)
        patches.append(len(tiles))
    return {"imports_s": imports, "seconds": time.perf_counter() - start, "patches": patches}


def spawn(argv: list[str], python: str = sys.executable, code: Path | None = None) -> tuple[dict, float]:
    """Run this script as a child (importing pathomics from ``code``, if given); its JSON result and wall seconds."""
    env = {**os.environ, "BENCH_STARTED": repr(time.time())}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    start = time.perf_counter()
    done = subprocess.run([python, __file__, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def tile_summary(result: dict, wall: float) -> dict:
    """Slides/hour, patches/s and the per-slide split of a tiling child: fixed costs against patch work.

    The split averages the slides after the first (the first also pays the imports a batch pays once);
    start-up is the process's time outside the slides plus what the first slide cost beyond the others. With
    slides tiled at once their times overlap: no split then, and start-up is the time outside the batch.
    """
    n, patches = len(result["slide_s"]), sum(result["patches"])
    if result.get("at_once", 1) > 1:
        return {"slides": n, "patches": patches, "patches_per_slide": patches / n, "seconds": wall, "at_once": result["at_once"],
                "slides_per_hour": n / wall * 3600, "patches_per_s": patches / wall,
                "startup_s": wall - result["tile_s"] - result.get("embed_s", 0.0), "per_slide_s": None}
    rest = slice(1, None) if n > 1 else slice(0, None)
    per_slide = result["slide_s"][rest]
    stages = {label: statistics.fmean(values[rest]) for label, values in result["stages_s"].items()}
    slide = statistics.fmean(per_slide)
    stages["other"] = slide - sum(v for k, v in stages.items() if k != "status")  # status is written outside tile_slide
    startup = wall - result["tile_s"] - result.get("embed_s", 0.0) + result["slide_s"][0] - slide
    return {"slides": n, "patches": patches, "patches_per_slide": patches / n, "seconds": wall,
            "slides_per_hour": n / wall * 3600, "patches_per_s": patches / wall, "startup_s": startup,
            "per_slide_s": {**stages, "fixed_in_batch": slide + stages["status"] - stages["patch work"],
                            "startup_shared_out": startup / n}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full archives: 200 biopsies and 20 resections")
    parser.add_argument("--biopsies", type=int, default=40)
    parser.add_argument("--resections", type=int, default=2)
    parser.add_argument("--embed-biopsies", type=int, default=4, help="slides of each archive embedded (tile + embed runs)")
    parser.add_argument("--embed-resections", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=["shufflenet-v2", "resnet50-trunc"])
    parser.add_argument("--no-resection-embed", nargs="*", default=["resnet50-trunc"],
                        help="models not run on the resection archive (8,000 patches of resnet50-trunc on 2 cores is 6 minutes a slide)")
    parser.add_argument("--lazyslide-python", help="python of an environment with lazyslide installed")
    parser.add_argument("--code", nargs="+", default=[f"after={Path(__file__).resolve().parent.parent}"], metavar="LABEL=PATH",
                        help="pathomics source trees to compare (e.g. before=/tmp/main-snapshot after=.), run alternately")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "archive.json")
    parser.add_argument("--child", choices=("tile", "openslide", "lazyslide"))
    parser.add_argument("--model")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--slides-at-once", type=int, help="(child) slides tiled at once (default: `pathomics tile`'s)")
    parser.add_argument("--coords", type=Path)
    parser.add_argument("slides", nargs="*", type=Path)
    args = parser.parse_args()
    if args.child == "tile":
        print(json.dumps(child_tile(args.slides, args.out, args.model, float(os.environ["BENCH_STARTED"]), args.slides_at_once)))
        return
    if args.child == "openslide":
        print(json.dumps(child_openslide(args.slides, args.coords, args.out)))
        return
    if args.child == "lazyslide":
        print(json.dumps(child_lazyslide(args.slides)))
        return
    if args.full:
        args.biopsies, args.resections, args.embed_biopsies, args.embed_resections = 200, 20, 200, 20
        args.no_resection_embed = []
    sizes = {"biopsy": args.biopsies, "resection": args.resections}
    embed_sizes = {"biopsy": min(args.embed_biopsies, args.biopsies), "resection": min(args.embed_resections, args.resections)}
    codes = dict(item.split("=", 1) for item in args.code)
    run: dict = {"full_size": args.full, "scaled_down": not args.full, "cpu_count": os.cpu_count(), "code": codes,
                 "load_average_start": os.getloadavg()[0], "tile": {"target_mpp": TARGET_MPP, "patch_size": PATCH, "slide_mpp": SLIDE_MPP},
                 "embed": {"weights": "RANDOM (throughput only)", "device": "cpu", "precision": "fp32"}, "archives": {}}
    slides = {kind: make_archive(args.cache, kind, n) for kind, n in sizes.items() if n}
    for kind, paths in slides.items():  # tiling first: the embedding runs take longest
        run["archives"][kind] = measure_tiling(kind, paths, codes, args.lazyslide_python)
        write_results(args.json, run)
    for kind, paths in slides.items():
        for model in args.models:
            if embed_sizes[kind] and not (kind == "resection" and model in args.no_resection_embed):
                run["archives"][kind].update(measure_embedding(paths[:embed_sizes[kind]], model, codes))
                write_results(args.json, run)
    for kind in slides:
        print_archive(kind, run["archives"][kind])
    if "biopsy" in slides and "resection" in slides:
        b, r = run["archives"]["biopsy"], run["archives"]["resection"]
        run["biopsy_over_resection_patches_per_s"] = {k: b[k]["patches_per_s"] / r[k]["patches_per_s"] for k in b
                                                      if k in r and "patches_per_s" in b[k] and "patches_per_s" in r[k]}
        print("biopsy / resection patches/s:", {k: round(v, 2) for k, v in run["biopsy_over_resection_patches_per_s"].items()})
    write_results(args.json, run)


def write_results(path: Path, run: dict) -> None:
    """The JSON so far (rewritten after every run, so that a long benchmark stopped early keeps what it measured)."""
    run["load_average_end"] = os.getloadavg()[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=2))
    print(f"JSON: {path}", flush=True)


def measure_tiling(kind: str, slides: list[Path], codes: dict[str, str], lazyslide_python: str | None) -> dict:
    """Tiling one archive: pathomics from each source tree, then the OpenSlide loop and LazySlide on the same slides."""
    import numpy as np

    from pathomics.store import open_patch_store

    n = len(slides)
    entry: dict = {}
    work = Path(tempfile.mkdtemp(prefix=f"bench-archive-{kind}-"))
    try:
        for label, code in codes.items():
            result, wall = spawn(["--child", "tile", "--out", str(work / label), *map(str, slides)], code=Path(code))
            entry[f"pathomics tile ({label})"] = tile_summary(result, wall)
        if result.get("at_once", 1) > 1:  # the last tree once more, one slide at a time: its split of fixed costs
            result, wall = spawn(["--child", "tile", "--slides-at-once", "1", "--out", str(work / "one"), *map(str, slides)],
                                 code=Path(code))
            entry[f"pathomics tile ({label}, one slide at a time)"] = tile_summary(result, wall)
        coords = work / "coords"  # the patches the other readers read: those pathomics kept
        coords.mkdir()
        for p in slides:
            np.save(coords / f"{p.stem}.npy", open_patch_store(work / label / "tiles" / f"{p.stem}.zarr").coords)
        loop, wall = spawn(["--child", "openslide", "--coords", str(coords), "--out", str(work / "openslide"), *map(str, slides)])
        entry["openslide loop"] = {"slides": n, "patches": sum(loop["patches"]), "seconds": wall,
                                   "slides_per_hour": n / wall * 3600, "patches_per_s": sum(loop["patches"]) / wall}
        if lazyslide_python:
            try:
                lazy, wall = spawn(["--child", "lazyslide", *map(str, slides)], python=lazyslide_python)
                entry["lazyslide tiling"] = {"slides": n, "patches": sum(lazy["patches"]), "seconds": wall, "imports_s": lazy["imports_s"],
                                             "slides_per_hour": n / wall * 3600, "patches_per_s": sum(lazy["patches"]) / wall}
            except RuntimeError as exc:
                entry["lazyslide tiling"] = {"error": str(exc)[-600:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{kind}: " + ", ".join(f"{k} {v.get('slides_per_hour', 0):,.0f} slides/h" for k, v in entry.items()), flush=True)
    return entry


def measure_embedding(slides: list[Path], model: str, codes: dict[str, str]) -> dict:
    """Tile + embed ``slides`` with ``model`` (random weights, CPU, fp32) from each source tree, in one process each."""
    entry = {}
    work = Path(tempfile.mkdtemp(prefix="bench-archive-embed-"))
    try:
        for label, code in codes.items():
            result, wall = spawn(["--child", "tile", "--model", model, "--out", str(work / label), *map(str, slides)], code=Path(code))
            summary = tile_summary(result, wall)
            summary.update(embed_s=result["embed_s"], model_build_s=result["model_build_s"], tile_s=result["tile_s"])
            entry[f"tile + embed {model} ({label})"] = summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry


def print_archive(kind: str, entry: dict) -> None:
    """The archive's slides/hour table and its tiling's per-slide split."""
    print(f"{kind} archive:")
    print(f"  {'run':<28} {'slides':>6} {'patches':>8} {'seconds':>8} {'slides/hour':>11} {'patches/s':>9}")
    for name, r in entry.items():
        if "error" in r:
            print(f"  {name:<28} failed: {r['error'][-200:]}")
            continue
        print(f"  {name:<28} {r['slides']:>6} {r['patches']:>8} {r['seconds']:>8.1f} {r['slides_per_hour']:>11.0f} {r['patches_per_s']:>9.0f}")
    for name, r in entry.items():
        if name.startswith("pathomics tile") and r["per_slide_s"]:
            print(f"  {name}, seconds a slide: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_slide_s"].items()))


if __name__ == "__main__":
    main()
