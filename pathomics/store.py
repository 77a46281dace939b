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
from pathlib import Path
from typing import Any

import numpy as np

from pathomics.errors import StoreError
from pathomics.io import atomic_path, json_ready, partial_path, writing
from pathomics.shards import chunk_encoder, write_shard, zarr_compressors

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
    ``attrs`` is resumed from its last fully written shard, any other partial store is rebuilt.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any], coords: np.ndarray,
                 tissue_fraction: np.ndarray, with_pixels: bool = True, compression: str = "zstd") -> None:
        import zarr

        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.n = len(coords)
        self.patch_size = int(attrs["patch_size"])
        self.shard = patches_per_shard(self.patch_size)
        self.with_pixels = with_pixels
        self.chunk = patches_per_chunk(self.patch_size)
        self._encode = chunk_encoder(compression)
        wanted = json_ready({**attrs, "compression": compression, "complete": False})
        root = self._open_partial(wanted)
        if root is None:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            root = zarr.open_group(self.partial, mode="w", zarr_format=3)
            every_chunk = {"write_empty_chunks": True}  # an absent chunk file then always means damage
            root.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2), chunks=(max(self.n, 1), 2),
                              config=every_chunk)
            root.create_array("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32).reshape(-1),
                              chunks=(max(self.n, 1),), config=every_chunk)
            if with_pixels:
                p = self.patch_size
                root.create_array(
                    "images", shape=(self.n, p, p, 3), dtype="uint8",
                    chunks=(self.chunk, p, p, 3), shards=(self.shard, p, p, 3), compressors=zarr_compressors(compression),
                    fill_value=0, config=every_chunk,
                )
            # one metadata write (attrs.update rewrites zarr.json once per key: 23 ms for a store's 31)
            root.update_attributes({**wanted, "patches_written": 0 if with_pixels else self.n})
        self.root = root
        self.patches_written = int(root.attrs["patches_written"])
        for stray in self.partial.glob("images/c/**/.*.tmp"):  # a shard a killed run was writing
            stray.unlink()

    def _open_partial(self, wanted: dict[str, Any]):
        """The partial store of an interrupted run with identical parameters, or None."""
        import zarr

        if not (self.partial / "zarr.json").exists():
            return None
        try:
            root = zarr.open_group(self.partial, mode="r+", zarr_format=3)
            attrs = dict(root.attrs)
        except Exception:  # noqa: BLE001 - any unreadable partial store is simply rebuilt
            return None
        same = {k: attrs.get(k) for k in wanted} == wanted and root["coords"].shape[0] == self.n
        return root if same and ("images" in root) == self.with_pixels else None

    def write(self, start: int, images: np.ndarray, pool: Executor | None = None) -> None:
        """Write patches ``start:start+len(images)`` (``start`` on a shard boundary) shard by shard, recording progress.

        Each shard file is encoded (by ``pool``, if given) and written whole, then renamed into place.
        """
        if start % self.shard or not 0 <= start <= start + len(images) <= self.n:
            raise StoreError(f"{self.partial}: cannot write patches {start}:{start + len(images)} of {self.n}; "
                             f"writes start on a shard boundary ({self.shard} patches)")
        array = self.root["images"]
        for first in range(start, start + len(images), self.shard):
            shard = images[first - start:first - start + self.shard]
            key = array.metadata.encode_chunk_key((first // self.shard, 0, 0, 0))
            write_shard(self.partial / "images" / key, shard, self.chunk, self.shard // self.chunk, self._encode, pool)
            stop = first + len(shard)
            if stop % self.shard == 0 or stop == self.n:
                with writing(self.partial):
                    self.root.attrs["patches_written"] = stop
                self.patches_written = stop

    def publish(self) -> Path:
        """Mark the store complete and rename it into place, replacing any older store."""
        if self.patches_written != self.n:
            raise StoreError(f"{self.partial}: {self.patches_written} of {self.n} patches written; cannot publish")
        with writing(self.path):
            self.root.attrs["complete"] = True
            _replace_dir(self.partial, self.path)
        return self.path


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
    """A complete, validated patch store opened for reading."""

    path: Path
    attrs: dict[str, Any]
    coords: np.ndarray
    tissue_fraction: np.ndarray
    images: Any  # zarr.Array of (N, P, P, 3) uint8, or None for a coords-only store

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def has_pixels(self) -> bool:
        return self.images is not None

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
    import zarr

    path = Path(path)
    if not (path / "zarr.json").exists():
        hint = " (an interrupted run left it incomplete; re-run `pathomics tile`)" if partial_path(path).exists() else ""
        raise StoreError(f"{path}: no patch store here{hint}")
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
    return PatchStore(path, attrs, coords, np.asarray(root["tissue_fraction"][:]), images)


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

