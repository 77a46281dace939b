"""On-disk contracts between stages: the Zarr v3 patch store and the CLAM/TRIDENT HDF5 feature file.

Both are written atomically: a patch store is built under ``<slide_id>.zarr.partial`` and renamed to
``<slide_id>.zarr`` once its last shard is written and ``complete`` is set; a feature file is written to a
temporary file beside it and renamed. Readers refuse anything incomplete or foreign.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pathomics.errors import StoreError
from pathomics.io import atomic_path, json_ready, partial_path, writing
from pathomics.shards import chunk_encoder, compressor_metadata, write_shard

STORE_ATTRS = (
    "slide_id", "source_path", "source_size_bytes", "source_mtime", "backend", "mpp_level0", "mpp_source",
    "target_mpp", "read_level", "downsample", "patch_size", "patch_size_level0", "overlap", "min_tissue",
    "tissue_method", "pathomics_version", "complete",
)
FEATURE_FILE_ATTRS = ("model", "weights", "weights_sha256", "embedding_dim", "precision", "slide_id", "pathomics_version")
FEATURE_COORDS_ATTRS = ("patch_size", "patch_size_level0", "target_mpp")
CHUNK_BYTES = 1 << 20   # one compressed unit (4 patches of 256 px): reading one patch decodes little
SHARD_BYTES = 32 << 20  # one file (128 patches of 256 px): a batch of a few hundred is a few reads


def patches_per_chunk(patch_size: int, target_bytes: int = CHUNK_BYTES) -> int:
    """Largest power of two of RGB patches that fits ``target_bytes`` (at least 1)."""
    n = max(1, target_bytes // (patch_size * patch_size * 3))
    return 1 << (n.bit_length() - 1)


def patches_per_shard(patch_size: int) -> int:
    """Patches per shard file: a power-of-two multiple of the chunk, about SHARD_BYTES uncompressed."""
    return max(patches_per_chunk(patch_size), patches_per_chunk(patch_size, SHARD_BYTES))


class PatchStoreWriter:
    """Builds one slide's patch store under its ``.partial`` name, shard by shard, resumably.

    ``attrs`` are the provenance attributes; a partial store left by an interrupted run with the same
    ``attrs`` is resumed from its last fully written shard, any other partial store is rebuilt. The Zarr v3
    metadata (``zarr.json`` of the group and of each array) and the two small arrays are written directly,
    like the shards: zarr-python took a tenth of a second to create a store, a biopsy's whole decoding time.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any], coords: np.ndarray,
                 tissue_fraction: np.ndarray, with_pixels: bool = True, compression: str = "zstd") -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.n = len(coords)
        self.patch_size = int(attrs["patch_size"])
        self.shard = patches_per_shard(self.patch_size)
        self.with_pixels = with_pixels
        self.chunk = patches_per_chunk(self.patch_size)
        self._encode = chunk_encoder(compression)
        self.coords = np.asarray(coords, dtype="<i8").reshape(-1, 2)
        self.tissue_fraction = np.asarray(tissue_fraction, dtype="<f4").reshape(-1)
        wanted = json_ready({**attrs, "compression": compression, "complete": False})
        self.attrs = self._open_partial(wanted)
        if self.attrs is None:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            with writing(self.partial):
                self._create(compression)
            # the group's metadata last: a partial store without it is rebuilt, never resumed
            self.attrs = {**wanted, "patches_written": 0 if with_pixels else self.n}
            self._write_attrs()
        self.patches_written = int(self.attrs["patches_written"])
        for stray in self.partial.glob("images/c/**/.*.tmp"):  # a shard a killed run was writing
            stray.unlink()

    def _create(self, compression: str) -> None:
        """The arrays' metadata, and the coordinates and tissue fractions (one chunk each, as zarr-python writes them).

        Written in place, not through temporary files: until the group's ``zarr.json`` is written after them, the
        partial store is rebuilt, never resumed, so a file cut short by a kill is never read."""
        n = max(self.n, 1)
        _write_small_array(self.partial / "coords", self.coords, (n, 2))
        _write_small_array(self.partial / "tissue_fraction", self.tissue_fraction, (n,))
        if self.with_pixels:
            p = self.patch_size
            sharding = {"name": "sharding_indexed", "configuration": {
                "chunk_shape": [self.chunk, p, p, 3], "codecs": [{"name": "bytes"}, *compressor_metadata(compression)],
                "index_codecs": [_LITTLE_ENDIAN, {"name": "crc32c"}], "index_location": "end"}}
            _write_json(self.partial / "images" / "zarr.json",
                        array_metadata((self.n, p, p, 3), "uint8", (self.shard, p, p, 3), [sharding], 0), atomic=False)

    def _write_attrs(self) -> None:
        _write_json(self.partial / "zarr.json", {"attributes": self.attrs, "zarr_format": 3, "node_type": "group"})

    def _open_partial(self, wanted: dict[str, Any]) -> dict[str, Any] | None:
        """The attributes of an interrupted run's partial store with identical parameters, or None."""
        try:
            attrs = json.loads((self.partial / "zarr.json").read_text())["attributes"]
            n = json.loads((self.partial / "coords" / "zarr.json").read_text())["shape"][0]
        except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: rebuilt
            return None
        same = {k: attrs.get(k) for k in wanted} == wanted and n == self.n
        return attrs if same and (self.partial / "images" / "zarr.json").exists() == self.with_pixels else None

    def write(self, start: int, images: np.ndarray, pool: Executor | None = None) -> None:
        """Write patches ``start:start+len(images)`` (``start`` on a shard boundary) shard by shard, recording progress.

        Each shard file is encoded (by ``pool``, if given) and written whole, then renamed into place.
        """
        if start % self.shard or not 0 <= start <= start + len(images) <= self.n:
            raise StoreError(f"{self.partial}: cannot write patches {start}:{start + len(images)} of {self.n}; "
                             f"writes start on a shard boundary ({self.shard} patches)")
        for first in range(start, start + len(images), self.shard):
            shard = images[first - start:first - start + self.shard]
            key = f"c/{first // self.shard}/0/0/0"  # the default chunk key encoding, separator "/"
            write_shard(self.partial / "images" / key, shard, self.chunk, self.shard // self.chunk, self._encode, pool)
            stop = first + len(shard)
            if stop % self.shard == 0 or stop == self.n:
                self.attrs["patches_written"] = stop
                self._write_attrs()
                self.patches_written = stop

    def publish(self) -> Path:
        """Mark the store complete and rename it into place, replacing any older store."""
        if self.patches_written != self.n:
            raise StoreError(f"{self.partial}: {self.patches_written} of {self.n} patches written; cannot publish")
        self.attrs["complete"] = True
        self._write_attrs()
        with writing(self.path):
            _replace_dir(self.partial, self.path)
        return self.path

    def store(self) -> PatchStore:
        """The published store as written (not read back and validated: its pixels are opened on first use)."""
        if not self.attrs["complete"]:
            raise StoreError(f"{self.partial}: not published yet")
        return PatchStore(self.path, json.loads(json.dumps(self.attrs)), self.coords, self.tissue_fraction, self.with_pixels)


_LITTLE_ENDIAN = {"name": "bytes", "configuration": {"endian": "little"}}


def array_metadata(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], codecs: list[dict], fill_value: Any) -> dict:
    """A Zarr v3 array's ``zarr.json``, as zarr-python writes it (default chunk keys ``c/i/j``)."""
    return {"shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}}, "fill_value": fill_value,
            "codecs": codecs, "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []}


def _write_small_array(directory: Path, data: np.ndarray, chunks: tuple[int, ...]) -> None:  # chunks: the shape, or (1, ...) when empty
    """A one-chunk array with zarr-python's default codecs (little-endian bytes, zstd): metadata and its chunk."""
    import imagecodecs

    codecs = [_LITTLE_ENDIAN, {"name": "zstd", "configuration": {"level": 0, "checksum": False}}]
    fill = 0.0 if data.dtype.kind == "f" else 0
    _write_json(directory / "zarr.json", array_metadata(data.shape, data.dtype.name, chunks, codecs, fill), atomic=False)
    if data.size:  # the one chunk is the whole array; an empty array has none
        path = directory / "c" / "/".join("0" * len(chunks))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(imagecodecs.zstd_encode(np.ascontiguousarray(data).tobytes(), level=1))


def _write_json(path: Path, document: dict, atomic: bool = True) -> None:
    """Metadata JSON, atomically (a reader never sees half of it) unless nothing reads it before it is whole."""
    if not atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2))


