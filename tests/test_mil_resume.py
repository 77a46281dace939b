"""`pathomics mil train` killed with SIGKILL during cross-validation resumes at its first unfinished fold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers.mil import witness_cohort

from pathomics.layout import OutputLayout

FOLDS = 4


def train_argv(cohort, out) -> list[str]:
    # fixed-length training (no early stop), so each fold takes long enough to be killed between folds
    return [sys.executable, "-m", "pathomics.cli.main", "mil", "train", "--features", str(cohort.features),
            "--labels", str(cohort.labels), "--out", str(out), "--task", "survival", "--folds", str(FOLDS),
            "--epochs", "12", "--min-epochs", "12", "--hidden-dim", "16", "--ensemble", "1", "--device", "cpu",
            "--no-refit"]


@pytest.mark.slow
def test_sigkill_during_cross_validation_then_rerun_keeps_finished_folds(tmp_path):
    cohort = witness_cohort(tmp_path / "bags", task="survival", n_slides=60, dim=16)
    killed, clean = OutputLayout(tmp_path / "killed"), OutputLayout(tmp_path / "clean")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_argv(cohort, killed.root), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not killed.fold_checkpoint(0).exists():
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed after its first fold"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {f: killed.fold_checkpoint(f).stat().st_mtime_ns for f in range(FOLDS) if killed.fold_checkpoint(f).exists()}
    assert 1 <= len(finished) < FOLDS and not killed.signatures.exists()

    assert subprocess.run(train_argv(cohort, killed.root), env=env, capture_output=True).returncode == 0
    assert {f: killed.fold_checkpoint(f).stat().st_mtime_ns for f in finished} == finished  # loaded, not retrained
    assert subprocess.run(train_argv(cohort, clean.root), env=env, capture_output=True).returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(killed.signatures), pd.read_parquet(clean.signatures), check_exact=True)
