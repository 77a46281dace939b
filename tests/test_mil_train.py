"""The MIL stage end to end on synthetic feature files: known answers, outputs, bad input, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers.mil import PATCH, grid_coords, witness_cohort, write_bag
from PIL import Image
from sklearn.metrics import roc_auc_score

from pathomics.cli.main import main
from pathomics.errors import CohortError, ConfigError, ModelError, StoreError
from pathomics.io import recorded_digest
from pathomics.layout import OutputLayout
from pathomics.mil import (
    MILConfig,
    MILEnsemble,
    draw_heatmap,
    export_signatures,
    load_bags,
    load_trained,
    predict_mil,
    read_attention,
    render_heatmap,
    render_heatmaps,
    train_mil,
)
from pathomics.batch import DONE, FAILED, SKIPPED
from pathomics.store import STORE_ATTRS, PatchStoreWriter, read_feature_file

KNOWN_ANSWER = MILConfig(folds=3, epochs=40, patience=8, min_epochs=20, lr=1e-3, batch_size=4, hidden_dim=128,
                         dropout=0.1, refit=False, ensemble=1)
TINY = MILConfig(folds=3, epochs=3, batch_size=4, hidden_dim=8, model_options=(("attention_dim", 8),), ensemble=1)
TINY_OPTIONS = {"mean": (), "max": (), "transmil": (("heads", 2), ("landmarks", 16))}  # others: TINY's


@pytest.fixture(scope="module")
def witness_classification(tmp_path_factory):
    """120 slides of 80–160 16-d patches; positive slides hold 1–5% witnesses shifted by 5 sd on one axis."""
    return witness_cohort(tmp_path_factory.mktemp("witness"), n_slides=120, shift=5.0)


@pytest.fixture(scope="module")
def known_answer_runs(witness_classification, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {m: train_mil(witness_classification.features, witness_classification.labels, out / m,
                         replace(KNOWN_ANSWER, model=m))
            for m in ("mean", "abmil", "gated-abmil")}


@pytest.fixture()
def tiny(tmp_path):
    """24 slides of 8-d features, two per patient."""
    return witness_cohort(tmp_path, n_slides=24, dim=8, patches=(20, 40), slides_per_patient=2)


def instance_auc(run_dir: Path, witnesses: dict[str, np.ndarray]) -> float:
    """Mean over witness-holding slides of the AUC of attention for telling witnesses from the rest."""
    aucs = [roc_auc_score(mask, read_attention(run_dir / "attention" / f"{sid}.h5").attention)
            for sid, mask in witnesses.items() if mask.any()]
    return float(np.mean(aucs))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["abmil", "gated-abmil"])
def test_attention_finds_rare_witnesses(model, known_answer_runs, witness_classification):
    run = known_answer_runs[model]
    assert run.metrics["pooled_out_of_fold"]["auc"] >= 0.95
    assert instance_auc(run.out_dir, witness_classification.witnesses) >= 0.9


@pytest.mark.slow
def test_mean_pooling_is_clearly_worse(known_answer_runs):
    mean = known_answer_runs["mean"].metrics["pooled_out_of_fold"]["auc"]
    assert mean <= 0.9
    assert mean <= min(known_answer_runs[m].metrics["pooled_out_of_fold"]["auc"] for m in ("abmil", "gated-abmil")) - 0.1


@pytest.mark.slow
def test_survival_from_witness_density(tmp_path):
    """Witness density sets the hazard; the Cox-trained ABMIL ranks held-out patients by it."""
    cohort = witness_cohort(tmp_path, task="survival", n_slides=160, shift=5.0)
    config = MILConfig(task="survival", folds=3, epochs=25, val_fraction=0.0, lr=2e-3, batch_size=8,
                       hidden_dim=128, dropout=0.5, weight_decay=0.1, refit=False, ensemble=1)
    run = train_mil(cohort.features, cohort.labels, tmp_path / "run", config)
    assert run.metrics["pooled_out_of_fold"]["c_index"] >= 0.7
    assert run.metrics["summary"]["c_index"]["mean"] >= 0.7


def test_outputs_follow_the_design(tiny, tmp_path):
    config = replace(TINY, model="clam-sb", model_options=(("attention_dim", 8), ("k", 4)))
    run = train_mil(tiny.features, tiny.labels, tmp_path / "run", config)
    out = run.out_dir
    signatures = pd.read_parquet(out / "signatures.parquet")
    assert list(signatures.columns) == ["slide_id", "patient_id", "risk", *[f"sig_{i}" for i in range(8)], "model", "fold"]
    assert sorted(signatures["slide_id"]) == sorted(tiny.table["slide_id"])
    assert (signatures["model"] == "clam-sb").all() and set(signatures["fold"]) == {0, 1, 2}
    assert signatures.groupby("patient_id")["fold"].nunique().max() == 1  # patients never straddle folds
    assert signatures["risk"].between(0, 1).all()
    assert json.loads(pq.read_schema(out / "signatures.parquet").metadata[b"pathomics"])["config"]["model"] == "clam-sb"
    for slide_id, mask in tiny.witnesses.items():
        with h5py.File(out / "attention" / f"{slide_id}.h5") as h5:
            assert h5["attention"].shape == (len(mask),) and h5["coords"].shape == (len(mask), 2)
            assert h5["attention"][:].sum() == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_array_equal(h5["coords"][:], grid_coords(len(mask)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [0, 1, 2]
    assert set(metrics["summary"]) == {"auc", "balanced_accuracy"} and set(metrics["summary"]["auc"]) == {"mean", "sd"}
    assert metrics["unit"] == "patient" and metrics["pooled_out_of_fold"]["n"] == 12
    assert MILConfig.from_dict(json.loads((out / "mil_config.json").read_text())["config"]) == config
    checkpoints = ["final.pt", "fold_0.pt", "fold_1.pt", "fold_2.pt"]
    assert sorted(p.name for p in (out / "mil_models").iterdir()) == sorted(
        [*checkpoints, *(f"{name}.sha256" for name in checkpoints), "splits.json"])
    trained = load_trained(out)
    assert trained.fold == -1 and trained.config == config and trained.model.in_dim == 8


def test_a_changed_feature_file_or_config_retrains_the_folds(tiny, tmp_path):
    out = tmp_path / "run"
    train_mil(tiny.features, tiny.labels, out, TINY)
    layout = OutputLayout(out)
    before = {f: layout.fold_checkpoint(f).stat().st_mtime_ns for f in range(3)}
    train_mil(tiny.features, tiny.labels, out, replace(TINY, lr=5e-4))
    assert all(layout.fold_checkpoint(f).stat().st_mtime_ns != before[f] for f in range(3))
    again = {f: layout.fold_checkpoint(f).stat().st_mtime_ns for f in range(3)}
    write_bag(tiny.out, "s000_0", np.ones((12, 8), np.float32))  # a slide of fold k's training set changed
    train_mil(tiny.features, tiny.labels, out, replace(TINY, lr=5e-4))
    assert sum(layout.fold_checkpoint(f).stat().st_mtime_ns != again[f] for f in range(3)) >= 2


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_with_one_line_and_retrained_by_a_rerun(tiny, tmp_path):
    """A truncated checkpoint gave torch's error with no advice; one whose bytes changed loaded as if intact."""
    out = tmp_path / "run"
    train_mil(tiny.features, tiny.labels, out, TINY)
    layout = OutputLayout(out)
    final, fold = layout.final_checkpoint, layout.fold_checkpoint(0)
    final.write_bytes(final.read_bytes()[:1000])
    recorded_digest(final).unlink()  # as a checkpoint copied without its recorded SHA-256: unpickling fails
    data = bytearray(fold.read_bytes())
    data[-200:-100] = bytes(100)  # inside the zip's last records: torch may still load it
    fold.write_bytes(bytes(data))
    for path, words in ((final, "cannot be read"), (fold, "SHA-256 differs")):
        with pytest.raises(ModelError) as refused:
            predict_mil(path, tiny.features, tmp_path / "predicted", show_progress=False)
        message = str(refused.value)
        assert str(path) in message and words in message and "re-run `pathomics mil train`" in message
        assert "\n" not in message
    untouched = {f: layout.fold_checkpoint(f).stat().st_mtime_ns for f in (1, 2)}
    train_mil(tiny.features, tiny.labels, out, TINY)
    assert load_trained(fold).fold == 0 and load_trained(out).fold == -1  # both retrained, intact again
    assert {f: layout.fold_checkpoint(f).stat().st_mtime_ns for f in (1, 2)} == untouched


