"""The error and config contract: bad options and inputs end in one line and exit 2, never a traceback,
and a programming error is never recorded as a failed slide."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from pathomics.cli.common import config_from_args
from pathomics.cli.main import build_parser, main
from pathomics.errors import ConfigError, PathomicsError
from pathomics.layout import OutputLayout
from pathomics.batch import FAILED, SlideJob, StatusRow, one_line, read_status, run_one, update_status
from pathomics.tiling import TileConfig


def cli(*argv: str) -> subprocess.CompletedProcess:
    """The console script as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "pathomics.cli.main", *argv], capture_output=True, text=True, timeout=300)


def assert_usage_error(result: subprocess.CompletedProcess, phrase: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert phrase in lines[0]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A clinical table and a manifest naming slides that do not exist: every check below fails before any slide is read."""
    root = tmp_path_factory.mktemp("tables")
    pd.DataFrame({"patient_id": ["P1", "P2"], "time": [5.0, 9.0], "event": [1, 0], "age": [60, 70]}).to_csv(
        root / "clinical.csv", index=False)
    pd.DataFrame({"slide_path": ["a.svs", "b.svs"], "patient_id": ["P1", "P2"]}).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.mark.parametrize(("options", "phrase"), [
    (["--workers", "0"], "workers and threads per worker must be at least 1"),
    (["--threads", "0"], "at least 1"),
    (["--mpp", "0"], "target MPP must be positive"),
    (["--magnification", "0"], "magnification must be positive"),
    (["--magnification", "-20"], "magnification must be positive"),
    (["--covariates", "age,grade"], "missing column(s) 'grade'"),
    (["--clinical", "absent.csv"], "absent.csv does not exist"),
])
def test_run_refuses_bad_options_and_tables_before_touching_a_slide(tables, tmp_path, options, phrase, capsys):
    argv = ["run", "--manifest", str(tables / "manifest.csv"), "--clinical", str(tables / "clinical.csv"),
            "--covariates", "age", "--out", str(tmp_path / "out"), "--weights", "random"]
    for flag, value in zip(options[::2], options[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], err
    assert not OutputLayout(tmp_path / "out").tiles.exists()


@pytest.mark.parametrize(("options", "phrase"), [(["--mpp", "0"], "target MPP must be positive"),
                                                 (["--magnification", "0"], "magnification must be positive")])
def test_tile_refuses_zero_resolutions(tmp_path, aperio_slide, options, phrase, capsys):
    assert main(["tile", str(aperio_slide.path), "--out", str(tmp_path), *options]) == 2
    assert phrase in capsys.readouterr().err


def test_a_folder_without_slides_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["tile", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "a folder without slide files" in capsys.readouterr().err


@pytest.mark.slow
def test_embed_refuses_a_text_file_as_weights(tmp_path, aperio_slide):
    assert main(["tile", str(aperio_slide.path), "--out", str(tmp_path), "--mpp", "2.0", "--patch-size", "64"]) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes, not weights\n")
    assert_usage_error(cli("embed", "--out", str(tmp_path), "--model", "shufflenet-v2", "--weights", str(notes)), "notes.txt")


def test_no_falsy_defaults_in_config_from_args():
    parser = build_parser()
    args = parser.parse_args(["tile", "x.svs", "--out", "o", "--overlap", "0", "--min-tissue", "0"])
    config = config_from_args(TileConfig, args)
    assert config.overlap == 0 and config.min_tissue == 0.0 and config.target_mpp == TileConfig().target_mpp
    with pytest.raises(ConfigError, match="target MPP must be positive"):
        config_from_args(TileConfig, parser.parse_args(["tile", "x.svs", "--out", "o", "--mpp", "0"]))


def test_configs_raise_config_errors_the_cli_turns_into_exit_2():
    with pytest.raises(ConfigError):
        TileConfig(patch_size=0)
    assert issubclass(ConfigError, PathomicsError) and issubclass(ConfigError, ValueError)


def test_run_help_states_the_decision_fusion_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "(default: decision)" in " ".join(capsys.readouterr().out.split())


def test_a_programming_error_is_not_recorded_as_a_failed_slide():
    def broken() -> tuple[str, int]:
        raise ValueError("a bug, not a bad slide")

    with pytest.raises(ValueError, match="a bug"):
        run_one("tile", SlideJob("s1", broken))

    def bad_slide() -> tuple[str, int]:
        raise PathomicsError("s1.svs: not a slide")

    assert run_one("tile", SlideJob("s1", bad_slide)).state == FAILED


def test_a_worker_traceback_becomes_one_line():
    message = ("Caught StoreError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in <module>\npathomics.errors.StoreError: s1.zarr: 2 chunk file(s) missing\n')
    assert one_line(RuntimeError(message)) == "StoreError: s1.zarr: 2 chunk file(s) missing"
    assert one_line(PathomicsError("one line")) == "PathomicsError: one line"


def test_a_rerun_keeps_the_record_of_who_did_the_work(tmp_path):
    update_status(tmp_path, [StatusRow("s1", "tile", "done", 12.5, "", 300)])
    update_status(tmp_path, [StatusRow("s1", "tile", "skipped", 0.1), StatusRow("s2", "tile", "skipped", 0.1)])
    rows = {r.slide_id: r for r in read_status(tmp_path)}
    assert rows["s1"].state == "done" and rows["s1"].patches == 300 and rows["s2"].state == "skipped"
    update_status(tmp_path, [StatusRow("s1", "tile", "failed", 0.2, "gone")])
    assert {r.slide_id: r.state for r in read_status(tmp_path)}["s1"] == "failed"


def test_terminal_lines_carry_no_empty_rate_and_warnings_no_source_line(caplog) -> None:
    """`mil heatmap` printed "(0 patches/s)" per slide; warnings were printed with the source line that raised them."""
    import logging

    from pathomics.batch import progress
    from pathomics.cli.main import one_line_warning
    from pathomics.errors import FitWarning

    with caplog.at_level(logging.INFO, logger="pathomics"), progress("mil-heatmap", 1, True) as advance:
        advance("s1", "done", 0)
    assert caplog.messages == ["mil-heatmap [1/1] s1: done"]
    line = one_line_warning(FitWarning("the Cox fit did not converge"), FitWarning, "analysis.py", 242, "model.fit(train)")
    assert line == "FitWarning: the Cox fit did not converge\n"
