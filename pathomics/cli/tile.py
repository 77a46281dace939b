"""`pathomics tile`: slides → patch stores under <out>/tiles."""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import (Names, add_slide_arguments, config_options, config_values, registry, slide_entries,
                                  writable_dir)

TILE_CONFIG = "pathomics.tiling.TileConfig"
BACKENDS = Names(lambda: ("auto", *registry("pathomics.slide", "BACKENDS")))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tile", help="find tissue and write patch stores at a target MPP",
                                   description="Tile slides into Zarr v3 patch stores at an exact physical resolution.")
    add_slide_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory (stores go to OUT/tiles)")
    add_tile_options(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="auto", metavar="NAME",
                        help="slide reader: %(choices)s; auto tries OpenSlide first, then tiffslide (wsidicom for DICOM)")
    parser.add_argument("--slides-at-once", type=int, metavar="N",
                        help="slides tiled at the same time, sharing the cores (default: 2, 1 on a one-core machine): "
                             "one slide's serial steps leave cores the other's decoding uses")
    parser.set_defaults(run=run)


def add_tile_options(parser: argparse.ArgumentParser) -> None:
    """The tiling parameters, shared with `pathomics run`."""
    resolution = parser.add_mutually_exclusive_group()
    config_options(resolution, TILE_CONFIG)(
        "--mpp", dest="target_mpp", type=float,
        help="target microns per pixel; in `run`, a foundation preset's training MPP unless given")
    resolution.add_argument("--magnification", type=float,
                            help="target magnification, converted as 10/mag µm/px (20 → 0.5; default: use --mpp)")
    option = config_options(parser, TILE_CONFIG)
    option("--patch-size", type=int,
           help="patch side in pixels at the target MPP; in `run`, a foundation preset's unless given")
    option("--overlap", type=int, help="overlap between neighbouring patches, pixels at the target MPP")
    option("--min-tissue", type=float, help="keep patches at least this fraction tissue")
    option("--no-pixels", dest="with_pixels", action="store_false", default=None,
           help="write coords-only stores (the embedder reads the slide)")
    parser.add_argument("--tissue-dir", type=Path, help="folder of <slide_id>.geojson tissue annotations to use "
                                                        "instead of detection (default: detect tissue)")
    parser.add_argument("--no-qc", action="store_true", help="skip the per-patch quality scores (OUT/qc/, qc_summary.csv)")
    parser.add_argument("--qc-settings", metavar="NAME=VALUE,...",
                        help="QC thresholds other than the defaults, e.g. max_pen=0.2,min_focus=1.0 (see pathomics.qc.QCConfig)")
    option("--resample", choices=registry("pathomics.tiling", "RESAMPLE"), metavar="MODE",
           help="%(choices)s; fast: decode JPEG tiles at 1/2, 1/4 or 1/8 scale where the patch shrinks that much; "
                "exact: full decode + area resize, pixels identical to OpenSlide's")
    option("--compression", choices=registry("pathomics.tiling", "COMPRESSIONS"), metavar="CODEC",
           help="patch store compression: %(choices)s (zstd at level 1: about 54 kB a 256-px patch)")
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads per slide (default: the cores shared among the slides at once; in `run`: "
                             "cores / workers, for torch too)")


def tile_config(args: argparse.Namespace):  # noqa: ANN201 - TileConfig, imported lazily
    """The TileConfig the tiling options describe (magnification converted to MPP here, at the edge); with an
    encoder named (`run`), a foundation preset's training MPP and patch size unless given."""
    import dataclasses

    from pathomics.qc import QCConfig
    from pathomics.slide import magnification_to_mpp
    from pathomics.tiling import TileConfig

    target = magnification_to_mpp(args.magnification) if args.magnification is not None else None
    values = config_values(TileConfig, args, target_mpp=target)
    model = getattr(args, "model", None)
    if model is None:  # `tile` names no encoder: do not pay for importing torch
        config = TileConfig(**values)
    else:
        from pathomics.runner.pipeline import encoder_tile_config

        config = encoder_tile_config(model, **values)
    if args.no_qc:
        return dataclasses.replace(config, qc=None)
    return dataclasses.replace(config, qc=QCConfig.parse(args.qc_settings)) if args.qc_settings else config


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from pathomics.batch import SlideJob, exit_code, run_jobs, summarize
    from pathomics.layout import tissue_annotation
    from pathomics.manifest import SlideEntry
    from pathomics.runner.jobs import tile_job
    from pathomics.tiling import batch_parallelism

    entries = slide_entries(args)
    at_once, threads = batch_parallelism(args.slides_at_once, args.threads, len(entries))
    config = dataclasses.replace(tile_config(args), threads=threads)
    out = writable_dir(args.out)

    def job(entry: SlideEntry) -> SlideJob:
        geojson = tissue_annotation(args.tissue_dir, entry.slide_id) if args.tissue_dir and not entry.tissue_geojson else None
        return tile_job(entry, out, config, tissue_geojson=geojson, backend=args.backend)

    rows = run_jobs("tile", [job(e) for e in entries], out, at_once=at_once)
    print(summarize("tile", rows))
    return exit_code(rows)
