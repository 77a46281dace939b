"""The error and config contract: bad options and inputs end in one line and exit 2, never a traceback,
and a programming error is never recorded as a failed slide."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pandas as pd
import pytest

from pathomics.cli.common import FLAG_ACTIONS, config_from_args, shown_default
from pathomics.cli.reference import commands
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


def test_a_new_slides_status_row_is_appended_and_another_writers_rows_are_kept(tmp_path):
    """A batch's status rows cost the same for its 5,000th slide as for its first: a new slide's row is appended to
    the file this process left (same inode; the whole table was rewritten before), a replaced row rewrites it, and
    rows another process wrote in between are read, never lost."""
    import pathomics.batch as batch

    path = OutputLayout(tmp_path).status
    update_status(tmp_path, [StatusRow("s1", "tile", "done", 1.0, "", 10)])
    inode = path.stat().st_ino
    update_status(tmp_path, [StatusRow("s2", "tile", "failed", 0.5, "bad, \"quoted\" slide")])
    assert path.stat().st_ino == inode  # appended
    update_status(tmp_path, [StatusRow("s2", "tile", "done", 2.0, "", 20)])
    assert path.stat().st_ino != inode  # replaced: rewritten atomically
    other = path.read_text() + "s9,tile,done,3.0,,30\r\n"  # another process's run, written its way (atomically)
    path.with_name("other.tmp").write_text(other)
    path.with_name("other.tmp").replace(path)
    update_status(tmp_path, [StatusRow("s3", "tile", "done", 4.0, "", 40)])
    assert [(r.slide_id, r.state, r.patches) for r in read_status(tmp_path)] == [
        ("s1", "done", 10), ("s2", "done", 20), ("s9", "done", 30), ("s3", "done", 40)]

    batch._written.clear()  # a later process finds the row a killed append cut short
    with path.open("a", newline="") as fh:
        fh.write("s4,tile,do")
    assert [r.slide_id for r in read_status(tmp_path)] == ["s1", "s2", "s9", "s3"]
    update_status(tmp_path, [StatusRow("s5", "tile", "done", 5.0, "", 50)])
    assert [r.slide_id for r in read_status(tmp_path)] == ["s1", "s2", "s9", "s3", "s5"]
    assert "s4" not in path.read_text()


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


# --- one CLI vocabulary: every rule below walks every command's parser ---

def every_option() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    """(command, its parser, option) for every option of every command and sub-command."""
    return [(name, parser, action) for name, parser in commands(build_parser())
            for action in parser._actions if action.option_strings and not isinstance(action, argparse._HelpAction)]


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help as --help prints it, on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split()) if action.help else ""


def test_every_command_has_a_description():
    assert [name for name, parser in commands(build_parser()) if not parser.description] == []


def test_every_option_has_help_that_states_its_default():
    """Flags and required options aside, --help says what an option left out does, as "(default: X)" or in words."""
    silent = [f"{name} {action.option_strings[0]}" for name, parser, action in every_option() if not action.help]
    assert silent == []
    undefaulted = [f"{name} {action.option_strings[0]}" for name, parser, action in every_option()
                   if not action.required and not isinstance(action, FLAG_ACTIONS) and "default" not in shown_help(parser, action)]
    assert undefaulted == []


def test_model_means_the_encoder_and_model_dir_a_fitted_model():
    meanings = {(name, tuple(action.option_strings)) for name, _, action in every_option()
                if {"--model", "--model-dir", "--aggregator"} & set(action.option_strings)}
    assert all("--encoder" in flags for _, flags in meanings if "--model" in flags)
    assert {name for name, flags in meanings if "--model-dir" in flags} == {"pathomics mil predict",
                                                                            "pathomics survival evaluate"}
    assert {name for name, flags in meanings if "--aggregator" in flags} == {"pathomics mil train", "pathomics run"}


@pytest.mark.parametrize("flag", ["--folds", "--patient-col", "--time-col", "--event-col", "--device", "--fusion",
                                  "--seed", "--aggregator", "--encoder", "--covariates"])
def test_an_option_has_one_default_and_one_set_of_choices_in_every_command(flag):
    seen = {(str(shown_default(action)), tuple(action.choices or ())) for _, _, action in every_option()
            if flag in action.option_strings}
    assert len(seen) == 1, seen


def test_aggregate_names_the_same_reductions_in_mil_and_survival():
    """A patient's slides are combined by mean, median or max in both; MIL alone can also score slides (none)."""
    choices = {name: tuple(action.choices) for name, _, action in every_option() if "--aggregate" in action.option_strings}
    assert choices["pathomics mil train"] == (*choices["pathomics survival fit"], "none")
    assert choices["pathomics run"] == choices["pathomics survival fit"]


def test_column_options_end_in_col_and_slide_ids_are_slide_id():
    columns = [flags for _, _, action in every_option() if action.dest.endswith("_col")
               for flags in [action.option_strings] if not all(f.endswith("-col") for f in flags)]
    assert columns == []
    flags = {flag for _, _, action in every_option() for flag in action.option_strings}
    assert not flags & {"--slides", "--mil-folds", "--mil-epochs", "--id-col", "--time", "--event"}
    assert {tuple(a.option_strings) for _, _, a in every_option() if a.dest == "slide_ids"} == {("--slide-id",)}


def test_device_accepts_cuda_n_wherever_it_is_an_option():
    from pathomics.embed import EmbedConfig
    from pathomics.mil import MILConfig

    devices = [action for _, _, action in every_option() if "--device" in action.option_strings]
    assert len(devices) >= 4 and all(action.choices is None for action in devices)
    assert MILConfig(device="cuda:1").device == EmbedConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match="device must be"):
        MILConfig(device="gpu")


def test_choices_come_from_the_library_registries():
    from pathomics.mil import list_aggregators
    from pathomics.qc import FLAGS as QC_FLAGS
    from pathomics.slide import BACKENDS

    choices = {flag: tuple(action.choices or ()) for _, _, action in every_option() for flag in action.option_strings}
    assert choices["--backend"] == ("auto", *BACKENDS)
    assert choices["--aggregator"] == tuple(list_aggregators())
    parser = dict(commands(build_parser()))["pathomics embed"]
    qc = next(a for a in parser._actions if "--qc-exclude" in a.option_strings)
    assert ", ".join(QC_FLAGS) in shown_help(parser, qc)
    encoder = next(a for a in parser._actions if "--encoder" in a.option_strings)
    from pathomics.encoders.backbones import family_patterns, list_backbones

    help_text = shown_help(parser, encoder)
    assert ", ".join(list_backbones()) in help_text and ", ".join(family_patterns()) in help_text


def test_survival_fit_needs_no_covariates():
    """A radiology- or pathology-only study leaves --covariates out (it was required, '' for none)."""
    from pathomics.cli.survival import survival_config

    args = build_parser().parse_args(["survival", "fit", "--clinical", "c.csv", "--radiology", "r.csv", "--out", "o"])
    assert survival_config(args).covariates == ()
