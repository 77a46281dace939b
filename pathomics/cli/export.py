"""`pathomics export qupath|anndata OUT`: an output directory's patches and signatures for QuPath and scverse."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write QuPath GeoJSON or AnnData (.h5ad) files of a run's results",
                                   description="Write OUT/export/qupath/<slide_id>.geojson (patches as QuPath detections "
                                               "with attention, risk and QC measurements) or OUT/export/anndata/*.h5ad "
                                               "(slides with signatures; patches with features).")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, help_text in (("qupath", "one GeoJSON FeatureCollection of detection objects per slide"),
                            ("anndata", "slides.h5ad (signatures) and one <slide_id>.h5ad of patch features per slide")):
        sub = formats.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("out", type=Path, metavar="OUT", help="output directory of `pathomics run` (or of tile/embed/mil)")
        sub.add_argument("--slide-id", action="append", dest="slide_ids", metavar="ID",
                         help="export only this slide (repeat for several; default: every slide)")
        if name == "anndata":
            sub.add_argument("--clinical", type=Path, help="clinical table (CSV or Parquet) whose columns join the slides "
                                                           "by patient (default: none)")
            sub.add_argument("--patient-col", default="patient_id", help="patient column of --clinical (default: patient_id)")
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathomics.export import export_anndata, export_qupath

    if args.format == "qupath":
        result = export_qupath(args.out, args.slide_ids)
    else:
        result = export_anndata(args.out, args.clinical, args.patient_col, args.slide_ids)
    folders = sorted({str(p.parent) for p in result.paths})
    print(f"wrote {len(result.paths)} file(s) to {', '.join(folders)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
