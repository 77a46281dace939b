"""Archive runs on a real local Dask cluster: failures isolated, finished slides skipped, cohort stages chained."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pathomics.embed import EmbedConfig
from pathomics.layout import OutputLayout
from pathomics.mil import MILConfig
from pathomics.manifest import SlideEntry, read_manifest
from pathomics.batch import read_status
from pathomics.runner.pipeline import RunConfig, check_run_inputs, run_archive, run_slides
from pathomics.io import sha256_file
from pathomics.store import open_patch_store, read_feature_file
from pathomics.survival.config import SurvivalConfig
from pathomics.synthetic import write_cohort, write_slide
from pathomics.tiling import TileConfig

TILE = TileConfig(target_mpp=2.0, patch_size=64, threads=1)
EMBED = EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=64, num_workers=0, input_size=64)
DASK = Path(sys.executable).with_name("dask")  # the dask command of this environment


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_patients=14, seed=3, slide_size=(2048, 1536), max_slides=1)


@pytest.mark.slow
def test_bad_slides_fail_alone_and_a_rerun_skips_finished_ones(tmp_path, cohort, truncated_slide, no_mpp_slide):
    good = read_manifest(cohort.manifest)[:2]
    entries = [*good, SlideEntry(truncated_slide, "truncated", "PX"), SlideEntry(no_mpp_slide.path, "nompp", "PY")]
    config = RunConfig(tile=TILE, embed=EMBED, workers=1)
    rows = run_slides(entries, tmp_path, config)
    states = {(r.slide_id, r.stage): r.state for r in rows}
    patches = {(r.slide_id, r.stage): r.patches for r in rows}
    for entry in good:
        assert states[(entry.slide_id, "tile")] == "done" and states[(entry.slide_id, "embed")] == "done"
        n = len(open_patch_store(OutputLayout(tmp_path).store(entry.slide_id)))
        assert n > 0 and patches[(entry.slide_id, "tile")] == patches[(entry.slide_id, "embed")] == n
    assert states[("truncated", "tile")] == "failed" and states[("nompp", "tile")] == "failed"
    assert "--slide-mpp" in {r.slide_id: r.error for r in rows}["nompp"]
    mtimes = {e.slide_id: (tmp_path / "features" / f"{e.slide_id}.h5").stat().st_mtime_ns for e in good}

    again = run_slides(good, tmp_path, config)
    assert {r.state for r in again} == {"skipped"}
    assert mtimes == {e.slide_id: (tmp_path / "features" / f"{e.slide_id}.h5").stat().st_mtime_ns for e in good}
    assert {(r.slide_id, r.stage): r.patches for r in read_status(tmp_path)}.items() >= patches.items()


def test_an_unchanged_rerun_skips_its_slides_without_a_cluster_and_a_changed_output_brings_it_back(tmp_path, cohort):
    import dask

    entries = read_manifest(cohort.manifest)[:2]
    first = run_slides(entries, tmp_path, RunConfig(tile=TILE, embed=EMBED, workers=1), show_progress=False)
    nowhere = RunConfig(tile=TILE, embed=EMBED, scheduler="tcp://127.0.0.1:9")  # nothing listens there
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        again = run_slides(entries, tmp_path, nowhere, show_progress=False)
        assert {(r.slide_id, r.stage, r.state, r.patches) for r in again} == \
            {(r.slide_id, r.stage, "skipped", r.patches) for r in first}
        OutputLayout(tmp_path).feature_file(entries[0].slide_id).unlink()
        with pytest.raises(OSError):  # the slide needs its embedding again: only a cluster can give it
            run_slides(entries, tmp_path, nowhere, show_progress=False)


def output_files(out: Path) -> dict[str, str]:
    """Every file of a run's output (locks aside) with the SHA-256 of its content."""
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file() and "locks" not in p.parts}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pathomics.errors.DataWarning", "ignore::pathomics.errors.FitWarning")
def test_a_pilot_cohort_runs_with_default_options_and_an_unchanged_rerun_redoes_nothing(tmp_path, cohort):
    """14 patients, the MIL and survival stages at their defaults (5 folds each, 2-3 patients per held-out fold:
    a pilot's folds may lack admissible pairs or an unpenalised fit, which warns but must not stop the run), but for
    an ensemble of 2 models per fold where the default rule trains 5 on 11 bags (the same code, 2.5x the time)."""
    config = RunConfig(tile=TILE, embed=EMBED, workers=1, mil=MILConfig(task="survival", ensemble=2),
                       survival=SurvivalConfig(covariates=("age", "tumour_size"), n_bootstrap=50))
    result = run_archive(read_manifest(cohort.manifest), cohort.clinical, tmp_path, config, radiology=cohort.radiology)
    signatures = pd.read_parquet(result.signatures)
    assert len(signatures) == 14 and signatures["risk"].notna().all()
    assert set(result.survival.models) == {"clinical", "radiology", "pathology", "combined"}
    assert (tmp_path / "survival" / "metrics.json").exists() and (tmp_path / "survival" / "report.html").exists()
    assert {("cohort", "mil"), ("cohort", "survival")} <= {(r.slide_id, r.stage) for r in read_status(tmp_path)}
    before = output_files(tmp_path)

    again = run_archive(read_manifest(cohort.manifest), cohort.clinical, tmp_path, config, radiology=cohort.radiology)
    assert {r.state for r in again.rows} == {"skipped"}
    assert output_files(tmp_path) == before  # not one output file changed, status.csv included
    assert {(r.slide_id, r.stage): r.state for r in read_status(tmp_path)}[("cohort", "mil")] == "done"
    # a pilot's metric may be NaN (undefined on its folds), which == would call unequal to itself
    np.testing.assert_equal(again.survival.models["combined"].metrics, result.survival.models["combined"].metrics)

    survival_result = OutputLayout(tmp_path).survival_result  # damaged: recomputed, never unpickled
    survival_result.write_bytes(survival_result.read_bytes()[:100])
    third = run_archive(read_manifest(cohort.manifest), cohort.clinical, tmp_path, config, radiology=cohort.radiology)
    assert {(r.slide_id, r.stage): r.state for r in third.rows}[("cohort", "survival")] == "done"
    np.testing.assert_equal(third.survival.models["combined"].metrics, result.survival.models["combined"].metrics)


