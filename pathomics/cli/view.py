"""`pathomics view OUT`: a local deep-zoom viewer of an output directory, served on 127.0.0.1."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("view", help="look at slides with tissue, patch, QC and attention overlays in a browser",
                                   description="Serve a deep-zoom viewer of OUT's slides on 127.0.0.1 (this machine only).")
    parser.add_argument("out", type=Path, metavar="OUT", help="output directory of `pathomics tile` or `pathomics run`")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one, printed at start)")
    parser.add_argument("--slide-dir", type=Path, metavar="DIR",
                        help="folder holding the slide files, when they moved since tiling (default: where they were tiled from)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics.viewer import serve

    try:
        serve(args.out, args.port, args.slide_dir)
    except KeyboardInterrupt:  # Ctrl-C is how the viewer is meant to stop
        pass
    return 0
