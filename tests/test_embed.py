"""Patch stores → feature files: exact numbers, order, file contract, skipping, failure isolation, CLI."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pathomics import embed
from pathomics.cli.main import main
from pathomics.device import cpu_has_native_bf16, resolve_precision
from pathomics.embed import CPU_ACTIVATION_BYTES, EmbedConfig, Encoder, embed_store, largest_activation
from pathomics.errors import ModelError
from pathomics.layout import OutputLayout
from pathomics.encoders.backbones import load_backbone
from pathomics.encoders.base import Backbone
from pathomics.batch import DONE, FAILED, SKIPPED, run_jobs
from pathomics.runner.jobs import embed_job
from pathomics.store import (
    FEATURE_COORDS_ATTRS,
    FEATURE_FILE_ATTRS,
    STORE_ATTRS,
    PatchStoreWriter,
    open_patch_store,
    read_feature_file,
)

CPU_FP32 = EmbedConfig(model="shufflenet-v2", weights="random", device="cpu", precision="fp32",
                       batch_size=8, num_workers=0, input_size=64)


def store_attrs(slide_id: str, patch_size: int, **extra: object) -> dict[str, object]:
    """DESIGN's store attributes with plausible values for a store built without a slide."""
    attrs: dict[str, object] = {
        "slide_id": slide_id, "source_path": f"/slides/{slide_id}.svs", "source_size_bytes": 1, "source_mtime": 0.0,
        "backend": "test", "mpp_level0": 0.25, "mpp_source": "metadata", "target_mpp": 0.5, "read_level": 0,
        "downsample": 2.0, "patch_size": patch_size, "patch_size_level0": 2 * patch_size, "overlap": 0,
        "min_tissue": 0.5, "tissue_method": "test", "pathomics_version": "test", "complete": False,
    }
    assert set(attrs) == set(STORE_ATTRS)
    return {**attrs, **extra}


def make_store(out: Path, slide_id: str, images: np.ndarray, coords: np.ndarray | None = None,
               publish: bool = True, **extra: object) -> Path:
    """A patch store of ``images`` under ``out/tiles``; left partial unless ``publish``."""
    n, p = len(images), images.shape[1]
    coords = np.stack([np.arange(n) * p, np.arange(n) * 3 * p], axis=1) if coords is None else coords
    writer = PatchStoreWriter(OutputLayout(out).store(slide_id), store_attrs(slide_id, p, **extra), coords, np.ones(n), True)
    writer.write(0, images)
    return writer.publish() if publish else writer.partial


def random_patches(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def features_of(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["features"][:]


@pytest.fixture(scope="module")
def shufflenet() -> Backbone:
    return load_backbone("shufflenet-v2", "random", input_size=64)


def reference_features(backbone: Backbone, images: np.ndarray) -> np.ndarray:
    """The backbone applied directly: torchvision's uint8 resize (as PIL), scaling and normalisation, fp32, one batch."""
    x = TF.resize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [backbone.input_size] * 2, antialias=True)
    x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(backbone.mean), list(backbone.std))
    with torch.inference_mode():
        return backbone.module(x.contiguous()).numpy()


@pytest.mark.parametrize(("model", "patch_size"), [("shufflenet-v2", 64), ("shufflenet-v2", 96), ("resnet50-trunc", 64)],
                         ids=["shufflenet", "shufflenet-resized", "resnet50-trunc"])
def test_stored_features_equal_the_backbone_in_fp32(tmp_path: Path, model: str, patch_size: int) -> None:
    images = random_patches(6, patch_size)
    config = dataclasses.replace(CPU_FP32, model=model, batch_size=4)
    backbone = load_backbone(model, "random", input_size=64)
    got = features_of(embed_store(make_store(tmp_path, "s1", images), tmp_path, config, backbone=backbone))
    expected = reference_features(backbone, images)
    error = np.abs(got - expected).max()
    assert got.shape == (6, 1024)
    assert error <= 1e-4 and error <= 1e-4 * np.abs(expected).max()