def test_run_reads_the_named_time_column_even_beside_one_called_time(tmp_path):
    clinical = tmp_path / "clinical.csv"
    pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "time": [1.0, 2.0, 3.0], "os_days": [400.0, 90.0, 700.0],
                  "event": [1, 1, 0], "age": [50, 60, 70]}).to_csv(clinical, index=False)
    entries = [SlideEntry(tmp_path / f"s{i}.svs", f"s{i}", f"P{i}") for i in (1, 2, 3)]
    config = RunConfig(survival=SurvivalConfig(covariates=("age",), time_col="os_days"))
    labels = check_run_inputs(entries, clinical, None, config)
    assert list(labels.columns) == ["slide_id", "patient_id", "time", "event"]
    assert labels.set_index("slide_id")["time"].to_dict() == {"s1": 400.0, "s2": 90.0, "s3": 700.0}


def run_command(cohort, out: Path, *extra: str) -> list[str]:
    """`pathomics run` on the small cohort, as a user types it."""
    return [sys.executable, "-m", "pathomics.cli.main", "run", "--manifest", str(cohort.manifest), "--clinical", str(cohort.clinical),
            "--radiology", str(cohort.radiology), "--out", str(out), "--mpp", "2.0", "--patch-size", "64", "--threads", "1",
            "--encoder", "shufflenet-v2", "--weights", "random", "--precision", "fp32", "--input-size", "64", "--num-workers", "0",
            "--covariates", "age,tumour_size", "--folds", "2", "--bootstrap", "10", "--penalizer", "0.5",
            "--epochs", "3", *extra]


