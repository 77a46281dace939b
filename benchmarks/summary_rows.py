"""Per-slide table rows in a large archive: what ``status.csv`` and ``qc_summary.csv`` cost a new slide's row.

Both tables hold one row per slide of the whole output folder, so a cost that grows with the table makes a
batch quadratic. For each table size, a table of that many slides is written as an earlier run left it; then
``--slides`` new slides' rows are merged one after another, in a fresh process for each source tree given
(side by side: ``--code before=PATH after=PATH``). The first new row pays for reading the table once;
reported is the median of the others, in ms, and JSON.

    python benchmarks/summary_rows.py --code before=/tmp/before after=. --rows 40 200 2000 5000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAINS = [f"stain_{s}_{c}" for s in "he" for c in "rgb"]


def qc_row(i: int, rng: np.random.Generator) -> dict[str, object]:
    """A QC summary row like tiling writes: fractions flagged and the slide's H and E vectors (varied)."""
    vectors = np.array([0.65, 0.70, 0.29, 0.07, 0.99, 0.11]) + 0.02 * rng.standard_normal(6)
    return {"slide_id": f"slide{i:05d}", "patches": 150, "frac_blur": 0.01, "frac_fold": 0.0, "frac_bubble": 0.0,
            "frac_pen": 0.0, "frac_fail": 0.01, **dict(zip(STAINS, vectors.round(6).tolist())), "stain_fit": "macenko"}


def child(rows: int, slides: int) -> dict[str, float]:
    """(in this process) ms a new slide's status row and QC summary row cost, after ``rows`` earlier slides."""
    from pathomics.batch import StatusRow, update_status
    from pathomics.layout import OutputLayout
    from pathomics.qc import QCConfig, update_summary

    rng = np.random.default_rng(0)
    out = Path(tempfile.mkdtemp(prefix="pathomics-rows-"))
    layout = OutputLayout(out)
    earlier = [qc_row(i, rng) for i in range(rows)]
    with layout.qc_summary.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*earlier[0], "stain_angle", "stain_outlier"], restval="")
        writer.writeheader()
        writer.writerows({**r, "stain_angle": 1.0, "stain_outlier": False} for r in earlier)
    with layout.status.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "stage", "state", "seconds", "error", "patches"])
        writer.writeheader()
        writer.writerows({"slide_id": r["slide_id"], "stage": "tile", "state": "done", "seconds": 0.1, "error": "",
                          "patches": 150} for r in earlier)
    times: dict[str, list[float]] = {"status": [], "qc_summary": []}
    config = QCConfig()
    for i in range(rows, rows + slides):
        row = qc_row(i, rng)
        start = time.perf_counter()
        update_status(out, [StatusRow(str(row["slide_id"]), "tile", "done", 0.1, "", 150)])
        middle = time.perf_counter()
        update_summary(out, row, config)
        times["status"].append(middle - start)
        times["qc_summary"].append(time.perf_counter() - middle)
    return {name: 1e3 * statistics.median(values[1:]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", nargs="+", default=[f"after={Path(__file__).resolve().parent.parent}"], metavar="LABEL=PATH")
    parser.add_argument("--rows", nargs="+", type=int, default=[40, 200, 2000, 5000], help="slides already in the tables")
    parser.add_argument("--slides", type=int, default=9, help="new slides' rows timed at each size")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "summary_rows.json")
    parser.add_argument("--child", nargs=2, type=int, metavar=("ROWS", "SLIDES"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    codes = dict(item.split("=", 1) for item in args.code)
    results: dict[str, dict[int, dict[str, float]]] = {label: {} for label in codes}
    for rows in args.rows:
        for label, code in codes.items():
            env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())}
            done = subprocess.run([sys.executable, __file__, "--child", str(rows), str(args.slides)], env=env,
                                  check=True, capture_output=True, text=True)
            results[label][rows] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'slides in the tables':>20s} " + " ".join(f"{label + ' ' + name:>22s}" for label in codes
                                                       for name in ("status", "qc_summary")))
    for rows in args.rows:
        print(f"{rows:20d} " + " ".join(f"{results[label][rows][name]:19.2f} ms" for label in codes
                                        for name in ("status", "qc_summary")))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"code": codes, "slides_timed": args.slides, "cpu_count": os.cpu_count(),
                                     "load_average": os.getloadavg(), "ms_a_new_row": results}, indent=2) + "\n")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