@pytest.mark.slow
def test_mil_train_shows_fold_and_epoch_on_a_terminal_and_nothing_more_elsewhere(tiny, tmp_path):
    """Cross-validation showed nothing between one fold's metrics and the next."""
    import os
    import pty
    import subprocess
    import sys

    def train(out: Path, stderr: int) -> subprocess.Popen:
        argv = ["mil", "train", "--features", str(tiny.features), "--labels", str(tiny.labels), "--out", str(out),
                "--folds", "2", "--epochs", "2", "--hidden-dim", "8", "--ensemble", "1", "--no-refit", "--device", "cpu"]
        return subprocess.Popen([sys.executable, "-m", "pathomics.cli.main", *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "TERM": "xterm"})

    terminal, secondary = pty.openpty()
    process = train(tmp_path / "tty", secondary)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 1 << 16)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert process.wait() == 0
    text = shown.decode(errors="replace")
    assert "mil abmil fold 1/2" in text and "mil abmil fold 2/2" in text and "epoch 2/2" in text, text[-2000:]
    piped = train(tmp_path / "pipe", subprocess.PIPE)
    _, err = piped.communicate()
    assert piped.returncode == 0 and "epoch" not in err.decode() and "Traceback" not in err.decode()


@pytest.mark.parametrize("model", ["mean", "max", "abmil", "gated-abmil", "clam-sb", "transmil"])
def test_training_is_deterministic(model, tiny, tmp_path):
    config = replace(TINY, model=model, model_options=TINY_OPTIONS.get(model, TINY.model_options), max_patches=16,
                     refit=False, epochs=2)
    first = train_mil(tiny.features, tiny.labels, tmp_path / "a", config).signatures
    second = train_mil(tiny.features, tiny.labels, tmp_path / "b", config).signatures
    pd.testing.assert_frame_equal(first, second, check_exact=True)


