"""Exports read back by the software users open them with: the GeoJSON checked against a schema of what QuPath
(0.4 and later) imports as detection objects, with shapely; the .h5ad files with anndata."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box, shape

from pathomics.cli.main import main
from pathomics.embed import EmbedConfig, embed_slide
from pathomics.errors import ConfigError
from pathomics.export import export_anndata, export_qupath
from pathomics.layout import OutputLayout
from pathomics.manifest import read_manifest
from pathomics.mil import MILConfig, read_attention, train_mil
from pathomics.mil.artifacts import SlideResult, write_attention
from pathomics.qc import QCConfig, read_qc
from pathomics.store import open_patch_store, read_feature_file
from pathomics.synthetic import write_cohort
from pathomics.tiling import TileConfig, tile_slide

# fold flags every patch denser than the slide's median with any tissue at doubled density: a real QC run with failures
TILE = TileConfig(target_mpp=2.0, patch_size=64, threads=1, qc=QCConfig(max_fold=0.0, min_fold_density=1.0))
EMBED = EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=64, num_workers=0, input_size=64)
MIL = MILConfig(task="survival", folds=2, epochs=2, batch_size=4, hidden_dim=8, model_options=(("attention_dim", 8),),
                refit=False, ensemble=1, device="cpu")

COLOR = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 255}}
POSITION = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}
# What QuPath's GeoJSON import reads as a detection: properties.objectType, measurements as a flat name -> number
# mapping (read as doubles: no null), classification {name, color [r, g, b]}
QUPATH_DETECTIONS = {
    "type": "object", "required": ["type", "features"],
    "properties": {"type": {"const": "FeatureCollection"}, "features": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["type", "geometry", "properties"],
        "properties": {
            "type": {"const": "Feature"},
            "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                "type": {"const": "Polygon"},
                "coordinates": {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 4, "items": POSITION}}}},
            "properties": {"type": "object", "required": ["objectType"], "properties": {
                "objectType": {"const": "detection"},
                "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                "classification": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "color": COLOR}}}}}}}},
}
TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int}


def violations(value, schema: dict, where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON Schema keywords used above: type, const, required, properties,
    additionalProperties, items, minItems, maxItems, minimum, maximum)."""
    kind = schema.get("type")
    if kind and (not isinstance(value, TYPES[kind]) or isinstance(value, bool)
                 or (kind == "number" and not math.isfinite(value))):
        return [f"{where}: not a finite {kind}" if kind == "number" else f"{where}: not {kind}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} is not {schema['const']!r}"]
    if not (schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)) if kind in ("number", "integer") else False:
        return [f"{where}: {value} out of range"]
    found = []
    if kind == "object":
        found += [f"{where}: {key} missing" for key in schema.get("required", ()) if key not in value]
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties", {}))
            found += [f"{where}.{key}: not allowed"] if sub is False else violations(item, sub, f"{where}.{key}")
    if kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
            found.append(f"{where}: {len(value)} items")
        for i, item in enumerate(value):
            found += violations(item, schema.get("items", {}), f"{where}[{i}]")
    return found


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    """Six slides tiled (with QC), embedded and cross-validated by a tiny attention MIL on survival labels; the last
    slide embedded without its fold-flagged patches (``--qc-exclude fold``), so its bag is a subset of its store."""

    root = tmp_path_factory.mktemp("export")
    cohort = write_cohort(root / "cohort", n_patients=6, seed=5, slide_size=(2048, 1536), max_slides=1)
    out, entries = root / "out", read_manifest(cohort.manifest)
    for i, entry in enumerate(entries):
        tile_slide(entry.slide_path, out, TILE, slide_id=entry.slide_id)
        config = replace(EMBED, qc_exclude=("fold",)) if i == len(entries) - 1 else EMBED
        embed_slide(OutputLayout(out).store(entry.slide_id), out, config)
    clinical = pd.read_csv(cohort.clinical, dtype={"patient_id": str})
    slides = pd.DataFrame({"slide_id": [e.slide_id for e in entries], "patient_id": [e.patient_id for e in entries]})
    labels = root / "labels.csv"
    slides.merge(clinical[["patient_id", "time", "event"]], on="patient_id").to_csv(labels, index=False)
    train_mil(OutputLayout(out).features, labels, out, MIL)
    shutil.copy(cohort.clinical, root / "clinical.csv")
    return out


