"""nvImageCodec decoding of coords-only stores (the GPU decode path): on its CPU-only backend here, on a GPU when there is one.

The path is the same on both: tiles read and completed by pathomics, decoded in one nvImageCodec batch,
assembled and area-resampled by torch on the decoder's device.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import torch

from pathomics.cli.main import main
from pathomics.embed import EmbedConfig, embed_store, patch_decoder
from pathomics.errors import ConfigError, SlideReadError
from pathomics.encoders.backbones import load_backbone
from pathomics.slide.nvimgcodec_tiles import DevicePatchReader
from pathomics.slide.patches import read_corners, read_patches
from pathomics.store import open_patch_store, read_feature_file
from pathomics.synthetic import write_slide
from pathomics.tiling import TileConfig, tile_slide

DEVICES = [torch.device("cpu"), pytest.param(torch.device("cuda"), marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def coords_store(slide: Path, out: Path, target: float, patch: int, **options: object):
    return open_patch_store(tile_slide(slide, out, TileConfig(target_mpp=target, patch_size=patch, with_pixels=False,
                                                              qc=None, **options)).path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fixture,target,patch", [
    ("aperio_rgb", 0.5, 256),   # Aperio's RGB-in-JPEG, 512 level-0 px -> 256 (2x)
    ("slide_240", 1.0, 128),    # 240-px tiles, 487 level-0 px -> 128 (a non-integer 3.8x)
    ("aperio_slide", 0.9, 256),  # YCbCr JPEG, 922 -> 256 from level 0 (the next level is 4x)
])
def test_patches_are_within_two_grey_levels_of_openslide_and_of_the_cpu_path(tmp_path, fixture, target, patch, device, request):
    truth = request.getfixturevalue(fixture)
    store = coords_store(truth.path, tmp_path, target, patch)
    picked = np.arange(0, len(store), max(1, len(store) // 8))
    reader = DevicePatchReader(store, device)
    try:
        patches = reader.read(store.coords[picked])
    finally:
        reader.close()
    assert patches.device.type == device.type and patches.dtype == torch.uint8 and patches.shape == (len(picked), patch, patch, 3)
    patches = patches.cpu().numpy().astype(int)
    size0 = store.attrs["patch_size_level0"]
    with openslide.OpenSlide(str(truth.path)) as reference:
        for patch_pixels, i in zip(patches, picked):
            x, y = (int(v) for v in store.coords[i])
            level0 = np.asarray(reference.read_region((x, y), 0, (size0, size0)).convert("RGB"))
            expected = cv2.resize(level0, (patch, patch), interpolation=cv2.INTER_AREA).astype(int)
            assert np.abs(patch_pixels - expected).mean() <= 2.0
            assert np.abs(patch_pixels - read_patches(store, int(i), int(i) + 1)[0]).mean() <= 2.0


def test_batch_assembly_equals_patch_by_patch_assembly_for_every_tile_offset(tmp_path, aperio_rgb):
    # 64 px of overlap at 0.5 µm/px: corners every 384 level-0 px, so patches sit at 4 offsets inside their
    # 256-px tiles and each offset's patches are interleaved with the others' in the batch
    store = coords_store(aperio_rgb.path, tmp_path, 0.5, 256, overlap=64)
    reader = DevicePatchReader(store, torch.device("cpu"))
    try:
        s = reader.read_size
        corners = read_corners(store.coords, reader.downsample, s, reader.level_size)
        assert len({(x % 256, y % 256) for x, y in corners.tolist()}) == 4
        reader.tiles.prefetch(reader.tiles.tiles_for(0, [(int(x), int(y), s, s) for x, y in corners]))
        batch = torch.empty((len(corners), s, s, 3), dtype=torch.uint8)
        reader.tiles.assemble_batch(0, corners, s, batch)
        for i, (x, y) in enumerate(corners.tolist()):
            one = torch.empty((s, s, 3), dtype=torch.uint8)
            reader.tiles.assemble(0, (x, y, s, s), out=one)
            assert torch.equal(batch[i], one)
    finally:
        reader.close()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_embedding_through_nvimgcodec_matches_the_cpu_workers(tmp_path, slide_240, device):
    store = coords_store(slide_240.path, tmp_path, 1.0, 64).path
    backbone = load_backbone("shufflenet-v2", "random")
    config = EmbedConfig(model="shufflenet-v2", weights="random", device="cpu", precision="fp32", batch_size=16,
                         num_workers=0, input_size=64)
    workers = read_feature_file(embed_store(store, tmp_path / "workers", dataclasses.replace(config, decoder="workers"), backbone=backbone))
    on_device = dataclasses.replace(config, decoder="nvimgcodec", device=device.type)
    nv = read_feature_file(embed_store(store, tmp_path / "nv", on_device, backbone=backbone))
    assert len(nv.coords) > 16  # more than one batch
    np.testing.assert_array_equal(nv.coords, workers.coords)
    assert (nv.attrs["decoder"], workers.attrs["decoder"]) == ("nvimgcodec", "workers")
    cosine = (nv.features * workers.features).sum(1) / np.linalg.norm(nv.features, axis=1) / np.linalg.norm(workers.features, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(nv.features, workers.features)  # a different decoder really ran
    auto = read_feature_file(embed_store(store, tmp_path / "auto", dataclasses.replace(on_device, decoder="auto"), backbone=backbone))
    assert auto.attrs["decoder"] == ("nvimgcodec" if device.type == "cuda" else "workers")  # the default: the GPU's


def test_auto_uses_the_workers_on_a_cpu_and_nvimgcodec_refuses_what_it_cannot_decode(tmp_path, slide_240, aperio_slide):
    coords_only = coords_store(slide_240.path, tmp_path / "coords", 1.0, 64)
    assert patch_decoder(coords_only, "auto", torch.device("cpu")) is None
    assert patch_decoder(coords_only, "workers", torch.device("cpu")) is None
    pixels = open_patch_store(tile_slide(slide_240.path, tmp_path / "pixels", TileConfig(target_mpp=1.0, patch_size=64, qc=None)).path)
    with pytest.raises(ConfigError, match="holds its pixels"):
        patch_decoder(pixels, "nvimgcodec", torch.device("cpu"))
    exact = coords_store(aperio_slide.path, tmp_path / "exact", 2.0, 64, resample="exact")
    with pytest.raises(ConfigError, match="resample exact"):
        patch_decoder(exact, "nvimgcodec", torch.device("cpu"))
    lzw = write_slide(tmp_path / "lzw.tif", 2048, 1536, mpp=0.25, flavour="generic", seed=8, compression="lzw")
    with pytest.raises(ConfigError, match=r"lzw\.tif does not store level \d as JPEG tiles"):
        patch_decoder(coords_store(lzw.path, tmp_path / "lzw", 1.0, 64), "nvimgcodec", torch.device("cpu"))


def test_a_decoder_that_cannot_start_leaves_auto_on_the_workers_and_stops_nvimgcodec_with_one_message(
        tmp_path, slide_240, monkeypatch, caplog):
    store = coords_store(slide_240.path, tmp_path, 1.0, 64)

    def broken(device):
        raise RuntimeError("nvJPEG library not found")

    monkeypatch.setattr("pathomics.slide.nvimgcodec_tiles._decoder", broken)
    assert patch_decoder(store, "auto", torch.device("cuda")) is None  # no CUDA touched before the decoder
    assert "could not start on cuda (nvJPEG library not found); decoding on the CPU" in caplog.text
    with pytest.raises(ConfigError, match=r"t240\.zarr: nvImageCodec could not start on cpu \(nvJPEG library not found\)"):
        patch_decoder(store, "nvimgcodec", torch.device("cpu"))


def test_a_corrupt_tile_fails_naming_the_file(tmp_path, slide_240):
    copy = tmp_path / "damaged.svs"
    shutil.copy(slide_240.path, copy)
    store = coords_store(copy, tmp_path, 1.0, 64)
    import tifffile

    with tifffile.TiffFile(copy) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(copy, "r+b") as fh:  # the same size, so the store still matches its source
        fh.seek(offset)
        fh.write(b"\x00" * count)
    reader = DevicePatchReader(store, torch.device("cpu"))
    try:
        with pytest.raises(SlideReadError, match=r"damaged\.svs: tile 0 of level 0 cannot be decoded"):
            reader.read(np.array([[0, 0]]))
    finally:
        reader.close()


def test_cli_embeds_a_coords_only_store_with_nvimgcodec(tmp_path, slide_240, capsys):
    coords_store(slide_240.path, tmp_path, 1.0, 64)
    args = ["embed", "--out", str(tmp_path), "--encoder", "shufflenet-v2", "--weights", "random", "--device", "cpu",
            "--precision", "fp32", "--input-size", "64", "--num-workers", "0", "--decoder", "nvimgcodec"]
    assert main(args) == 0
    assert read_feature_file(tmp_path / "features" / "t240.h5").attrs["decoder"] == "nvimgcodec"
    with pytest.raises(SystemExit) as refused:
        main([*args[:-1], "jpeg"])
    assert refused.value.code == 2
    assert "invalid choice: 'jpeg'" in capsys.readouterr().err
