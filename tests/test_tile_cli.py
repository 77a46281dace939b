"""`pathomics tile` as a user runs it: bad inputs isolated, status.csv, exit codes, SIGKILL and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pathomics.cli.main import main
from pathomics.io import partial_path
from pathomics.store import open_patch_store
from pathomics.synthetic import write_slide


def status(out) -> dict[str, dict]:
    with open(out / "status.csv", newline="") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def test_bad_inputs_fail_one_by_one_and_the_rest_is_tiled(tmp_path, aperio_slide, truncated_slide, text_slide, no_mpp_slide, capsys):
    missing = tmp_path / "missing.svs"
    code = main(["tile", str(aperio_slide.path), str(truncated_slide), str(text_slide), str(no_mpp_slide.path), str(missing),
                 "--out", str(tmp_path / "out"), "--mpp", "1.0", "--patch-size", "64"])
    assert code == 1
    rows = status(tmp_path / "out")
    assert rows["aperio"]["state"] == "done"
    expected = {"truncated": "truncated.svs", "notes": "notes.svs: not a slide", "nompp": "--slide-mpp", "missing": "no such slide file"}
    for slide_id, phrase in expected.items():
        assert rows[slide_id]["state"] == "failed"
        assert phrase in rows[slide_id]["error"]
    report = capsys.readouterr().out
    assert "1 done" in report and "4 failed" in report and "FAILED truncated" in report
    assert not (tmp_path / "out" / "tiles" / "truncated.zarr").exists()
    assert len(open_patch_store(tmp_path / "out" / "tiles" / "aperio.zarr")) > 0


def test_manifest_mpp_rescues_a_slide_without_metadata(tmp_path, no_mpp_slide):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_path,slide_id,patient_id,mpp\n{no_mpp_slide.path},case-7,P7,0.25\n")
    assert main(["tile", "--manifest", str(manifest), "--out", str(tmp_path), "--magnification", "10", "--patch-size", "64"]) == 0
    store = open_patch_store(tmp_path / "tiles" / "case-7.zarr")
    assert store.attrs["mpp_source"] == "user" and store.attrs["target_mpp"] == 1.0


def test_unwritable_output_directory_is_a_usage_error(tmp_path, aperio_slide, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["tile", str(aperio_slide.path), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and str(blocker / "out") in err


def test_usage_errors(tmp_path, aperio_slide):
    with pytest.raises(SystemExit) as exc:
        main(["tile", str(aperio_slide.path), "--out", str(tmp_path), "--mpp", "0.5", "--magnification", "20"])
    assert exc.value.code == 2
    assert main(["tile", "--out", str(tmp_path)]) == 2


def test_tiling_from_the_shell_does_not_import_torch(tmp_path, aperio_slide):
    """torch is 1.7 s of start-up on a 2-core machine, more than tiling a small slide: `tile` never needs it."""
    code = ("import sys; from pathomics.cli.main import main; "
            f"code = main(['tile', {str(aperio_slide.path)!r}, '--out', {str(tmp_path)!r}, '--mpp', '1.0', '--patch-size', '64']); "
            "print(code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1].split() == ["0", "False"]


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    """Large enough for several shards at native resolution (about 1,500 patches of 256 px)."""
    return write_slide(tmp_path_factory.mktemp("big") / "big.svs", 20480, 16384, mpp=0.25, layout="blob", seed=5)


@pytest.mark.slow
def test_sigkill_mid_slide_then_rerun_resumes_to_identical_arrays(tmp_path, big_slide, caplog):
    args = [str(big_slide.path), "--mpp", "0.25", "--threads", "1"]
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "pathomics.cli.main", "tile", *args, "--out", str(killed_out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = partial_path(killed_out / "tiles" / "big.zarr") / "zarr.json"
    deadline = time.monotonic() + 120
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if meta.exists():
            try:
                written = json.loads(meta.read_text())["attributes"].get("patches_written", 0)
            except (ValueError, KeyError):
                written = 0
            if written > 0:
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the tiler finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    final = killed_out / "tiles" / "big.zarr"
    assert not final.exists() and meta.exists()
    total = json.loads(meta.read_text())["attributes"]["n_patches"]
    assert 0 < written < total

    caplog.set_level("INFO", logger="pathomics.tiling")
    assert main(["tile", *args, "--out", str(killed_out)]) == 0
    assert f"resuming an interrupted store at patch {written} of {total}" in caplog.text
    assert main(["tile", *args, "--out", str(clean_out)]) == 0
    resumed, clean = open_patch_store(final), open_patch_store(clean_out / "tiles" / "big.zarr")
    assert not partial_path(final).exists()
    np.testing.assert_array_equal(resumed.coords, clean.coords)
    np.testing.assert_array_equal(resumed.read_images(0, len(resumed)), clean.read_images(0, len(clean)))


def test_two_runs_on_one_output_directory_share_the_slides(tmp_path, aperio_slide, generic_slide):
    """Two `tile` (then two `embed`) runs at once: each slide taken under its lock, done once, no traceback."""
    slides = [str(aperio_slide.path), str(generic_slide.path)]
    commands = {
        "tile": ["tile", *slides, "--out", str(tmp_path), "--mpp", "2.0", "--patch-size", "64"],
        "embed": ["embed", "--out", str(tmp_path), "--encoder", "shufflenet-v2", "--weights", "random", "--device", "cpu",
                  "--precision", "fp32", "--batch-size", "8", "--num-workers", "0", "--input-size", "64"],
    }
    for stage, argv in commands.items():
        runs = [subprocess.Popen([sys.executable, "-m", "pathomics.cli.main", *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [run.communicate(timeout=300) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        assert not any("Traceback" in err for _, err in outputs), outputs
        done = sum(int(next(line for line in out.splitlines() if line.startswith(f"{stage}:")).split()[1]) for out, _ in outputs)
        assert done == 2, outputs  # each slide done by one run, skipped by the other
        assert {row["state"] for row in status(tmp_path).values()} == {"done"}


def test_a_batch_tiles_two_slides_at_once_sharing_the_cores(tmp_path, aperio_slide, generic_slide, truncated_slide, monkeypatch):
    """By default two slides are tiled at the same time (each with half the cores): the first two meet at a barrier,
    which one slide at a time would never reach; a slide that fails is recorded and the stores are those of one
    slide at a time."""
    import threading

    import pathomics.runner.jobs as jobs

    monkeypatch.setattr("pathomics.tiling.os.cpu_count", lambda: 4)
    both_running, threads, tile_slide = threading.Barrier(2, timeout=60), [], jobs.tile_slide

    def meeting(*args, **kwargs):
        threads.append(args[2].threads)
        if len(threads) <= 2:
            both_running.wait()
        return tile_slide(*args, **kwargs)

    monkeypatch.setattr(jobs, "tile_slide", meeting)
    slides = [str(aperio_slide.path), str(truncated_slide), str(generic_slide.path)]
    args = ["--mpp", "2.0", "--patch-size", "64"]
    assert main(["tile", *slides, "--out", str(tmp_path / "two"), *args]) == 1
    assert threads == [2, 2, 2]
    assert {k: r["state"] for k, r in status(tmp_path / "two").items()} == {"aperio": "done", "truncated": "failed", "generic": "done"}
    monkeypatch.setattr(jobs, "tile_slide", tile_slide)
    assert main(["tile", *slides, "--out", str(tmp_path / "one"), *args, "--slides-at-once", "1"]) == 1
    for slide_id in ("aperio", "generic"):
        two, one = (open_patch_store(tmp_path / out / "tiles" / f"{slide_id}.zarr") for out in ("two", "one"))
        np.testing.assert_array_equal(two.coords, one.coords)
        np.testing.assert_array_equal(two.read_images(0, len(two)), one.read_images(0, len(one)))
    assert main(["tile", *slides, "--out", str(tmp_path / "bad"), "--slides-at-once", "0"]) == 2
    from pathomics.tiling import batch_parallelism

    assert batch_parallelism(slides=1) == (1, 4) and batch_parallelism(3, slides=2) == (2, 2)  # a lone slide: every core


def test_an_interrupt_cancels_the_slides_not_begun():
    """Ctrl-C while slides run in threads: those running finish (a thread cannot be stopped), no other begins."""
    import threading

    from pathomics.batch import DONE, SlideJob, in_threads

    begun, release = [], threading.Event()

    def run(job: SlideJob) -> bool:
        begun.append(job.slide_id)
        if job.slide_id == "s0":
            raise KeyboardInterrupt
        release.wait(timeout=0.5)  # still running when the interrupt reaches the batch
        return True

    jobs = [SlideJob(f"s{i}", lambda: (DONE, 0)) for i in range(20)]
    with pytest.raises(KeyboardInterrupt):
        in_threads(run, jobs, at_once=2)
    assert begun[0] == "s0" and len(begun) <= 3  # s0, the slide beside it, at most one more taken meanwhile
