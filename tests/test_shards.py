"""Shards written directly are ordinary Zarr v3 shards: zarr-python reads them, checks their CRC, finds absent chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pathomics.errors import StoreError
from pathomics.layout import OutputLayout
from pathomics.shards import ABSENT, chunk_encoder, write_shard, zarr_compressors
from pathomics.io import partial_path
from pathomics.store import PatchStoreWriter, open_patch_store, store_fingerprint

ATTRS = {"slide_id": "s", "source_path": "/nowhere/s.svs", "source_size_bytes": 1, "source_mtime": 0.0, "backend": "openslide",
         "mpp_level0": 0.25, "mpp_source": "metadata", "target_mpp": 0.5, "read_level": 0, "downsample": 2.0,
         "patch_size": 128, "patch_size_level0": 256, "overlap": 0, "min_tissue": 0.5, "tissue_method": "test",
         "pathomics_version": "test"}


def patches(n: int, p: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth random images (compressible, like tissue) with per-patch noise so no two chunks are equal."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, p * p * 3, dtype=np.float32).reshape(p, p, 3)
    return np.clip(base[None] + rng.normal(0, 8, (n, p, p, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_direct_shards_read_back_equal_to_what_zarr_python_writes(tmp_path, compression):
    images = patches(70, 32)
    arrays = {}
    for name in ("zarr", "direct"):
        arrays[name] = zarr.create_array(tmp_path / name, shape=images.shape, dtype="uint8", chunks=(8, 32, 32, 3),
                                         shards=(32, 32, 32, 3), compressors=zarr_compressors(compression), fill_value=0)
    arrays["zarr"][:] = images
    for start in range(0, len(images), 32):  # two full shards, then 6 patches: a partial chunk and three absent ones
        key = arrays["direct"].metadata.encode_chunk_key((start // 32, 0, 0, 0))
        write_shard(tmp_path / "direct" / key, images[start:start + 32], 8, 4, chunk_encoder(compression))
    reread = zarr.open_array(tmp_path / "direct", mode="r")
    np.testing.assert_array_equal(reread[:], images)
    np.testing.assert_array_equal(reread[:], arrays["zarr"][:])
    tail = (tmp_path / "direct" / "c" / "2" / "0" / "0" / "0").read_bytes()
    index = np.frombuffer(tail[-4 - 4 * 16:-4], dtype="<u8").reshape(4, 2)
    assert index[0, 0] == 0 and (index[1:] == ABSENT).all()


def test_a_corrupt_shard_index_is_refused_by_zarr_python(tmp_path):
    images = patches(16, 32)
    array = zarr.create_array(tmp_path / "a", shape=images.shape, dtype="uint8", chunks=(8, 32, 32, 3),
                              shards=(16, 32, 32, 3), compressors=zarr_compressors("zstd"), fill_value=0)
    path = tmp_path / "a" / array.metadata.encode_chunk_key((0, 0, 0, 0))
    write_shard(path, images, 8, 2, chunk_encoder("zstd"))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a bit of the index, not covered by a matching CRC32C any more
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(tmp_path / "a", mode="r")[:]


def test_store_writer_writes_whole_shards_and_resumes_after_a_stray_temp_file(tmp_path):
    images = patches(600)  # 128 px: chunks of 16, shards of 512 -> one full shard and a tail of 88 patches
    coords = np.stack([np.arange(600) * 256, np.zeros(600, int)], axis=1)
    final = OutputLayout(tmp_path).store("s")
    writer = PatchStoreWriter(final, ATTRS, coords, np.ones(600), compression="zstd")
    assert (writer.shard, writer.chunk) == (512, 16)
    writer.write(0, images[:512])
    assert writer.patches_written == 512
    stray = partial_path(final) / "images" / "c" / "1" / "0" / "0" / ".0.12345.tmp"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half a shard")
    resumed = PatchStoreWriter(final, ATTRS, coords, np.ones(600), compression="zstd")
    assert resumed.patches_written == 512 and not stray.exists()
    with pytest.raises(StoreError, match="shard boundary"):
        resumed.write(500, images[500:])
    resumed.write(512, images[512:])
    store = open_patch_store(resumed.publish())
    assert store.attrs["compression"] == "zstd"
    np.testing.assert_array_equal(store.read_images(0, 600), images)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("n", [0, 5])
def test_store_metadata_written_directly_is_what_zarr_python_writes(tmp_path, compression, n):
    coords = np.stack([np.arange(n) * 256, np.arange(n) * 7], axis=1).astype(np.int64)
    fractions = np.linspace(0.5, 1.0, n).astype(np.float32)
    writer = PatchStoreWriter(OutputLayout(tmp_path).store("s"), ATTRS, coords, fractions, compression=compression)
    root = zarr.open_group(tmp_path / "zarr", mode="w", zarr_format=3)
    root.create_array("coords", data=coords, chunks=(max(n, 1), 2))
    root.create_array("tissue_fraction", data=fractions, chunks=(max(n, 1),))
    root.create_array("images", shape=(n, 128, 128, 3), dtype="uint8", chunks=(16, 128, 128, 3), shards=(512, 128, 128, 3),
                      compressors=zarr_compressors(compression), fill_value=0)
    for name in ("coords", "tissue_fraction", "images"):
        assert json.loads((writer.partial / name / "zarr.json").read_text()) == json.loads((tmp_path / "zarr" / name / "zarr.json").read_text())
    group = zarr.open_group(writer.partial, mode="r")
    np.testing.assert_array_equal(group["coords"][:], coords)
    np.testing.assert_array_equal(group["tissue_fraction"][:], fractions)
    assert group.attrs["patches_written"] == 0 and group.attrs["compression"] == compression


def test_the_store_a_writer_returns_is_the_store_read_back(tmp_path):
    images = patches(20)
    coords = np.stack([np.arange(20) * 256, np.arange(20)], axis=1)
    writer = PatchStoreWriter(OutputLayout(tmp_path).store("s"), ATTRS, coords, np.linspace(0.5, 1, 20))
    with pytest.raises(StoreError, match="not published"):
        writer.store()
    writer.write(0, images)
    read = open_patch_store(writer.publish())
    written = writer.store()
    assert written.attrs == read.attrs and store_fingerprint(written) == store_fingerprint(read)
    np.testing.assert_array_equal(written.coords, read.coords)
    np.testing.assert_array_equal(written.tissue_fraction, read.tissue_fraction)
    np.testing.assert_array_equal(written.read_images(0, 20), images)
