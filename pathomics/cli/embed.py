"""`pathomics embed`: patch stores → CLAM/TRIDENT feature files under <out>/features."""

from __future__ import annotations

import argparse
from pathlib import Path

from pathomics.cli.common import comma_list, config_from_args, config_options, registry, writable_dir
from pathomics.errors import PathomicsError
from pathomics.layout import OutputLayout
from pathomics.qc import FLAGS

EMBED_CONFIG = "pathomics.embed.EmbedConfig"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("embed", help="embed patch stores with a backbone into HDF5 feature files",
                                   description="Embed every patch of each store into OUT/features/<slide_id>.h5 "
                                               "(CLAM/TRIDENT layout). Up-to-date files are skipped.")
    parser.add_argument("stores", nargs="*", type=Path, metavar="STORES",
                        help="patch stores (<slide_id>.zarr); default: every store under OUT/tiles")
    parser.add_argument("--out", type=Path, required=True, help="output directory (features go to OUT/features)")
    add_embed_options(parser)
    parser.set_defaults(run=run)


def add_embed_options(parser: argparse._ActionsContainer) -> None:
    """The embedding options, shared with `pathomics run`."""
    option = config_options(parser, EMBED_CONFIG)
    encoder = option("--encoder", "--model", dest="model", metavar="NAME",
                     help="a backbone or foundation preset: %(names)s (see `pathomics models`); or %(families)s")
    # listed from the encoder registries when the help is shown (they import torch)
    encoder.names = registry("pathomics.encoders.backbones", "list_backbones")  # type: ignore[attr-defined]
    encoder.families = registry("pathomics.encoders.backbones", "family_patterns")  # type: ignore[attr-defined]
    parser.add_argument("--weights", help="weights file or folder, or 'random' for an untrained backbone (default: "
                                          "looked up offline: torch hub cache, $PATHOMICS_WEIGHTS/<model>/, Hugging Face cache)")
    option("--device", help="auto (a GPU if present), cpu, cuda or cuda:N")
    precision = option("--precision", help="%(names)s; auto: bf16/fp16 on GPU, bf16 on CPUs with native bf16, else fp32")
    precision.names = registry("pathomics.device", "PRECISIONS")  # type: ignore[attr-defined]
    option("--batch-size", type=int, help="patches per batch")
    parser.add_argument("--num-workers", type=int, help="background reader processes (default: one per core, up to 8, feeding a GPU; "
                        "none on a CPU, where the model's threads use every core)")
    parser.add_argument("--input-size", type=int, help="resize patches to this side (default: the backbone's own)")
    option("--decoder", choices=registry("pathomics.embed", "DECODERS"), metavar="NAME",
           help="who decodes a coords-only store's patches, %(choices)s: auto (nvImageCodec on a GPU where installed and the "
                "slide has JPEG TIFF tiles, else the CPU workers)")
    option("--qc-exclude", metavar="FLAGS", type=comma_list,
           help=f"leave out patches with these QC flags, comma-separated: {', '.join(FLAGS)} (needs the QC tables "
                "tiling wrote)")


def embed_config(args: argparse.Namespace):  # noqa: ANN201 - EmbedConfig, imported lazily
    """The EmbedConfig the embedding options describe (unset options keep its defaults)."""
    from pathomics.embed import EmbedConfig

    return config_from_args(EmbedConfig, args)


def run(args: argparse.Namespace) -> int:
    from pathomics.device import resolve_device, resolve_precision
    from pathomics.embed import config_backbone
    from pathomics.batch import exit_code, run_jobs, summarize
    from pathomics.runner.jobs import embed_job

    config = embed_config(args)
    out = writable_dir(args.out)
    stores = args.stores or discover_stores(out)
    if not stores:
        raise PathomicsError(f"no patch stores under {out / 'tiles'}; run `pathomics tile` first or name the stores")
    backbone = config_backbone(config)
    device = resolve_device(config.device)
    held = f", held in {backbone.recipe['weights_dtype']}" if backbone.recipe else ""
    print(f"embedding {len(stores)} store(s) with {backbone.name} ({backbone.embedding_dim}-d, weights: {backbone.weights}"
          f"{held}) on {device} at {resolve_precision(config.precision, device)}")
    rows = run_jobs("embed", [embed_job(s, out, config, backbone) for s in stores], out)
    print(summarize("embed", rows))
    return exit_code(rows)


def discover_stores(out: Path) -> list[Path]:
    """Every store under OUT/tiles, including ones an interrupted tiling left partial (they fail, named)."""
    layout = OutputLayout(out)
    return [layout.store(slide_id) for slide_id in layout.store_ids()]
