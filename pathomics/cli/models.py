"""`pathomics models`: every encoder preset and family, with where its weights were found on this machine."""

from __future__ import annotations

import argparse

COLUMNS = ("model", "dim", "input", "mpp", "patch", "licence", "weights")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list encoder presets and families, and where their weights are",
                                   description="Encoder presets (with their model cards' dimension, input size, "
                                               "training resolution and licence) and families. Weights are looked "
                                               "up offline, never downloaded.")
    parser.set_defaults(run=run)


def model_rows() -> list[dict[str, str]]:
    """One row per registered backbone and foundation preset, as strings."""
    from pathomics.encoders.backbones import get_backbone_config, hub_checkpoint, registered_backbones
    from pathomics.encoders.foundation import foundation_table

    rows = []
    for name in registered_backbones():
        spec = get_backbone_config(name)
        cached = hub_checkpoint(spec.weights_file)
        rows.append({"model": name, "dim": spec.embedding_dim, "input": spec.input_size, "mpp": "-", "patch": "-",
                     "licence": "torchvision weights (ImageNet)", "weights": cached if cached.is_file() else "not found"})
    rows += foundation_table()
    return [{k: "-" if row.get(k) is None else str(row[k]) for k in COLUMNS} for row in rows]


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows as a left-aligned text table under a header."""
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in COLUMNS}
    lines = ["  ".join(k.ljust(widths[k]) for k in COLUMNS).rstrip()]
    lines += ["  ".join(r[k].ljust(widths[k]) for k in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathomics.encoders.backbones import FAMILIES
    from pathomics.encoders.weights import WEIGHTS_ENV, hf_home

    print(format_table(model_rows()))
    print("\nfamilies:")
    for name, what in FAMILIES:
        print(f"  {name:<20} {what}")
    print(f"\nweights are looked up in: --weights PATH, ${WEIGHTS_ENV}/<model>/, {hf_home() / 'hub'}/models--ORG--NAME/"
          "snapshots/*/ (nothing is downloaded). Presets marked gated or non-commercial may only be used under "
          "their licences.")
    return 0