def by_xy(table: pd.DataFrame, columns: list[str]) -> dict[tuple[int, int], tuple]:
    return {(int(r[0]), int(r[1])): tuple(r[2:]) for r in table[["x", "y", *columns]].itertuples(index=False)}


def test_qupath_detections_match_the_schema_the_stores_attention_and_qc(run_out):
    layout = OutputLayout(run_out)
    result = export_qupath(run_out)
    assert result.notes == () and len(result.paths) == 6
    subset_seen = False
    for slide_id in layout.store_ids():
        text = layout.qupath_geojson(slide_id).read_text()
        collection = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
        assert violations(collection, QUPATH_DETECTIONS) == []
        store = open_patch_store(layout.store(slide_id))
        size = int(store.attrs["patch_size_level0"])
        features = collection["features"]
        assert len(features) == len(store)
        for (x, y), feature in zip(store.coords.tolist(), features):
            assert shape(feature["geometry"]).equals(box(x, y, x + size, y + size))
        attention = read_attention(layout.attention_file(slide_id))
        expected = dict(zip(map(tuple, attention.coords.tolist()), attention.attention.tolist()))
        qc, _ = read_qc(layout.qc_table(slide_id))
        for (x, y), feature, row in zip(store.coords.tolist(), features, qc.itertuples(index=False)):
            values = feature["properties"]["measurements"]
            assert values["risk"] == pytest.approx(attention.risk)
            assert values.get("attention") == (pytest.approx(expected[(x, y)]) if (x, y) in expected else None)
            assert (values["focus"], values["fold"], values["flag_fold"]) == (pytest.approx(row.focus), pytest.approx(row.fold), float(row.flag_fold))
            assert ("classification" in feature["properties"]) == (not row.qc_pass)
        failed = [f["properties"]["classification"] for f in features if "classification" in f["properties"]]
        assert {"name": "QC fold", "color": [220, 0, 0]} in failed  # max_fold 1.0 fails about half the patches
        subset_seen |= len(expected) < len(store)
    assert subset_seen  # the slide embedded without its fold patches: those have no attention measurement


def test_anndata_files_read_back_with_features_attention_qc_signatures_and_clinical(run_out):
    layout = OutputLayout(run_out)
    clinical = run_out.parent / "clinical.csv"
    result = export_anndata(run_out, clinical)
    assert result.notes == () and layout.anndata_slides in result.paths
    slides = anndata.read_h5ad(layout.anndata_slides)
    signatures = pd.read_parquet(layout.signatures).set_index("slide_id")
    assert slides.n_obs == len(signatures) == 6
    sig = signatures.loc[slides.obs_names, [c for c in signatures.columns if c.startswith("sig_")]]
    np.testing.assert_allclose(slides.obsm["signature"], sig.to_numpy(np.float32))
    np.testing.assert_allclose(slides.obs["risk"], signatures.loc[slides.obs_names, "risk"])
    table = pd.read_csv(clinical, dtype={"patient_id": str}).set_index("patient_id")
    np.testing.assert_allclose(slides.obs["age"], table.loc[slides.obs["patient_id"].astype(str), "age"])
    assert slides.uns["signatures"]["config"]["task"] == "survival"

    for slide_id in layout.feature_ids():
        patches = anndata.read_h5ad(layout.anndata_patches(slide_id))
        features = read_feature_file(layout.feature_file(slide_id))
        assert patches.obsm["features"].shape == features.features.shape
        np.testing.assert_array_equal(patches.obsm["features"], features.features)
        np.testing.assert_array_equal(patches.obs[["x", "y"]].to_numpy(), features.coords)
        np.testing.assert_array_equal(patches.obsm["spatial"], features.coords)
        attention = read_attention(layout.attention_file(slide_id))
        np.testing.assert_allclose(patches.obs["attention"], attention.attention)
        qc, _ = read_qc(layout.qc_table(slide_id))
        expected = by_xy(qc, ["focus", "flag_fold"])
        assert [expected[xy] for xy in map(tuple, features.coords.tolist())] == \
            list(zip(patches.obs["focus"].tolist(), patches.obs["flag_fold"].tolist()))
        assert patches.uns["encoder"]["model"] == "shufflenet-v2" and patches.uns["coords"]["patch_size"] == 64
        assert patches.uns["attention"]["model"] == "abmil"


