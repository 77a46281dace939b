"""Archive runs on a real local Dask cluster: failures isolated, finished slides skipped, cohort stages chained."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pathomics.batch import read_status
from pathomics.extract import EmbedConfig
from pathomics.manifest import SlideEntry, read_manifest
from pathomics.mil import MILConfig
from pathomics.pipeline import RunConfig, run_archive, run_slides
from pathomics.survival.config import SurvivalConfig
from pathomics.synthetic import write_cohort
from pathomics.tiling import TileConfig

TILE = TileConfig(target_mpp=2.0, patch_size=64, threads=1)
EMBED = EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=64, num_workers=0, input_size=64)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_patients=12, seed=3, slide_size=(2048, 1536), max_slides=1)


@pytest.mark.slow
def test_bad_slides_fail_alone_and_a_rerun_skips_finished_ones(tmp_path, cohort, truncated_slide, no_mpp_slide):
    good = read_manifest(cohort.manifest)[:2]
    entries = [*good, SlideEntry(truncated_slide, "truncated", "PX"), SlideEntry(no_mpp_slide.path, "nompp", "PY")]
    config = RunConfig(tile=TILE, embed=EMBED, workers=1)
    rows = run_slides(entries, tmp_path, config)
    states = {(r.slide_id, r.stage): r.state for r in rows}
    for entry in good:
        assert states[(entry.slide_id, "tile")] == "done" and states[(entry.slide_id, "embed")] == "done"
    assert states[("truncated", "tile")] == "failed" and states[("nompp", "tile")] == "failed"
    assert "--slide-mpp" in {r.slide_id: r.error for r in rows}["nompp"]
    mtimes = {e.slide_id: (tmp_path / "features" / f"{e.slide_id}.h5").stat().st_mtime_ns for e in good}

    again = run_slides(good, tmp_path, config)
    assert {r.state for r in again} == {"skipped"}
    assert mtimes == {e.slide_id: (tmp_path / "features" / f"{e.slide_id}.h5").stat().st_mtime_ns for e in good}
    assert {(r.slide_id, r.stage) for r in read_status(tmp_path)} >= set(states)


@pytest.mark.slow
def test_run_archive_chains_mil_and_survival(tmp_path, cohort):
    config = RunConfig(
        tile=TILE, embed=EMBED, workers=1,
        mil=MILConfig(task="survival", model="abmil", folds=2, epochs=3, min_epochs=1, patience=2, hidden_dim=16, batch_size=4),
        survival=SurvivalConfig(covariates=("age", "tumour_size"), folds=2, n_bootstrap=10, penalizer=(0.5,)),
    )
    result = run_archive(read_manifest(cohort.manifest), cohort.clinical, tmp_path, config, radiology=cohort.radiology)
    signatures = pd.read_parquet(result.signatures)
    assert len(signatures) == 12 and signatures["risk"].notna().all()
    assert set(result.survival.models) == {"clinical", "radiology", "pathology", "combined"}
    assert (tmp_path / "survival" / "metrics.json").exists() and (tmp_path / "survival" / "report.html").exists()
    assert {("cohort", "mil"), ("cohort", "survival")} <= {(r.slide_id, r.stage) for r in read_status(tmp_path)}
    assert Path(tmp_path / "labels.csv").exists()