def update_store_attrs(path: str | os.PathLike, **attrs: Any) -> None:
    """Set attributes of a complete store's group in its ``zarr.json`` (read, updated, replaced atomically)."""
    path = Path(path) / "zarr.json"
    with writing(path):
        document = json.loads(path.read_text())
    document["attributes"].update(json_ready(attrs))
    _write_json(path, document)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename directory ``src`` onto ``dst``; an existing ``dst`` is moved aside first, then deleted."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@dataclass(frozen=True)
class PatchStore:
    """A complete patch store opened for reading: validated, or just written by ``PatchStoreWriter``."""

    path: Path
    attrs: dict[str, Any]
    coords: np.ndarray
    tissue_fraction: np.ndarray
    has_pixels: bool

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @cached_property
    def images(self) -> Any:
        """zarr.Array of (N, P, P, 3) uint8, opened on first use, or None for a coords-only store."""
        if not self.has_pixels:
            return None
        import zarr

        return zarr.open_array(self.path / "images", mode="r")

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """Patches ``start:stop`` as a (n, P, P, 3) uint8 array (needs a store with pixels)."""
        if self.images is None:
            raise StoreError(f"{self.path} is a coords-only store; read its patches from the slide instead")
        try:
            return np.asarray(self.images[start:stop])
        except (OSError, RuntimeError, ValueError) as exc:
            raise StoreError(f"{self.path}: patches {start}-{stop} cannot be read ({exc}); the store is damaged: "
                             "delete it and re-run `pathomics tile`") from exc


