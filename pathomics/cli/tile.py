"""`pathomics tile`: slides → patch stores under <out>/tiles."""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import add_slide_arguments, config_from_args, slide_entries, writable_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tile", help="find tissue and write patch stores at a target MPP",
                                   description="Tile slides into Zarr v3 patch stores at an exact physical resolution.")
    add_slide_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory (stores go to OUT/tiles)")
    add_tile_options(parser)
    parser.add_argument("--backend", choices=("auto", "openslide", "tiffslide", "wsidicom"), default="auto")
    parser.set_defaults(run=run)


def add_tile_options(parser: argparse.ArgumentParser) -> None:
    """The tiling parameters, shared with `pathomics run`."""
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument("--mpp", dest="target_mpp", type=float,
                            help="target microns per pixel (default 0.5; in `run`, the --model preset's training MPP)")
    resolution.add_argument("--magnification", type=float, help="target magnification, converted as 10/mag µm/px (20 → 0.5)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch side in pixels at the target MPP (default 256; in `run`, the --model preset's)")
    parser.add_argument("--overlap", type=int, default=0, help="overlap between neighbouring patches, pixels at the target MPP")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="keep patches at least this fraction tissue")
    parser.add_argument("--no-pixels", dest="with_pixels", action="store_false", default=None,
                        help="write coords-only stores (the embedder reads the slide)")
    parser.add_argument("--tissue-dir", type=Path, help="folder of <slide_id>.geojson tissue annotations to use instead of detection")
    parser.add_argument("--no-qc", action="store_true", help="skip the per-patch quality scores (OUT/qc/, qc_summary.csv)")
    parser.add_argument("--qc-settings", metavar="NAME=VALUE,...",
                        help="QC thresholds other than the defaults, e.g. max_pen=0.2,min_focus=1.0 (see pathomics.qc.QCConfig)")
    parser.add_argument("--resample", choices=("fast", "exact"),
                        help="fast (default): decode JPEG tiles at 1/2, 1/4 or 1/8 scale where the patch shrinks that much; "
                             "exact: full decode + area resize, pixels identical to OpenSlide's")
    parser.add_argument("--compression", choices=("zstd", "lz4", "none"),
                        help="patch store compression: zstd level 1 (default, about 54 kB a 256-px patch), lz4, none")
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads per slide (default: all cores; in `run`: cores / workers, for torch too)")


def tile_config(args: argparse.Namespace):  # noqa: ANN201 - TileConfig, imported lazily
    """The TileConfig the tiling options describe (magnification converted to MPP here, at the edge)."""
    import dataclasses

    from pathomics.qc import QCConfig
    from pathomics.slide import magnification_to_mpp
    from pathomics.tiling import TileConfig

    target = magnification_to_mpp(args.magnification) if args.magnification is not None else None
    mpp, patch_size = preset_resolution(getattr(args, "model", None))
    if target is None and args.target_mpp is None:
        target = mpp
    config = config_from_args(TileConfig, args, target_mpp=target,
                              patch_size=patch_size if args.patch_size is None else None)
    if args.no_qc:
        return dataclasses.replace(config, qc=None)
    return dataclasses.replace(config, qc=QCConfig.parse(args.qc_settings)) if args.qc_settings else config


def preset_resolution(model: str | None) -> tuple[float | None, int | None]:
    """The MPP and patch size a foundation preset was trained at (None, None for other models: the defaults)."""
    if model is None:  # `tile` has no model: do not pay for importing torch
        return None, None
    from pathomics.encoders.foundation import PRESETS

    recipe = PRESETS.get(model or "")
    return (recipe.mpp, recipe.patch_size) if recipe else (None, None)


def run(args: argparse.Namespace) -> int:
    from pathomics.layout import tissue_annotation
    from pathomics.manifest import SlideEntry
    from pathomics.batch import SlideJob, exit_code, run_jobs, summarize
    from pathomics.runner.jobs import tile_job

    entries = slide_entries(args)
    config = tile_config(args)
    out = writable_dir(args.out)

    def job(entry: SlideEntry) -> SlideJob:
        geojson = tissue_annotation(args.tissue_dir, entry.slide_id) if args.tissue_dir and not entry.tissue_geojson else None
        return tile_job(entry, out, config, tissue_geojson=geojson, backend=args.backend)

    rows = run_jobs("tile", [job(e) for e in entries], out)
    print(summarize("tile", rows))
    return exit_code(rows)