def feature_mtimes(out: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")}


@pytest.mark.slow
def test_sigkill_during_embedding_then_rerun_resumes(tmp_path, cohort):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(run_command(cohort, killed), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(feature_mtimes(killed)) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed during embedding"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = feature_mtimes(killed)
    assert 3 <= len(before) < 14 and not (killed / "signatures.parquet").exists()

    assert subprocess.run(run_command(cohort, killed), capture_output=True).returncode == 0
    status = {(r.slide_id, r.stage): r.state for r in read_status(killed)}
    for slide_id, mtime in before.items():
        assert feature_mtimes(killed)[slide_id] == mtime  # finished slides were not redone
        # done: the killed run recorded them; skipped: it was killed between writing the features and the status row
        assert {status[(slide_id, "embed")], status[(slide_id, "tile")]} <= {"done", "skipped"}
    assert subprocess.run(run_command(cohort, clean), capture_output=True).returncode == 0
    for slide_id in feature_mtimes(clean):
        a, b = read_feature_file(killed / "features" / f"{slide_id}.h5"), read_feature_file(clean / "features" / f"{slide_id}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-7)
    resumed = pd.read_parquet(killed / "signatures.parquet").set_index("slide_id").sort_index()
    uninterrupted = pd.read_parquet(clean / "signatures.parquet").set_index("slide_id").sort_index()
    np.testing.assert_allclose(resumed["risk"], uninterrupted["risk"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_runs_on_one_output_directory_share_the_slides(tmp_path, cohort):
    procs = [subprocess.Popen(run_command(cohort, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs, logs = zip(*(p.communicate(timeout=600) for p in procs))
    assert [p.returncode for p in procs] == [0, 0], outputs
    for stage in ("tile", "embed"):  # every slide tiled and embedded exactly once, by one of the two runs
        assert sum(int(re.search(rf"^{stage}: (\d+) done", out, re.MULTILINE).group(1)) for out in outputs) == 14, outputs
    for slide_id in feature_mtimes(tmp_path):
        assert len(read_feature_file(tmp_path / "features" / f"{slide_id}.h5").features) > 0
    assert len(pd.read_parquet(tmp_path / "signatures.parquet")) == 14
    rows = read_status(tmp_path)
    assert len(rows) == len({(r.slide_id, r.stage) for r in rows}) and {r.state for r in rows} == {"done"}
    for stage in ("mil", "survival"):  # the cohort stages ran once: the run that waited for them skipped them
        assert sum(f"{stage}: inputs and settings unchanged since it finished; skipped" in log for log in logs) == 1, logs


def written(scheduler_file: Path) -> bool:
    """The scheduler file is there and whole (the scheduler writes it in place)."""
    try:
        return "address" in json.loads(scheduler_file.read_text())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def external_scheduler(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen]]]:
    """A `dask scheduler` on a free port (tests in parallel each start one) writing its scheduler file; the processes a
    test appends (its workers) are stopped with it."""
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(DASK), "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0", "--no-dashboard",
                               "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not written(scheduler_file) and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.1)
        assert written(scheduler_file), f"dask scheduler did not start (exit code {procs[0].poll()})"
        yield scheduler_file, procs
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_run_against_an_existing_dask_scheduler(tmp_path, cohort):
    with external_scheduler(tmp_path) as (scheduler_file, procs):
        procs.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
                                       "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(scheduler_file.read_text())["address"]
        out = tmp_path / "out"
        result = subprocess.run(run_command(cohort, out, "--scheduler", address), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(feature_mtimes(out)) == 14 and (out / "survival" / "metrics.json").exists()


@pytest.mark.slow
def test_an_external_scheduler_with_one_gpu_per_worker_runs_each_slide_once_one_at_a_time_per_worker(tmp_path):
    """Two `dask worker --resources GPU=1` with their own --local-directory and two threads each, one output dir:
    the slide tasks ask for the GPU, so each worker runs one slide at a time (its card), and both take slides."""
    from distributed import Client

    def most_slides_running_at_once(dask_worker) -> int:
        """Replays the worker's own transition log (its clock, no scheduler offset) counting slide tasks executing."""
        running = most = 0
        for entry in dask_worker.state.log:
            if len(entry) == 7 and str(entry[0]).startswith("slide-"):  # (key, start, recommended, final, ...)
                running += (entry[3] == "executing") - (entry[1] == "executing")
                most = max(most, running)
        return most

    with external_scheduler(tmp_path) as (scheduler_file, procs):
        for name in ("gpu0", "gpu1"):
            procs.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--name", name,
                                           "--nthreads", "2", "--resources", "GPU=1", "--local-directory", str(tmp_path / name), "--no-nanny",
                                           "--no-dashboard", "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        entries = [SlideEntry(write_slide(tmp_path / f"s{i}.svs", 2048, 1536, seed=i).path, f"s{i}", f"P{i}") for i in range(4)]
        with Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(2, timeout=120)
            config = RunConfig(tile=TILE, embed=EMBED, scheduler=client.scheduler.address)
            rows = run_slides(entries, tmp_path / "out", config, client=client, show_progress=False)
            # Not the task stream's start/stop stamps: each worker shifts them by its scheduler clock offset, which it
            # re-estimates at every heartbeat, so back-to-back tasks could appear to overlap by a few milliseconds.
            most_at_once = client.run(most_slides_running_at_once)
    assert sorted((r.slide_id, r.stage, r.state) for r in rows) == sorted(
        (e.slide_id, stage, "done") for e in entries for stage in ("tile", "embed"))
    assert sorted(feature_mtimes(tmp_path / "out")) == sorted(e.slide_id for e in entries)
    assert sorted(most_at_once.values()) == [1, 1]  # both cards took slides, one at a time each, though two threads each
    assert (tmp_path / "gpu0").is_dir() and (tmp_path / "gpu1").is_dir()  # each worker's own scratch space


@pytest.mark.slow
def test_run_lists_failed_slides_and_exits_1(tmp_path, cohort, truncated_slide):
    manifest = pd.read_csv(cohort.manifest)
    manifest["slide_path"] = [str(cohort.root / p) for p in manifest.slide_path]
    broken = pd.DataFrame({"slide_path": [str(truncated_slide)], "slide_id": ["broken"], "patient_id": ["P0000"]})
    pd.concat([manifest, broken]).to_csv(tmp_path / "manifest.csv", index=False)
    argv = run_command(cohort, tmp_path / "out")
    argv[argv.index("--manifest") + 1] = str(tmp_path / "manifest.csv")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED broken" in result.stdout and "truncated.svs" in result.stdout
    # a line per slide and stage, not Dask's INFO chatter or a warning per bootstrap resample (once ~590 lines for 6 slides)
    assert len(result.stderr.splitlines()) <= 2 * 15 + 20, result.stderr
    assert "INFO distributed" not in result.stderr, result.stderr
    assert not re.search(r"\.py:\d+: \w+Warning", result.stderr), result.stderr  # warnings without their source lines
    assert "tile: 14 done, 0 skipped (already complete), 1 failed" in result.stdout
    assert "embed: 14 done, 0 skipped (already complete), 0 failed" in result.stdout
    assert (tmp_path / "out" / "survival" / "metrics.json").exists()  # the other slides went all the way


def test_ctrl_c_stops_the_run_with_one_line_and_keeps_finished_slides_done(tmp_path, cohort):
    """Ctrl-C reaches the whole process group, as at a terminal: Dask workers printed KeyboardInterrupt tracebacks,
    and slides finished in the interrupted run had no `done` row."""
    # a shell starts a foreground job with Ctrl-C's default action, whatever the shell's own; a test process may
    # have it ignored (an ignored signal stays ignored in a child), so the run is started as a shell starts it
    parent_sigint = signal.getsignal(signal.SIGINT)
    proc = subprocess.Popen(run_command(cohort, tmp_path), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(feature_mtimes(tmp_path)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, \
        f"exit {proc.returncode}, test process's SIGINT handler {parent_sigint}:\n{err}"
    assert "interrupted; re-run the same command to resume" in err
    status = {(r.slide_id, r.stage): r.state for r in read_status(tmp_path)}
    for slide_id in feature_mtimes(tmp_path):
        assert status[(slide_id, "embed")] == "done"