def test_features_are_standardised_so_their_scale_does_not_matter(tiny, tmp_path):
    """Random-weight backbones emit features ~1e-6 in size, trained ones ~1e2: the model sees both the same."""
    rescaled = tmp_path / "rescaled"
    for path in sorted(tiny.features.glob("*.h5")):
        bag = read_feature_file(path)
        write_bag(rescaled, path.stem, (bag.features + 3.0) * 1e-6, bag.coords)
    config = replace(TINY, epochs=5)
    original = train_mil(tiny.features, tiny.labels, tmp_path / "a", config)
    scaled = train_mil(rescaled / "features", tiny.labels, tmp_path / "b", config)
    np.testing.assert_allclose(scaled.signatures["risk"], original.signatures["risk"], atol=1e-3)
    everyone = np.concatenate([read_feature_file(p).features for p in sorted(rescaled.glob("features/*.h5"))])
    model = load_trained(tmp_path / "b").model  # refit on every patient: standardised with all their patches
    np.testing.assert_allclose(model.feature_mean.numpy(), everyone.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.feature_scale.numpy(), everyone.std(0), rtol=1e-3)


@pytest.mark.parametrize("options", [{"survival_loss": "cox", "ties": "breslow"},
                                     {"survival_loss": "discrete", "time_bins": 3}])
def test_survival_losses_train_and_report_c_index(options, tmp_path):
    cohort = witness_cohort(tmp_path, task="survival", n_slides=30, dim=8, patches=(20, 40))
    run = train_mil(cohort.features, cohort.labels, tmp_path / "run", replace(TINY, task="survival", refit=False, **options))
    assert set(run.metrics["summary"]) == {"c_index"}
    assert 0 <= run.metrics["pooled_out_of_fold"]["c_index"] <= 1
    assert run.metrics["pooled_out_of_fold"]["events"] == cohort.table["event"].sum()


