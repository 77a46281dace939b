"""Zarr v3 shards written directly, so that writing the patch store never holds tiling back.

zarr-python's sharded write costs about as much per patch as decoding it (it re-reads its own index,
compares every chunk with the fill value and runs an event loop per call). A patch store is written
once, whole shard by whole shard, so this module writes each shard file itself, in the format of the
v3 ``sharding_indexed`` codec: the inner chunks, each encoded with the array's compressor, back to back,
then an index of one (offset, nbytes) little-endian uint64 pair per chunk (``2**64-1`` twice for a
chunk that is absent) and the CRC32C of that index. The file is written under a temporary name and
renamed, so a killed run never leaves a half-written shard. zarr-python reads the result as usual.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

COMPRESSIONS = ("lz4", "zstd", "none")
ABSENT = 2**64 - 1  # offset and size of a chunk the shard does not hold
Buffer = bytes | memoryview  # an encoded chunk


def zarr_compressors(name: str) -> tuple:
    """The compressor codecs the array metadata names for ``name`` (what readers decode with)."""
    import zarr

    if name == "lz4":
        return (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1),)
    if name == "zstd":
        return (zarr.codecs.ZstdCodec(level=1),)
    if name == "none":
        return ()
    raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def chunk_encoder(name: str) -> Callable[[np.ndarray], Buffer]:
    """Encode one C-contiguous uint8 chunk exactly as ``zarr_compressors(name)`` decodes it (releases the GIL).

    ``none`` returns a view of the chunk, not a copy: it is written out before the chunk's memory is reused.
    """
    import imagecodecs

    if name == "lz4":
        return lambda chunk: imagecodecs.blosc_encode(chunk, level=5, compressor="lz4", shuffle=0, typesize=1, numthreads=1)
    if name == "zstd":
        return lambda chunk: imagecodecs.zstd_encode(chunk, level=1)
    if name == "none":
        return lambda chunk: memoryview(chunk).cast("B")
    raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def shard_parts(chunks: Sequence[Buffer | None]) -> list[Buffer]:
    """A shard file as its parts: ``chunks`` (None = absent) back to back, then their (offset, nbytes) index and its CRC32C."""
    import google_crc32c

    index = np.full((len(chunks), 2), ABSENT, dtype="<u8")
    offset = 0
    for i, chunk in enumerate(chunks):
        if chunk is not None:
            index[i] = offset, len(chunk)
            offset += len(chunk)
    raw = index.tobytes()
    crc = np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()
    return [*(c for c in chunks if c is not None), raw, crc]


def write_shard(path: Path, images: np.ndarray, chunk: int, chunks_per_shard: int,
                encode: Callable[[np.ndarray], Buffer], pool: Executor | None = None) -> None:
    """Write ``images`` (at most one shard, first axis) as the shard file ``path``, atomically.

    Chunks past the end of ``images`` are absent; a last, partial chunk is padded with zeros (the
    fill value), as zarr-python stores edge chunks. ``pool`` encodes the chunks in parallel. The parts
    are written one after another, never joined into one copy of the shard.
    """
    pieces = []
    for start in range(0, len(images), chunk):
        piece = images[start:start + chunk]
        if len(piece) < chunk:
            piece = np.concatenate([piece, np.zeros((chunk - len(piece), *piece.shape[1:]), piece.dtype)])
        pieces.append(np.ascontiguousarray(piece))
    encoded = list(pool.map(encode, pieces)) if pool is not None else [encode(p) for p in pieces]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        for part in shard_parts([*encoded, *[None] * (chunks_per_shard - len(encoded))]):
            fh.write(part)  # a buffered file writes a large part straight from its memory
    os.replace(tmp, path)
