"""CPU cost of QC's per-patch scoring (``score_batch``), this tree's against an earlier revision's, side by side.

Scores the same patches (128 px patches of the held-out stores that ``benchmarks/qc_accuracy.py --real`` wrote, and
256 px patches made of 2 x 2 of them) with both versions of ``pathomics/qc.py``, interleaved, one thread, and
prints the median CPU ms per patch of each and their ratio.

    python benchmarks/qc_score_cost.py --before 27ccafc [--repeats 7] [--json benchmarks/results/qc_score_cost.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pathomics import qc
from pathomics.store import open_patch_store
from qc_accuracy import SPLIT_SEEDS  # benchmarks/ is this script's directory, first on sys.path

STORES = ("gaussian_1um", "lesions_only", "real_HE_bottom_1um", "real_HE_bottom_clean")


def load_revision(rev: str):
    """``pathomics/qc.py`` as of git revision ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:pathomics/qc.py"], check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "qc_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("qc_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["qc_before"] = module
    spec.loader.exec_module(module)
    return module


def cpu_ms_per_patch(module, images: np.ndarray) -> float:
    config = module.QCConfig()
    start = time.process_time()
    for i in range(0, len(images), 256):
        module.score_batch(images[i:i + 256], config)
    return 1000 * (time.process_time() - start) / len(images)


def main() -> None:
    import cv2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the QC to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiles", type=Path, default=Path(__file__).parent / "out" / "qc_accuracy" / f"seed{SPLIT_SEEDS['heldout']}"
                        / "heldout" / "out" / "tiles")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qc_score_cost.json")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    before = load_revision(args.before)
    small = np.concatenate([open_patch_store(args.tiles / f"{name}.zarr").read_images(0, 160) for name in STORES])
    quads = small[:len(small) // 4 * 4].reshape(-1, 2, 2, *small.shape[1:])
    large = quads.transpose(0, 1, 3, 2, 4, 5).reshape(len(quads), 2 * small.shape[1], 2 * small.shape[2], 3)
    rows = []
    for images in (small, large):
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            times["before"].append(cpu_ms_per_patch(before, images))
            times["after"].append(cpu_ms_per_patch(qc, images))
        b, a = float(np.median(times["before"])), float(np.median(times["after"]))
        rows.append({"patch_size": images.shape[1], "patches": len(images), "before_ms": b, "after_ms": a, "ratio": a / b})
        print(f"score_batch, {images.shape[1]} px, {len(images)} patches, 1 thread: before ({args.before}) {b:.3f} ms/patch, "
              f"now {a:.3f} ms/patch, ratio {a / b:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"before": args.before, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