def test_a_cpu_embeds_without_reader_processes_unless_asked(tmp_path: Path, shufflenet: Backbone,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers started for each slide cost a small slide more than they save on a CPU, whose cores the model uses;
    a GPU is fed by one per core."""
    started: list[int] = []
    loader = embed.DataLoader
    monkeypatch.setattr(embed, "DataLoader", lambda *a, **k: started.append(k["num_workers"]) or loader(*a, **k))
    store = make_store(tmp_path, "s1", random_patches(10))
    embed_store(store, tmp_path / "default", dataclasses.replace(CPU_FP32, num_workers=None), backbone=shufflenet)
    embed_store(store, tmp_path / "asked", dataclasses.replace(CPU_FP32, num_workers=2, batch_size=4), backbone=shufflenet)
    assert started == [0, 2]
    assert embed.reader_count(None, torch.device("cuda")) == embed.default_workers()


@pytest.mark.slow
def test_results_do_not_depend_on_batch_size_workers_or_order(tmp_path: Path, shufflenet: Backbone) -> None:
    images = random_patches(23)
    store = make_store(tmp_path, "s1", images)
    runs = [(23, 0), (5, 2), (8, 1)]
    results = [features_of(embed_store(store, tmp_path / f"b{b}w{w}",
                                       dataclasses.replace(CPU_FP32, batch_size=b, num_workers=w), backbone=shufflenet))
               for b, w in runs]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-9)
    coords = open_patch_store(store).coords
    reversed_store = make_store(tmp_path / "rev", "s1", images[::-1].copy(), coords[::-1].copy())
    reversed_file = read_feature_file(embed_store(reversed_store, tmp_path / "rev", CPU_FP32, backbone=shufflenet))
    np.testing.assert_array_equal(reversed_file.coords, coords[::-1])
    np.testing.assert_allclose(reversed_file.features, results[0][::-1], rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX); auto uses fp32")
@pytest.mark.parametrize("model", ["shufflenet-v2", "resnet50-trunc"])
def test_bf16_features_match_fp32(tmp_path: Path, model: str) -> None:
    backbone = load_backbone(model, "random", input_size=64)
    store = make_store(tmp_path, "s1", random_patches(12))
    fp32 = features_of(embed_store(store, tmp_path / "fp32", dataclasses.replace(CPU_FP32, model=model), backbone=backbone))
    auto = dataclasses.replace(CPU_FP32, model=model, precision="auto")
    path = embed_store(store, tmp_path / "auto", auto, backbone=backbone)
    bf16 = features_of(path)
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert read_feature_file(path).attrs["precision"] == "bf16"
    assert cosine.min() >= 0.99 and not np.array_equal(fp32, bf16)


def test_auto_precision() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_feature_file_opens_with_plain_h5py(tmp_path: Path, shufflenet: Backbone) -> None:
    store = make_store(tmp_path, "slide-7", random_patches(5))
    path = embed_store(store, tmp_path, CPU_FP32, backbone=shufflenet)
    assert path == OutputLayout(tmp_path).feature_file("slide-7")
    with h5py.File(path, "r") as h5:
        assert (h5["features"].shape, h5["features"].dtype) == ((5, 1024), np.float32)
        assert (h5["coords"].shape, h5["coords"].dtype) == ((5, 2), np.int64)
        np.testing.assert_array_equal(h5["coords"][:], open_patch_store(store).coords)
        assert set(FEATURE_FILE_ATTRS) <= set(h5.attrs) and set(FEATURE_COORDS_ATTRS) <= set(h5["coords"].attrs)
        attrs, coords_attrs = dict(h5.attrs), dict(h5["coords"].attrs)
    assert (coords_attrs["patch_size"], coords_attrs["patch_size_level0"], coords_attrs["target_mpp"]) == (64, 128, 0.5)
    assert "patch_level" not in coords_attrs  # with patch_size, a CLAM reader would read a quarter of the patch
    assert (attrs["model"], attrs["weights"], attrs["weights_sha256"]) == ("shufflenet-v2", "random", "random")
    assert (attrs["embedding_dim"], attrs["precision"], attrs["slide_id"]) == (1024, "fp32", "slide-7")
    config_values = {f.name: attrs[f.name] for f in dataclasses.fields(EmbedConfig)}
    # the excluded QC flags, comma-separated; the decoder that ran ("auto" resolved)
    assert config_values == {**dataclasses.asdict(CPU_FP32), "qc_exclude": "", "decoder": "workers"}


def test_cpu_batches_run_in_micro_batches_that_bound_the_largest_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = load_backbone("resnet50-trunc", "random", input_size=64)
    encoder = Encoder(backbone, torch.device("cpu"), "fp32")
    largest = largest_activation(encoder)
    assert largest >= 256 * 16 * 16 * 4  # layer1's output of one 64-px patch, float32
    assert encoder.micro_batch * largest <= CPU_ACTIVATION_BYTES < (encoder.micro_batch + 1) * largest
    monkeypatch.setattr(embed, "CPU_ACTIVATION_BYTES", 3 * largest)
    small = Encoder(backbone, torch.device("cpu"), "fp32")
    assert small.micro_batch == 3
    images = random_patches(8)
    with torch.inference_mode():
        got = small(torch.from_numpy(images)).numpy()  # micro-batches of 3, 3 and 2
    assert np.abs(got - reference_features(backbone, images)).max() <= 1e-4


def test_up_to_date_files_are_skipped_and_stale_ones_recomputed(tmp_path: Path, shufflenet: Backbone) -> None:
    store = make_store(tmp_path, "s1", random_patches(4))
    path = OutputLayout(tmp_path).feature_file("s1")

    def run(config: EmbedConfig) -> str:
        state, patches = embed_job(store, tmp_path, config, shufflenet).run()
        assert patches == 4
        return state

    assert run(CPU_FP32) == DONE
    written = path.stat().st_mtime_ns
    assert run(dataclasses.replace(CPU_FP32, batch_size=3, num_workers=1)) == SKIPPED
    assert path.stat().st_mtime_ns == written
    assert run(dataclasses.replace(CPU_FP32, precision="bf16")) == DONE
    assert read_feature_file(path).attrs["precision"] == "bf16"
    path.write_bytes(b"truncated by a crash")
    assert run(CPU_FP32) == DONE and features_of(path).shape == (4, 1024)
    make_store(tmp_path, "s1", random_patches(4), min_tissue=0.25)  # re-tiled with other parameters
    assert run(CPU_FP32) == DONE


def test_empty_store(tmp_path: Path, shufflenet: Backbone) -> None:
    store = make_store(tmp_path, "empty", np.zeros((0, 64, 64, 3), np.uint8), np.zeros((0, 2), np.int64))
    feature_file = read_feature_file(embed_store(store, tmp_path, CPU_FP32, backbone=shufflenet))
    assert feature_file.features.shape == (0, 1024) and feature_file.coords.shape == (0, 2)


def read_status(out: Path) -> dict[str, tuple[str, str]]:
    with (out / "status.csv").open(newline="") as fh:
        return {row["slide_id"]: (row["state"], row["error"]) for row in csv.DictReader(fh) if row["stage"] == "embed"}


EMBED_OPTIONS = {"model": "shufflenet-v2", "weights": "random", "device": "cpu", "precision": "fp32",
                 "batch-size": "4", "num-workers": "0", "input-size": "64"}


def embed_argv(out: Path, *stores: Path, **overrides: str | None) -> list[str]:
    """``pathomics embed`` arguments: the fast test options, with overrides (None drops an option)."""
    options = EMBED_OPTIONS | {k.replace("_", "-"): v for k, v in overrides.items()}
    return ["embed", "--out", str(out), *[x for k, v in options.items() if v is not None for x in (f"--{k}", v)],
            *map(str, stores)]


def test_cli_batch_goes_on_past_bad_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import zarr

    make_store(tmp_path, "good", random_patches(3))
    make_store(tmp_path, "interrupted", random_patches(3), publish=False)
    unfinished = make_store(tmp_path, "unfinished", random_patches(3))
    zarr.open_group(unfinished, mode="r+").attrs["complete"] = False
    zarr.open_group(OutputLayout(tmp_path).store("foreign"), mode="w", zarr_format=3).attrs["made_by"] = "another tool"

    assert main(embed_argv(tmp_path)) == 1
    status = read_status(tmp_path)
    assert status["good"] == (DONE, "")
    assert status["interrupted"][0] == FAILED and "left it incomplete" in status["interrupted"][1]
    assert status["unfinished"][0] == FAILED and "incomplete patch store" in status["unfinished"][1]
    assert status["foreign"][0] == FAILED and "not a pathomics patch store" in status["foreign"][1]
    assert features_of(OutputLayout(tmp_path).feature_file("good")).shape == (3, 1024)
    assert "FAILED foreign" in capsys.readouterr().out

    assert main(embed_argv(tmp_path, OutputLayout(tmp_path).store("good"))) == 0
    assert "embed: 0 done, 1 skipped" in capsys.readouterr().out
    assert read_status(tmp_path)["good"][0] == DONE  # the record of the run that did the work is kept


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # building a user's TorchScript file warns
def test_cli_refuses_unusable_models_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(tmp_path, "good", random_patches(2))
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a model")
    feature_maps = tmp_path / "maps.pt"
    torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 64, 64)).save(str(feature_maps))
    cases = [
        ({"weights": str(tmp_path / "missing.pth")}, "weights file .*missing.pth does not exist"),
        ({"model": f"torchscript:{not_a_model}", "weights": None}, "is not a TorchScript model"),
        ({"model": f"torchscript:{feature_maps}", "weights": None}, r"must return one \(batch, dim\) tensor"),
        ({"precision": "fp64"}, "precision must be one of"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda"),
    ]
    for overrides, message in cases:
        assert main(embed_argv(tmp_path, **overrides)) == 2
        err = capsys.readouterr().err
        assert err.startswith("pathomics embed: error: ") and len(err.strip().splitlines()) == 1
        assert re.search(message, err), err
    assert not OutputLayout(tmp_path).feature_file("good").exists()


def test_library_batch_records_model_errors_per_slide(tmp_path: Path) -> None:
    stores = [make_store(tmp_path, f"s{i}", random_patches(2, seed=i)) for i in range(2)]
    config = dataclasses.replace(CPU_FP32, weights=str(tmp_path / "missing.pth"))
    rows = run_jobs("embed", [embed_job(s, tmp_path, config) for s in stores], tmp_path, show_progress=False)
    assert [r.state for r in rows] == [FAILED, FAILED] and all("does not exist" in r.error for r in rows)
    with pytest.raises(ModelError, match="does not exist"):
        embed_store(stores[0], tmp_path, config)


def test_config_is_validated() -> None:
    for bad in ({"precision": "fp64"}, {"device": "gpu"}, {"batch_size": 0}, {"num_workers": -1}, {"input_size": 8}):
        with pytest.raises(ValueError):
            EmbedConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CPU_FP32.batch_size = 3  # type: ignore[misc]


@pytest.mark.slow
def test_slide_to_tiles_to_features(tmp_path: Path, shufflenet: Backbone) -> None:
    from pathomics.synthetic import write_slide
    from pathomics.tiling import TileConfig, tile_slide

    slide = tmp_path / "slide.svs"
    write_slide(slide, 2048, 1536, mpp=0.25)
    pixels = tile_slide(slide, tmp_path / "pixels", TileConfig(target_mpp=0.5, patch_size=64)).path
    coords_only = tile_slide(slide, tmp_path / "coords", TileConfig(target_mpp=0.5, patch_size=64, with_pixels=False)).path
    from_pixels = read_feature_file(embed_store(pixels, tmp_path / "pixels", CPU_FP32, backbone=shufflenet))
    config = dataclasses.replace(CPU_FP32, num_workers=2)
    from_slide = read_feature_file(embed_store(coords_only, tmp_path / "coords", config, backbone=shufflenet))
    assert 20 <= len(from_pixels.coords) <= 400
    np.testing.assert_array_equal(from_slide.coords, from_pixels.coords)
    np.testing.assert_allclose(from_slide.features, from_pixels.features, rtol=1e-5, atol=1e-9)
    assert from_pixels.coords_attrs["target_mpp"] == 0.5 and from_pixels.coords_attrs["patch_size"] == 64


@pytest.mark.slow
def test_coords_attributes_give_each_patch_its_level0_footprint(tmp_path: Path, aperio_rgb, shufflenet: Backbone) -> None:
    """A 0.5 µm/px run on a 0.25 µm/px slide: 64 px embedded, each 128 level-0 px wide. The file said
    ``patch_size=64, patch_level=0``, so ``read_region(coord, 0, patch_size)`` read a quarter of the field."""
    import cv2

    from pathomics.slide import open_slide
    from pathomics.tiling import TileConfig, tile_slide

    store = tile_slide(aperio_rgb.path, tmp_path, TileConfig(target_mpp=0.5, patch_size=64, resample="exact")).path
    features = read_feature_file(embed_store(store, tmp_path, CPU_FP32, backbone=shufflenet))
    a = features.coords_attrs
    assert (a["patch_size"], a["patch_size_level0"], a["target_mpp"], a["mpp_level0"]) == (64, 128, 0.5, 0.25)
    patches = open_patch_store(store).read_images(0, 3)
    with open_slide(aperio_rgb.path) as slide:
        for (x, y), patch in zip(features.coords[:3], patches):
            size0 = int(a["patch_size_level0"])
            field = slide.read_region((int(x), int(y)), 0, (size0, size0))
            read = cv2.resize(field, (a["patch_size"],) * 2, interpolation=cv2.INTER_AREA)
            assert np.abs(read.astype(int) - patch).mean() < 1.0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("model", ["shufflenet-v2", "resnet50-trunc"])
def test_cuda_matches_the_cpu_reference(tmp_path: Path, model: str) -> None:
    backbone = load_backbone(model, "random")
    images = random_patches(32, 256)
    store = make_store(tmp_path, "s1", images)
    expected = reference_features(backbone, images)
    gpu = dataclasses.replace(CPU_FP32, model=model, device="cuda", batch_size=12, num_workers=2, input_size=None)
    fp32 = features_of(embed_store(store, tmp_path / "fp32", gpu, backbone=backbone))
    path = embed_store(store, tmp_path / "auto", dataclasses.replace(gpu, precision="auto"), backbone=backbone)
    fast = features_of(path)
    assert read_feature_file(path).attrs["precision"] in ("bf16", "fp16")
    assert np.abs(fp32 - expected).max() <= 1e-2 * np.abs(expected).max()  # cuDNN may use TF32 for fp32 convolutions
    cosine = (fast * expected).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.99


def test_a_store_with_a_missing_or_damaged_shard_fails_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """zarr reads an absent chunk as zeros: without a check, every missing patch became the same black embedding."""
    make_store(tmp_path, "good", random_patches(3))
    missing = make_store(tmp_path, "missing", random_patches(3))
    (missing / "images" / "c" / "0" / "0" / "0" / "0").unlink()
    damaged = make_store(tmp_path, "damaged", random_patches(3))
    shard = damaged / "images" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    assert main(embed_argv(tmp_path)) == 1
    status = read_status(tmp_path)
    assert status["good"][0] == "done"
    assert status["missing"][0] == "failed" and "1 chunk file(s) missing (e.g. images/c/0/0/0/0)" in status["missing"][1]
    assert status["damaged"][0] == "failed" and "cannot be read" in status["damaged"][1]
    assert "\n" not in status["damaged"][1]
    assert sorted(p.stem for p in OutputLayout(tmp_path).features.glob("*.h5")) == ["good"]


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_a_chunk_damaged_inside_a_shard_fails_its_slide(tmp_path: Path, aperio_slide, compression: str) -> None:
    """Zeroed bytes inside a chunk used to decode into wrong patches; every chunk now carries a CRC32C."""
    assert main(["tile", str(aperio_slide.path), "--out", str(tmp_path), "--mpp", "1.0", "--patch-size", "64",
                 "--compression", compression]) == 0
    store = OutputLayout(tmp_path).store(aperio_slide.path.stem)
    shard = store / "images" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    start = min(1000, len(data) // 4)
    data[start:start + 5000] = bytes(min(5000, len(data) // 2))
    shard.write_bytes(bytes(data))
    assert main(embed_argv(tmp_path)) == 1
    state, error = read_status(tmp_path)[aperio_slide.path.stem]
    assert state == FAILED and "re-run `pathomics tile`" in error and "\n" not in error


@pytest.mark.slow
def test_a_killed_reader_process_fails_its_slide_and_the_batch_goes_on(tmp_path: Path) -> None:
    """A loader worker killed (SIGKILL, the out-of-memory killer) used to end embed with torch's traceback."""
    import subprocess
    import sys
    import time

    import psutil

    for i in range(2):
        make_store(tmp_path, f"s{i}", random_patches(200, seed=i))
    argv = embed_argv(tmp_path, batch_size="2", num_workers="1")
    embed_process = subprocess.Popen([sys.executable, "-m", "pathomics.cli.main", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(embed_process.pid)
    seen: dict[int, float] = {}  # a loader worker is forked: it keeps its parent's command line (a child about to
    killed = False               # exec another program has it only for a moment)
    while not killed and embed_process.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in parent.children():
                if child.cmdline() == parent.cmdline() and time.monotonic() - seen.setdefault(child.pid, time.monotonic()) > 0.2:
                    child.kill()
                    killed = True
        time.sleep(0.005)
    out, err = embed_process.communicate(timeout=300)
    assert killed and embed_process.returncode == 1 and "Traceback" not in err, err[-2000:]
    status = read_status(tmp_path)
    failed = [s for s, (state, _) in status.items() if state == FAILED]
    assert len(failed) == 1 and [state for state, _ in status.values()].count(DONE) == 1
    error = status[failed[0]][1]
    # torch words the death "is killed by signal: Killed" or "exited unexpectedly", depending on which it notices first
    assert error.startswith("WorkerError: ") and "a patch reader process died" in error and "--num-workers" in error
    assert f"FAILED {failed[0]}: WorkerError" in out