def test_a_run_without_mil_exports_what_it_has_and_says_what_it_left_out(run_out, tmp_path, capsys):
    for folder in ("tiles", "qc", "features"):
        shutil.copytree(run_out / folder, tmp_path / folder)
    layout = OutputLayout(tmp_path)
    assert main(["export", "qupath", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 file(s)" in printed and "6 slide(s)" in printed and "attention and risk left out" in printed
    collection = json.loads(layout.qupath_geojson(layout.store_ids()[0]).read_text())
    assert violations(collection, QUPATH_DETECTIONS) == []
    assert not {"attention", "risk"} & set(collection["features"][0]["properties"]["measurements"])

    assert main(["export", "anndata", str(tmp_path), "--slide-id", layout.feature_ids()[0]]) == 0
    printed = capsys.readouterr().out
    assert "no signatures.parquet" in printed and "attention left out" in printed
    assert not layout.anndata_slides.exists()
    patches = anndata.read_h5ad(layout.anndata_patches(layout.feature_ids()[0]))
    assert "attention" not in patches.obs and "focus" in patches.obs


def test_an_attention_file_from_another_tiling_is_one_clear_error(run_out, tmp_path, capsys):
    for folder in ("tiles", "qc"):
        shutil.copytree(run_out / folder, tmp_path / folder)
    layout = OutputLayout(tmp_path)
    slide_id = layout.store_ids()[0]
    coords = open_patch_store(layout.store(slide_id)).coords + 7  # patches this store does not have
    write_attention(layout.attention_file(slide_id), SlideResult(slide_id, "P", 0, 0.5, np.zeros(4), np.full(len(coords), 0.1), coords),
                    "abmil", {})
    assert main(["export", "qupath", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert str(layout.attention_file(slide_id)) in message and "re-run" in message and "Traceback" not in message


def test_the_schema_check_rejects_what_qupath_would_not_read_as_detections():
    ring = [[0, 0], [1, 0], [1, 1], [0, 0]]
    good = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                                                       "properties": {"objectType": "detection", "measurements": {"a": 1.0}}}]}
    assert violations(good, QUPATH_DETECTIONS) == []
    for broken in ({"objectType": "annotation"}, {"objectType": "detection", "measurements": [{"name": "a", "value": 1}]},
                   {"objectType": "detection", "measurements": {"a": None}}, {"objectType": "detection", "measurements": {"a": math.nan}},
                   {"objectType": "detection", "classification": {"name": "QC fold", "color": [300, 0, 0]}}):
        feature = {**good["features"][0], "properties": broken}
        assert violations({**good, "features": [feature]}, QUPATH_DETECTIONS), broken


def test_clinical_rows_join_by_the_named_patient_column_and_a_wrong_name_is_one_clear_error(run_out, tmp_path, capsys):
    shutil.copytree(run_out / "features", tmp_path / "features")
    shutil.copy(OutputLayout(run_out).signatures, OutputLayout(tmp_path).signatures)
    clinical = pd.read_csv(run_out.parent / "clinical.csv", dtype={"patient_id": str}).rename(columns={"patient_id": "case"})
    clinical.iloc[1:].to_csv(tmp_path / "clinical.csv", index=False)  # the first patient has no clinical row

    assert main(["export", "anndata", str(tmp_path), "--clinical", str(tmp_path / "clinical.csv")]) == 2
    message = capsys.readouterr().err.strip()
    assert "clinical.csv" in message and "--patient-col" in message and len(message.splitlines()) == 1

    assert main(["export", "anndata", str(tmp_path), "--clinical", str(tmp_path / "clinical.csv"), "--patient-col", "case"]) == 0
    assert "1 slide(s) have no row in clinical.csv" in capsys.readouterr().out
    slides = anndata.read_h5ad(OutputLayout(tmp_path).anndata_slides)
    assert slides.obs["age"].isna().sum() == 1 and "case" not in slides.obs


def test_a_slide_named_like_the_slides_file_is_refused_before_anything_is_written(run_out, tmp_path):
    layout = OutputLayout(tmp_path)
    layout.features.mkdir()
    shutil.copy(OutputLayout(run_out).feature_file(OutputLayout(run_out).feature_ids()[0]), layout.feature_file("slides"))
    shutil.copy(OutputLayout(run_out).signatures, layout.signatures)
    with pytest.raises(ConfigError, match="would overwrite slides.h5ad"):
        export_anndata(tmp_path)
    assert not layout.export.exists()
