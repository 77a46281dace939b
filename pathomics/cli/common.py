"""Arguments and checks shared by the batch verbs."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pathomics.errors import InputError, PathomicsError

C = TypeVar("C")


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """SLIDES... | --manifest CSV, and --slide-mpp for slides whose metadata lacks it."""
    parser.add_argument("slides", nargs="*", metavar="SLIDES", help="slide files or folders of slides")
    parser.add_argument("--manifest", type=Path, help="CSV with slide_path and optional slide_id, patient_id, mpp, tissue_geojson")
    parser.add_argument("--slide-mpp", type=float, help="level-0 microns per pixel for slides (overrides their metadata)")


def slide_entries(args: argparse.Namespace) -> list:
    """The slides named on the command line or in the manifest (not both)."""
    from pathomics.manifest import entries_from_paths, patient_ids_from_names, read_manifest

    if bool(args.slides) == bool(args.manifest):
        raise InputError("give either slide paths or --manifest CSV (exactly one of them)")
    if args.manifest:
        entries = read_manifest(args.manifest)
        if args.slide_mpp is not None:
            from dataclasses import replace

            entries = [e if e.mpp is not None else replace(e, mpp=args.slide_mpp) for e in entries]
    else:
        entries = entries_from_paths(args.slides, args.slide_mpp)
    pattern = getattr(args, "patient_id_regex", None)
    return patient_ids_from_names(entries, pattern) if pattern else entries


def writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or fail with one clear message."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PathomicsError(f"cannot write to output directory {path} ({exc.strerror or exc}); choose a writable --out") from exc
    return path


def config_from_args(cls: type[C], args: argparse.Namespace, **values: Any) -> C:
    """``cls`` (a config dataclass) from the options named like its fields, plus ``values``.

    Options not given (absent, or None) keep the config's default; a given value, falsy or not, is passed
    on for the config to validate, so `--mpp 0` is an error, never a silent default.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return cls(**{**given, **{k: v for k, v in values.items() if v is not None}})  # a value given here wins
