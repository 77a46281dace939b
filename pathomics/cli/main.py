"""Entry point of the `pathomics` console script.

Each verb is a module of this package exposing ``add_parser(subparsers)`` and ``run(args) -> int``;
heavy imports happen inside ``run`` so that ``pathomics --help`` stays fast.
Exit codes: 0 all done, 1 some slides failed (listed), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from pathomics import __version__
from pathomics.cli.common import Parser
from pathomics.errors import PathomicsError

VERBS = ("tile", "embed", "mil", "survival", "run", "demo", "view", "export", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pathomics", description="Whole-slide-image pathomics toolkit.")
    parser.add_argument("--version", action="version", version=f"pathomics {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and show warnings' source lines")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"pathomics.cli.{verb}").add_parser(subparsers)
    return parser


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """A warning as ``Category: message``, without the source file and line (shown with -v)."""
    return f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # pathomics logs at INFO (DEBUG with -v); libraries (Dask, ...) only at WARNING, so a run's output stays readable
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pathomics").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        warnings.formatwarning = one_line_warning
    try:
        return int(args.run(args))
    except PathomicsError as exc:
        print(f"pathomics {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pathomics {args.verb}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