def store_fingerprint(store: PatchStore) -> str:
    """SHA-256 of a store's provenance attributes and coordinates: changes whenever the store is rebuilt differently.

    The ``qc`` attribute is left out: QC is refreshed in place and changes no pixel.
    """
    attrs = {k: v for k, v in store.attrs.items() if k != "qc"}
    fingerprint = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode())
    fingerprint.update(np.ascontiguousarray(store.coords, dtype=np.int64).tobytes())
    return fingerprint.hexdigest()


def open_patch_store(path: str | os.PathLike) -> PatchStore:
    """Open a patch store, refusing one that is missing, incomplete or not a pathomics store."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        hint = " (an interrupted run left it incomplete; re-run `pathomics tile`)" if partial_path(path).exists() else ""
        raise StoreError(f"{path}: no patch store here{hint}")
    import zarr  # after the check: tiling a new slide asks first whether its store exists

    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for foreign directories
        raise StoreError(f"{path}: not a Zarr v3 patch store ({exc})") from exc
    missing = [k for k in STORE_ATTRS if k not in attrs] + [a for a in ("coords", "tissue_fraction") if a not in root]
    if missing:
        raise StoreError(f"{path}: not a pathomics patch store (missing {', '.join(missing)})")
    if attrs["complete"] is not True:
        raise StoreError(f"{path}: incomplete patch store; re-run `pathomics tile` to finish it")
    coords = np.asarray(root["coords"][:])
    images = root["images"] if "images" in root else None
    p = int(attrs["patch_size"])
    if coords.ndim != 2 or coords.shape[1] != 2 or (images is not None and images.shape != (len(coords), p, p, 3)):
        raise StoreError(f"{path}: inconsistent array shapes; delete it and re-run `pathomics tile`")
    absent = [key for name in ("coords", "tissue_fraction", "images") if name in root
              for key in _missing_chunk_files(path / name, root[name])]
    if absent:
        raise StoreError(f"{path}: {len(absent)} chunk file(s) missing (e.g. {absent[0]}), so some patches would read "
                         "as zeros; the store is damaged: delete it and re-run `pathomics tile`")
    store = PatchStore(path, attrs, coords, np.asarray(root["tissue_fraction"][:]), images is not None)
    vars(store)["images"] = images  # the array checked above, not opened twice
    return store


def _missing_chunk_files(directory: Path, array: Any) -> list[str]:
    """Storage files (shards, or chunks when unsharded) a complete array must have but that are absent.

    zarr reads an absent chunk as its fill value, so a deleted shard would silently become black patches.
    """
    unit = array.shards or array.chunks
    counts = [-(-n // u) for n, u in zip(array.shape, unit)]
    keys = np.indices(counts).reshape(len(counts), -1).T if all(counts) else np.zeros((0, len(counts)), int)
    names = ("c/" + "/".join(map(str, key)) for key in keys)
    return [f"{directory.name}/{name}" for name in names if not (directory / name).is_file()]


@dataclass(frozen=True)
class FeatureFile:
    """The contents of a CLAM/TRIDENT-style feature file."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]
    coords_attrs: dict[str, Any]


def write_feature_file(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray,
                       attrs: Mapping[str, Any], coords_attrs: Mapping[str, Any]) -> Path:
    """Write ``features`` (N, D) float32 and ``coords`` (N, 2) int64 with their attributes, atomically."""
    import h5py

    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64)
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise StoreError(f"{path}: features {features.shape} and coords {coords.shape} do not pair up")
    missing = [k for k in FEATURE_FILE_ATTRS if k not in attrs] + [k for k in FEATURE_COORDS_ATTRS if k not in coords_attrs]
    if missing:
        raise StoreError(f"{path}: feature file attributes missing: {', '.join(missing)}")
    # Built in memory, then written by Python: HDF5 failing to write a file (disk full, size limit) crashes the process.
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("features", data=features)
        dset = h5.create_dataset("coords", data=coords)
        dset.attrs.update(json_ready(coords_attrs))
        h5.attrs.update(json_ready(attrs))
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


def read_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Read a feature file written by pathomics, CLAM or TRIDENT; refuse one without features/coords."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5 or "coords" not in h5:
                raise StoreError(f"{path}: not a feature file (needs datasets 'features' and 'coords')")
            features = np.asarray(h5["features"][:])
            coords = np.asarray(h5["coords"][:])
            attrs = json_ready(dict(h5.attrs))
            coords_attrs = json_ready(dict(h5["coords"].attrs))
    except OSError as exc:
        raise StoreError(f"{path}: cannot read feature file ({exc})") from exc
    if features.ndim != 2 or coords.ndim != 2 or len(coords) != len(features):
        raise StoreError(f"{path}: features {features.shape} and coords {coords.shape} do not pair up")
    return FeatureFile(path, features.astype(np.float32, copy=False), coords.astype(np.int64, copy=False), attrs, coords_attrs)