def test_predict_reuses_finished_slides_and_isolates_failures(tiny, tmp_path):
    train_mil(tiny.features, tiny.labels, tmp_path / "run", TINY)
    new = tmp_path / "new"
    rng = np.random.default_rng(5)
    for i in range(3):
        write_bag(new, f"new{i}", rng.standard_normal((30, 8)).astype(np.float32))
    write_bag(new, "wrongdim", rng.standard_normal((30, 5)).astype(np.float32))
    rows = predict_mil(tmp_path / "run", new / "features", tmp_path / "pred", patients={"new0": "pA", "new1": "pA"},
                       show_progress=False)
    assert {r.slide_id: r.state for r in rows} == {"new0": DONE, "new1": DONE, "new2": DONE, "wrongdim": FAILED}
    assert "features (30, 5) do not fit a model trained on 8-dimensional" in rows[-1].error
    signatures = pd.read_parquet(tmp_path / "pred" / "signatures.parquet")
    assert list(signatures["slide_id"]) == ["new0", "new1", "new2"] and (signatures["fold"] == -1).all()
    assert list(signatures["patient_id"]) == ["pA", "pA", "new2"]
    again = predict_mil(tmp_path / "run", new / "features", tmp_path / "pred", slide_ids=["new0", "new2"],
                        patients={"new0": "pA"}, show_progress=False)
    assert [r.state for r in again] == [SKIPPED, SKIPPED]
    assert len(pd.read_parquet(tmp_path / "pred" / "signatures.parquet")) == 3  # earlier slides stay listed
    damaged = OutputLayout(tmp_path / "pred").attention_file("new2")  # was a failed slide, then an h5py traceback
    damaged.write_bytes(damaged.read_bytes()[:500])
    redone = predict_mil(tmp_path / "run", new / "features", tmp_path / "pred", slide_ids=["new0", "new2"],
                         patients={"new0": "pA"}, show_progress=False)
    assert [r.state for r in redone] == [SKIPPED, DONE] and read_attention(damaged).slide_id == "new2"
    per_patient = pd.read_csv(export_signatures(tmp_path / "pred", tmp_path / "patients.csv", per_patient=True))
    assert list(per_patient["patient_id"]) == ["new2", "pA"] and list(per_patient["n_slides"]) == [1, 2]
    assert per_patient.loc[1, "risk"] == pytest.approx(signatures["risk"][:2].mean())


def test_predict_matches_the_fold_model_on_its_held_out_slides(tiny, tmp_path):
    run = train_mil(tiny.features, tiny.labels, tmp_path / "run", replace(TINY, refit=False))
    held_out = run.signatures[run.signatures["fold"] == 0]
    predict_mil(tmp_path / "run" / "mil_models" / "fold_0.pt", tiny.features, tmp_path / "pred",
                slide_ids=list(held_out["slide_id"]), show_progress=False)
    again = pd.read_parquet(tmp_path / "pred" / "signatures.parquet")
    np.testing.assert_allclose(again["risk"], held_out["risk"], rtol=1e-5)


def test_ensemble_size_follows_the_cohort_unless_set():
    assert [MILConfig().ensemble_size(n) for n in (20, 52, 180, 493, 2000)] == [5, 5, 3, 1, 1]
    assert MILConfig(ensemble=2).ensemble_size(2000) == 2
    with pytest.raises(ConfigError, match="ensemble must be None or positive"):
        MILConfig(ensemble=0)


def test_an_ensemble_averages_seeded_members_and_survives_its_checkpoint(tiny, tmp_path):
    run = train_mil(tiny.features, tiny.labels, tmp_path / "run", replace(TINY, ensemble=3, refit=False))
    train_mil(tiny.features, tiny.labels, tmp_path / "single", replace(TINY, refit=False))
    ensemble = load_trained(tmp_path / "run" / "mil_models" / "fold_0.pt").model
    single = load_trained(tmp_path / "single" / "mil_models" / "fold_0.pt").model
    assert isinstance(ensemble, MILEnsemble) and len(ensemble.members) == 3
    first, second = (m.state_dict()["head.weight"] for m in ensemble.members[:2])
    assert torch.equal(first, single.state_dict()["head.weight"])  # member 0: the single model's seed
    assert not torch.equal(first, second)  # the others: seeds of their own
    features, coords = (torch.from_numpy(a) for a in load_bags(tiny.features, tiny.labels, TINY).bags[0].load())
    with torch.no_grad():
        whole, parts = ensemble(features.float(), coords), [m(features.float(), coords) for m in ensemble.members]
    torch.testing.assert_close(whole.scores, torch.stack([p.scores for p in parts]).mean(0))
    assert float(whole.attention.sum()) == pytest.approx(1.0) and whole.embedding.shape == (3 * 8,)
    held_out = run.signatures[run.signatures["fold"] == 0]
    predict_mil(tmp_path / "run" / "mil_models" / "fold_0.pt", tiny.features, tmp_path / "pred",
                slide_ids=list(held_out["slide_id"]), show_progress=False)
    again = pd.read_parquet(tmp_path / "pred" / "signatures.parquet")
    np.testing.assert_allclose(again["risk"], held_out["risk"], rtol=1e-5)


