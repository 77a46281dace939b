"""Zarr v3 shards written directly, so that writing the patch store never holds tiling back.

zarr-python's sharded write costs about as much per patch as decoding it (it re-reads its own index,
compares every chunk with the fill value and runs an event loop per call). A patch store is written
once, whole shard by whole shard, so this module writes each shard file itself, in the format of the
v3 ``sharding_indexed`` codec: the inner chunks, each encoded with the array's compressor and followed by
the CRC32C of its bytes (the ``crc32c`` codec, so a damaged chunk fails to decode), back to back, then an index of one (offset, nbytes) little-endian uint64 pair per chunk (``2**64-1`` twice for a
chunk that is absent) and the CRC32C of that index. The file is written under a temporary name and
renamed, so a killed run never leaves a half-written shard. zarr-python reads the result as usual.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from pathomics.io import writing

COMPRESSIONS = ("lz4", "zstd", "none")
ABSENT = 2**64 - 1  # offset and size of a chunk the shard does not hold
Buffer = bytes | np.ndarray  # a flat uint8 array for an uncompressed chunk
Chunk = tuple[Buffer, bytes]  # an encoded chunk: its compressed bytes, then their CRC32C (little-endian)


def compressor_metadata(name: str) -> list[dict]:
    """The compressor codecs of the array metadata for ``name`` (what readers decode with), each chunk checksummed."""
    checksum = {"name": "crc32c"}
    if name == "lz4":
        return [{"name": "blosc", "configuration": {"typesize": 1, "cname": "lz4", "clevel": 5, "shuffle": "noshuffle",
                                                    "blocksize": 0}}, checksum]
    if name == "zstd":
        return [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}, checksum]
    if name == "none":
        return [checksum]
    raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def zarr_compressors(name: str) -> tuple:
    """``compressor_metadata(name)`` as zarr-python codecs, for arrays that zarr-python itself writes."""
    from zarr.registry import get_codec_class

    return tuple(get_codec_class(codec["name"]).from_dict(codec) for codec in compressor_metadata(name))


def chunk_encoder(name: str) -> Callable[[np.ndarray], Chunk]:
    """Encode one C-contiguous uint8 chunk exactly as ``compressor_metadata(name)`` decodes it (releases the GIL).

    ``none`` keeps a view of the chunk, not a copy: it is written out before the chunk's memory is reused.
    """
    import imagecodecs

    if name == "lz4":
        compress = lambda chunk: imagecodecs.blosc_encode(chunk, level=5, compressor="lz4", shuffle=0, typesize=1, numthreads=1)  # noqa: E731
    elif name == "zstd":
        compress = lambda chunk: imagecodecs.zstd_encode(chunk, level=1)  # noqa: E731
    elif name == "none":
        compress = lambda chunk: chunk.reshape(-1)  # noqa: E731  (uint8: one element per byte)
    else:
        raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
    return lambda chunk: with_crc32c(compress(chunk))


def with_crc32c(data: Buffer) -> Chunk:
    """``data`` and its CRC32C, as the ``crc32c`` codec appends it."""
    import google_crc32c

    return data, np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


def shard_parts(chunks: Sequence[Chunk | None]) -> list[Buffer]:
    """A shard file as its parts: ``chunks`` (None = absent) back to back, then their (offset, nbytes) index and its CRC32C."""
    index = np.full((len(chunks), 2), ABSENT, dtype="<u8")
    offset = 0
    for i, chunk in enumerate(chunks):
        if chunk is not None:
            size = sum(len(part) for part in chunk)
            index[i] = offset, size
            offset += size
    return [*(part for chunk in chunks if chunk is not None for part in chunk), *with_crc32c(index.tobytes())]


def write_shard(path: Path, images: np.ndarray, chunk: int, chunks_per_shard: int,
                encode: Callable[[np.ndarray], Chunk], pool: Executor | None = None) -> None:
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            for part in shard_parts([*encoded, *[None] * (chunks_per_shard - len(encoded))]):
                fh.write(part)  # a buffered file writes a large part straight from its memory
        os.replace(tmp, path)
