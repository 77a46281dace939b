"""`pathomics run` checks the encoder, the tables, the patient ids and the slide list before any slide is opened."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from pathomics.cli.main import main
from pathomics.embed import EmbedConfig, embed_slide
from pathomics.errors import CohortError, StoreError
from pathomics.layout import OutputLayout
from pathomics.manifest import SlideEntry, patient_ids_from_names, read_manifest
from pathomics.qc import QCConfig
from pathomics.runner.pipeline import write_labels
from pathomics.runner.preflight import resolve_encoder
from pathomics.survival.cohort import load_cohort
from pathomics.survival.config import SurvivalConfig
from pathomics.synthetic import write_cohort
from pathomics.tiling import TileConfig, tile_slide

TILE = TileConfig(target_mpp=2.0, patch_size=64, threads=1)
EMBED = EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=64, num_workers=0, input_size=64,
                    device="cpu")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_patients=4, seed=5, slide_size=(1024, 768), max_slides=1)


def run_argv(manifest, clinical, out, *extra: str) -> list[str]:
    return ["run", "--manifest", str(manifest), "--clinical", str(clinical), "--out", str(out), "--covariates", "age",
            "--mpp", "2.0", "--patch-size", "64", "--threads", "1", "--num-workers", "0", *extra]


def assert_refused_up_front(code: int, capsys, out, phrase: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert phrase in err[0], err
    assert not OutputLayout(out).tiles.exists()
    return err[0]


@pytest.mark.parametrize(("options", "phrase"), [
    (["--encoder", "uni-v2"], "unknown model 'uni-v2'"),
    (["--encoder", "timm:nonexistent_arch"], "not a timm architecture"),
    (["--encoder", "uni"], "no weights for uni"),
    (["--weights", "NOTES"], "is not a PyTorch state dict"),
])
def test_run_with_an_unusable_encoder_stops_before_tiling(cohort, tmp_path, monkeypatch, capsys, options, phrase):
    monkeypatch.setenv("PATHOMICS_WEIGHTS", str(tmp_path / "no-weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    notes = tmp_path / "notes.txt"
    notes.write_text("weights are on the lab share\n")
    options = [str(notes) if o == "NOTES" else o for o in options]
    code = main(run_argv(cohort.manifest, cohort.clinical, tmp_path / "out", *options))
    assert_refused_up_front(code, capsys, tmp_path / "out", phrase)


def test_slides_and_clinical_patients_are_matched_both_ways_before_slide_work(cohort, tmp_path, capsys):
    manifest = pd.read_csv(cohort.manifest)
    manifest["slide_path"] = [str(cohort.root / p) for p in manifest.slide_path]
    manifest.loc[0, "patient_id"] = "STRANGER"
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    code = main(run_argv(tmp_path / "manifest.csv", cohort.clinical, tmp_path / "out", "--weights", "random"))
    line = assert_refused_up_front(code, capsys, tmp_path / "out", "--missing drop")
    first = pd.read_csv(cohort.manifest).iloc[0]
    assert f"({first.slide_id})" in line and f"without a slide ({first.patient_id})" in line


def test_one_slide_file_under_two_slide_ids_is_refused(cohort, tmp_path, capsys):
    manifest = pd.read_csv(cohort.manifest)
    manifest["slide_path"] = [str(cohort.root / p) for p in manifest.slide_path]
    copy = tmp_path / "copy.svs"
    copy.write_bytes((cohort.root / manifest.slide_path[0]).read_bytes())
    twin = pd.DataFrame({"slide_path": [str(copy)], "slide_id": ["twin"], "patient_id": [manifest.patient_id[1]]})
    pd.concat([manifest, twin]).to_csv(tmp_path / "manifest.csv", index=False)
    code = main(run_argv(tmp_path / "manifest.csv", cohort.clinical, tmp_path / "out", "--weights", "random"))
    assert_refused_up_front(code, capsys, tmp_path / "out", "are the same slide file")


def test_slide_paths_without_a_manifest_say_how_to_give_patient_ids(cohort, tmp_path, capsys):
    slides = [str(p) for p in sorted((cohort.root / "slides").glob("*.svs"))]
    argv = run_argv(cohort.manifest, cohort.clinical, tmp_path / "out", "--weights", "random")
    argv[1:3] = slides
    assert_refused_up_front(main(argv), capsys, tmp_path / "out", "--patient-id-regex")


def test_patient_id_regex_takes_the_id_from_the_file_name(tmp_path):
    entries = [SlideEntry(tmp_path / "P0007_HE_2.svs", "P0007_HE_2"), SlideEntry(tmp_path / "x.svs", "x", "P9")]
    named = patient_ids_from_names(entries, r"^([^_]+)_")
    assert [e.patient_id for e in named] == ["P0007", "P9"]
    with pytest.raises(Exception, match="finds no patient id"):
        patient_ids_from_names([SlideEntry(tmp_path / "nounderscore.svs", "n")], r"^([^_]+)_")


def test_bags_take_only_feature_files_of_this_runs_encoder(cohort, tmp_path):
    entries = read_manifest(cohort.manifest)[:2]
    for e in entries:
        tile_slide(e.slide_path, tmp_path, TILE, slide_id=e.slide_id)
        embed_slide(OutputLayout(tmp_path).store(e.slide_id), tmp_path, EMBED)
    labels = pd.DataFrame({"slide_id": [e.slide_id for e in entries], "patient_id": [e.patient_id for e in entries],
                           "time": [1.0, 2.0], "event": [1, 0]})
    _, identity = resolve_encoder(EMBED)
    path, refused = write_labels(labels, tmp_path, identity)
    assert refused == [] and list(pd.read_csv(path).slide_id) == labels.slide_id.tolist()

    with h5py.File(OutputLayout(tmp_path).feature_file(entries[0].slide_id), "r+") as h5:
        h5.attrs["model"] = "resnet50-trunc"  # a file an earlier run left with another model
    path, refused = write_labels(labels, tmp_path, identity)
    assert list(pd.read_csv(path).slide_id) == [entries[1].slide_id]
    assert [(r.slide_id, r.state) for r in refused] == [(entries[0].slide_id, "failed")] and "model" in refused[0].error

    _, fp16 = resolve_encoder(EmbedConfig(**{**EMBED.__dict__, "precision": "bf16"}))
    with pytest.raises(CohortError, match="nothing trained"):
        write_labels(labels, tmp_path, fp16)


def test_a_slide_left_without_patches_by_qc_exclude_fails(cohort, tmp_path):
    entry = read_manifest(cohort.manifest)[0]
    tile_slide(entry.slide_path, tmp_path, TileConfig(**{**TILE.__dict__, "qc": QCConfig(min_focus=np.inf)}),
               slide_id=entry.slide_id)
    with pytest.raises(StoreError, match="nothing is left to embed"):
        embed_slide(OutputLayout(tmp_path).store(entry.slide_id), tmp_path, EmbedConfig(**{**EMBED.__dict__, "qc_exclude": ("blur",)}))
    assert not OutputLayout(tmp_path).feature_file(entry.slide_id).exists()


def test_impute_fills_a_blank_category_with_its_most_frequent_level(cohort, tmp_path):
    table = pd.read_csv(cohort.clinical)
    table["stage"] = ["II", "II", "III", None][: len(table)]
    cohort_data = load_cohort(SurvivalConfig(covariates=("age", "stage"), missing="impute"), table)
    assert cohort_data.data["stage"].tolist() == ["II", "II", "III", "II"]


def test_evaluate_names_no_option_it_lacks(tmp_path):
    table = pd.DataFrame({"patient_id": ["P1"], "time": [1.0], "event": [1]})
    with pytest.raises(CohortError) as error:
        load_cohort(SurvivalConfig(covariates=("age",)), table, hint="the model set was fitted on these columns")
    assert "--covariates" not in str(error.value) and "'age'" in str(error.value)