def test_heatmap_colours_attended_patches(tmp_path):
    thumb = Image.new("RGB", (64, 48), (128, 128, 128))
    coords = np.array([[0, 0], [2048, 1024]])
    image = np.asarray(draw_heatmap(thumb, (4096, 3072), coords, 1024, np.array([0.1, 0.9]), alpha=1.0))
    assert image.shape == (48, 64, 3)
    low, high, untouched = image[8, 8], image[24, 40], image[40, 8]  # patch boxes are 16 thumbnail px
    assert high.sum() > low.sum() + 200  # inferno: bright yellow at the top rank, dark purple below
    np.testing.assert_array_equal(untouched, [128, 128, 128])


def write_store(out: Path, slide_id: str, coords: np.ndarray, width: int, height: int) -> None:
    """A coords-only patch store plus its thumbnail, as `pathomics tile` leaves them."""
    attrs = {key: 0 for key in STORE_ATTRS if key != "complete"}
    attrs.update(slide_id=slide_id, patch_size=PATCH, patch_size_level0=PATCH, slide_width=width, slide_height=height)
    PatchStoreWriter(OutputLayout(out).store(slide_id), attrs, coords, np.ones(len(coords), np.float32), with_pixels=False).publish()
    thumbnail = OutputLayout(out).store(slide_id).with_name(f"{slide_id}.thumb.png")
    Image.new("RGB", (width // 64, height // 64), (240, 240, 240)).save(thumbnail)


def test_heatmaps_of_a_run_over_patch_store_thumbnails(tiny, tmp_path):
    train_mil(tiny.features, tiny.labels, tmp_path / "run", replace(TINY, refit=False))
    tiles = tmp_path / "tiles_out"
    slide_id = "s000_0"
    write_store(tiles, slide_id, grid_coords(len(tiny.witnesses[slide_id])), 16 * PATCH, 4 * PATCH)
    png = render_heatmap(tmp_path / "run" / "attention" / f"{slide_id}.h5", tiles, tmp_path / "h.png")
    with Image.open(png) as image:  # the 64 × 16 thumbnail above its colour bar
        assert image.size[0] == 64 and image.size[1] > 16 and json.loads(image.text["pathomics"])["slide_id"] == slide_id
    assert main(["mil", "heatmap", "--run", str(tmp_path / "run"), "--tiles", str(tiles)]) == 1  # other slides lack stores
    status = pd.read_csv(tmp_path / "run" / "status.csv")
    assert status.set_index("slide_id").loc[slide_id, "state"] == DONE
    assert (status["state"] == FAILED).sum() == 23
    assert (tmp_path / "run" / "heatmaps" / f"{slide_id}.png").is_file()
    again = render_heatmaps(tmp_path / "run", tiles, [slide_id], show_progress=False)
    assert [r.state for r in again] == [SKIPPED]
    (tmp_path / "run" / "heatmaps" / f"{slide_id}.png").unlink()
    assert main(["mil", "heatmap", "--run", str(tmp_path / "run"), "--tiles", str(tiles), "--slide-id", slide_id,
                 "--size", "800"]) == 0
    with Image.open(tmp_path / "run" / "heatmaps" / f"{slide_id}.png") as image:  # the 64 × 16 thumbnail resampled
        assert image.size[0] == 800 and json.loads(image.text["pathomics"])["size"] == 800
    assert [r.state for r in render_heatmaps(tmp_path / "run", tiles, [slide_id], show_progress=False, size=800)] == [SKIPPED]
    assert [r.state for r in render_heatmaps(tmp_path / "run", tiles, [slide_id], show_progress=False, size=800,
                                             beside=True)] == [DONE]  # drawn again: other settings


def test_a_heatmap_over_a_tiled_slide_has_no_patch_grid_and_a_colour_bar_of_attention(aperio_slide, tmp_path):
    """Drawn over the tiling thumbnail, the heatmap showed the blue patch grid tiling draws there; it is drawn
    over the plain thumbnail, beside it on request, above a colour bar labelled with attention weights."""
    from matplotlib import colormaps

    from pathomics.mil.artifacts import SlideResult, write_attention
    from pathomics.store import open_patch_store
    from pathomics.tiling import TileConfig, tile_slide

    store = open_patch_store(tile_slide(aperio_slide.path, tmp_path, TileConfig(target_mpp=2.0, patch_size=64)).path)
    layout = OutputLayout(tmp_path)
    n = len(store)
    attention = np.full(n, 1.0 / n)  # one colour everywhere: what is left over is the thumbnail underneath
    write_attention(layout.attention_file(store.slide_id), SlideResult(store.slide_id, "p1", 0, 0.0, np.zeros(4), attention,
                                                                      store.coords), "abmil", {})
    png = render_heatmap(layout.attention_file(store.slide_id), tmp_path, tmp_path / "h.png", alpha=0.5, size=800, beside=True)
    with Image.open(layout.plain_thumbnail(store.slide_id)) as plain:
        thumb = np.asarray(plain.convert("RGB").resize((800, round(plain.height * 800 / plain.width)), Image.Resampling.LANCZOS),
                           dtype=float)
    with Image.open(png) as opened:
        image, meta = np.asarray(opened.convert("RGB"), dtype=float), json.loads(opened.text["pathomics"])
    h = thumb.shape[0]
    assert image.shape[1] == 2 * 800 + 12 and image.shape[0] > h + 30
    np.testing.assert_array_equal(image[:h, :800], thumb.round())  # the thumbnail, left, as it is
    heat = image[:h, 812:]
    covered = np.abs(heat - thumb).sum(axis=2) > 3
    colour = (2 * heat - thumb)[covered]  # heat = thumb / 2 + colour / 2 where a patch lies
    assert covered.mean() > 0.1 and np.abs(colour - colour.mean(axis=0)).max() <= 3  # no grid: one colour on every patch
    assert meta["colour_bar"] == {f"{q:g}": pytest.approx(1.0 / n) for q in (0, 0.25, 0.5, 0.75, 1)}
    bar = image[h + 8 + 8, 812 + 8 + 52: -8 - 52]  # the middle row of the bar under the heatmap
    expected = colormaps["inferno"](np.linspace(0, 1, len(bar)))[:, :3] * 255
    assert np.abs(bar - expected).max() <= 2


# --- bad input: one clear error or warning each ---

def test_labelled_slides_without_features_are_left_out_with_a_warning(tiny):
    table = pd.concat([tiny.table, pd.DataFrame({"slide_id": ["ghost"], "patient_id": ["p999"], "label": ["pos"]})])
    table.to_csv(tiny.labels, index=False)
    with pytest.warns(UserWarning, match="1 labelled slide.*no feature file.*ghost"):
        cohort = load_bags(tiny.features, tiny.labels, TINY)
    assert len(cohort.bags) == 24


def test_feature_files_of_different_dimensions(tiny):
    write_bag(tiny.out, "s000_0", np.zeros((10, 12), np.float32))
    with pytest.raises(StoreError, match=r"differ in embedding dimension: 8 \(23 files.*12 \(1 files, e.g. s000_0\)"):
        load_bags(tiny.features, tiny.labels, TINY)


def test_a_single_class(tiny):
    tiny.table.assign(label="pos").to_csv(tiny.labels, index=False)
    with pytest.raises(CohortError, match="same label 'pos'"):
        load_bags(tiny.features, tiny.labels, TINY)


def test_all_censored(tiny):
    tiny.table.drop(columns="label").assign(time=1.0, event=0).to_csv(tiny.labels, index=False)
    with pytest.raises(CohortError, match="censored"):
        load_bags(tiny.features, tiny.labels, replace(TINY, task="survival"))


def test_nan_features(tiny):
    features = np.ones((10, 8), np.float32)
    features[3, 2] = np.nan
    write_bag(tiny.out, "s001_1", features)
    with pytest.raises(StoreError, match=r"s001_1.h5: 1 of 10 patches have NaN"):
        load_bags(tiny.features, tiny.labels, TINY)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.drop(columns="label"), "missing column.*label.*--label-col"),
    (lambda t: t.assign(label=t["label"].where(t.index != 3)), "empty values in column.*label"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "listed more than once: s000_0"),
    (lambda t: t.assign(label=np.where(t.index == 1, "pos", t["label"])), "p000.*different targets.*--aggregate none"),
])
def test_malformed_label_tables(tiny, edit, message):
    edit(tiny.table).to_csv(tiny.labels, index=False)
    with pytest.raises(CohortError, match=message):
        load_bags(tiny.features, tiny.labels, TINY)


