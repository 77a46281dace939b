"""Write errors (a file size limit, a full disk) fail the slide with one line naming the file and what to do."""

from __future__ import annotations

import csv
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pathomics.cli.main import main

LIMIT = 8 << 10  # bytes: below a shard, a feature file and a batch in shared memory, above status.csv


def limited(argv: list[str]) -> subprocess.CompletedProcess:
    """``pathomics ARGV`` in a subprocess whose files may not grow beyond LIMIT (``ulimit -f``)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    return subprocess.run([sys.executable, "-m", "pathomics.cli.main", *argv], preexec_fn=limit, capture_output=True,
                          text=True, timeout=300)


def failures(out: Path, stage: str) -> dict[str, str]:
    with (out / "status.csv").open(newline="") as fh:
        return {r["slide_id"]: r["error"] for r in csv.DictReader(fh) if r["stage"] == stage and r["state"] == "failed"}


def test_tile_names_the_shard_it_cannot_write(tmp_path: Path, aperio_slide) -> None:
    result = limited(["tile", str(aperio_slide.path), "--out", str(tmp_path), "--mpp", "1.0", "--patch-size", "64",
                      "--compression", "none"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = failures(tmp_path, "tile")["aperio"]
    assert error.startswith(f"WriteError: cannot write {tmp_path / 'tiles' / 'aperio.zarr.partial'}")
    assert "File too large" in error and "ulimit -f" in error
    assert "ulimit -f" in result.stdout


@pytest.mark.parametrize("workers", ["0", "1"])
def test_embed_fails_each_slide_it_cannot_write_and_goes_on(tmp_path: Path, aperio_slide, generic_slide, workers: str) -> None:
    """A loader worker's failure to share a batch used to be lost, and embed waited on it for ever."""
    assert main(["tile", str(aperio_slide.path), str(generic_slide.path), "--out", str(tmp_path), "--mpp", "4.0",
                 "--patch-size", "64"]) == 0
    result = limited(["embed", "--out", str(tmp_path), "--encoder", "shufflenet-v2", "--weights", "random", "--device", "cpu",
                      "--precision", "fp32", "--batch-size", "4", "--num-workers", workers, "--input-size", "64"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = failures(tmp_path, "embed")
    assert sorted(errors) == ["aperio", "generic"]
    for slide_id, error in errors.items():
        where = "shared memory" if workers == "1" else str(tmp_path / "features" / f"{slide_id}.h5")
        assert error.startswith(f"WriteError: cannot write {where}") and "File too large" in error and "\n" not in error


@pytest.mark.slow
def test_mil_train_names_the_checkpoint_it_cannot_write(tmp_path: Path) -> None:
    """torch's own file writer failed with 'basic_ios::clear: iostream error': a traceback naming no file."""
    from helpers.mil import witness_cohort

    cohort = witness_cohort(tmp_path / "bags", n_slides=24, dim=8, patches=(20, 40), slides_per_patient=2)
    result = limited(["mil", "train", "--features", str(cohort.features), "--labels", str(cohort.labels), "--out",
                      str(tmp_path / "run"), "--folds", "2", "--epochs", "1", "--hidden-dim", "8", "--ensemble", "1"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"pathomics mil: error: cannot write {tmp_path / 'run' / 'mil_models' / 'fold_0.pt'}: File too large")
    assert "ulimit -f" in error
