"""`pathomics demo`: a synthetic slide, tiled end to end (nothing to download)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="generate a synthetic slide and run the pipeline on it")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--size", type=int, nargs=2, default=(24000, 18000), metavar=("W", "H"), help="slide size in level-0 pixels")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics.batch import SlideJob, exit_code, run_jobs, summarize
    from pathomics.store import open_patch_store
    from pathomics.synthetic import write_slide
    from pathomics.tiling import TileConfig, tile_slide

    slide = args.out / "slides" / "demo-slide-1.svs"
    if not slide.exists():
        slide.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing synthetic slide {slide} ({args.size[0]}x{args.size[1]} px at 0.25 µm/px)")
        write_slide(slide, *args.size, mpp=0.25, layout="pieces")
    rows = run_jobs("tile", [SlideJob(slide.stem, lambda: tile_slide(slide, args.out, TileConfig(target_mpp=0.5)).state)], args.out)
    print(summarize("tile", rows))
    store = open_patch_store(args.out / "tiles" / f"{slide.stem}.zarr")
    print(f"patch store {store.path}: {len(store)} patches of {store.patch_size} px at {store.attrs['target_mpp']} µm/px; "
          f"thumbnail with tissue outline and grid: {store.path.with_name(slide.stem + '.thumb.png')}")
    return exit_code(rows)