def test_survival_tables_need_times_and_binary_events(tiny):
    tiny.table.drop(columns="label").assign(time=-1.0, event=1).to_csv(tiny.labels, index=False)
    with pytest.raises(CohortError, match="'time' must hold non-negative numbers"):
        load_bags(tiny.features, tiny.labels, replace(TINY, task="survival"))
    tiny.table.drop(columns="label").assign(time=1.0, event=2).to_csv(tiny.labels, index=False)
    with pytest.raises(CohortError, match="'event' must be 1 .event. or 0"):
        load_bags(tiny.features, tiny.labels, replace(TINY, task="survival"))


def test_invalid_configs_name_every_problem():
    with pytest.raises(ConfigError, match="model must be one of.*folds must be at least 2"):
        MILConfig(model="resnet", folds=1)
    with pytest.raises(ConfigError, match="Cox loss needs batch_size of at least 2"):
        MILConfig(task="survival", batch_size=1)


# --- command line ---

def test_cli_train_export_and_bad_input(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["mil", "train", "--features", str(tiny.features), "--labels", str(tiny.labels), "--out", str(out),
            "--aggregator", "gated-abmil", "--folds", "3", "--epochs", "2", "--hidden-dim", "8", "--model-option",
            "attention_dim=8", "--classes", "neg,pos", "--no-refit"]
    assert main(argv) == 0
    config = json.loads((out / "mil_config.json").read_text())["config"]
    assert config["model"] == "gated-abmil" and config["model_options"] == [["attention_dim", 8]]
    assert config["classes"] == ["neg", "pos"] and config["refit"] is False and config["lr"] == MILConfig().lr
    assert "auc" in json.loads(capsys.readouterr().out)["summary"]
    assert main(["mil", "export", "--run", str(out), "--out", str(tmp_path / "s.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "s.csv")) == 24
    tiny.table.rename(columns={"label": "grade"}).to_csv(tiny.labels, index=False)
    assert main(argv) == 2
    assert "--label-col" in capsys.readouterr().err
    assert main([*argv, "--label-col", "grade", "--model-option", "oops"]) == 2
    assert main(["mil", "predict", "--model-dir", str(out), "--features", str(tiny.features), "--out", str(tmp_path / "p")]) == 2
    assert "no trained MIL model" in capsys.readouterr().err


@pytest.mark.parametrize(("how", "risks"), [("mean", [1.5, 0.0]), ("median", [1.5, 0.0]), ("max", [3.0, 0.0])])
def test_a_patients_slides_are_combined_as_aggregate_says(how, risks):
    """--aggregate mean|median|max combines a patient's slide predictions for the metrics, as survival does."""
    from pathomics.mil.train import Targets, _group_reduce, evaluate

    predictions = np.array([0.0, 3.0, 0.0])  # P1: slides 0 and 1, P2: slide 2
    groups, inverse = np.array(["P1", "P1", "P2"]), np.array([0, 0, 1])
    assert _group_reduce(predictions[:, None], inverse, 2, how)[:, 0].tolist() == risks
    targets = Targets(time=np.array([1.0, 1.0, 5.0]), event=np.array([1, 1, 1]))
    # P1 fails first; its mean risk 1.5 and its max 3.0 rank it above P2 (0.0), as does any of the three
    assert evaluate(predictions, targets, np.arange(3), groups, how) == {"c_index": 1.0, "n": 2, "events": 2}
    assert MILConfig(aggregate=how).aggregate == how
