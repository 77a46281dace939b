"""Generic output I/O: atomic writes, the one JSON normaliser, content digests, checked pickles and PNG files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from pathomics.errors import StoreError, WriteError
from pathomics.layout import DIGEST_SUFFIX, PARTIAL_SUFFIX

T = TypeVar("T")

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def json_ready(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays, tuples, paths and bytes to Python; NaN and infinities (undefined
    metrics) to null; dict keys to strings. The one normaliser for JSON files, store attributes and HDF5 attributes."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def digest(document: Any) -> str:
    """SHA-256 of ``document`` as canonical JSON (sorted keys; other types by ``str``): a key of settings and inputs."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: str | os.PathLike, document: Mapping[str, Any]) -> None:
    """Write ``document`` as indented JSON, atomically, through ``json_ready``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(document), indent=2))


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary name an output is built under before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


_WRITE_ADVICE = {
    errno.ENOSPC: "free space on that disk, or write elsewhere (--out)",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file size limit (`ulimit -f unlimited`) or write to a disk that allows larger files (--out)",
    errno.EACCES: "make the folder writable for you",
    errno.EPERM: "make the folder writable for you",
    errno.EROFS: "the disk is read-only: write elsewhere",
}


def write_error(path: str | os.PathLike, exc: BaseException) -> WriteError:
    """A one-line ``WriteError`` naming ``path``, the OS's reason and what to do about it."""
    number = getattr(exc, "errno", None) or _errno_in(str(exc))
    reason = os.strerror(number) if number else str(exc).strip().splitlines()[-1]
    advice = _WRITE_ADVICE.get(number, "check that disk, or write elsewhere (--out)")
    return WriteError(f"cannot write {path}: {reason} (errno {number}); {advice}")


def _errno_in(message: str) -> int | None:
    """The errno a library's RuntimeError quotes (h5py: ``errno = 27``; torch: ``File too large (27)``)."""
    found = re.search(r"errno = (\d+)|\((\d+)\)\s*$", message.strip())
    return int(found.group(1) or found.group(2)) if found else None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OS error raised while writing ``path`` (or a library's RuntimeError quoting one) into a ``WriteError``."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and _errno_in(str(exc)) is None:
            raise
        raise write_error(path, exc) from exc


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time) of ``path``: any write by another process, or a replacement, changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class WrittenFiles(Generic[T]):
    """What this process last wrote to each file (a table kept in memory), given back only while the file is as
    it was left (same ``file_identity``): a per-slide table need not be read back for every slide of a batch."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[tuple[int, int, int] | None, T]] = {}

    def take(self, path: Path) -> T | None:
        """What was written to ``path`` if nobody changed the file since, else None; forgotten until ``wrote`` again
        (so a write that fails half-way leaves nothing stale behind)."""
        identity, value = self._files.pop(path, (None, None))
        return value if value is not None and identity == file_identity(path) else None

    def wrote(self, path: Path, value: T) -> None:
        """Record ``value`` as what ``path`` now holds."""
        self._files[path] = (file_identity(path), value)

    def clear(self) -> None:
        """Forget every file, as a new process would."""
        self._files.clear()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs get the usual permissions
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_png(path: str | os.PathLike, image_bgr: np.ndarray) -> Path:
    """Encode an OpenCV (BGR) image as PNG and write it atomically."""
    import cv2

    ok, png = cv2.imencode(".png", image_bgr)
    if not ok:
        raise StoreError(f"{path}: could not encode a PNG of shape {image_bgr.shape}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (provenance of weights and checkpoints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_digest(path: str | os.PathLike) -> Path:
    """The file beside ``path`` holding the SHA-256 it had when it was written."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def record_sha256(written: Path, path: str | os.PathLike) -> str:
    """Record beside ``path`` the SHA-256 of ``written`` (the temporary file about to be renamed onto it); returns it."""
    sha = sha256_file(written)
    with atomic_path(recorded_digest(path)) as tmp:
        tmp.write_text(sha + "\n")
    return sha


def checked_sha256(path: str | os.PathLike, remedy: str) -> str:
    """``path``'s SHA-256; a StoreError naming the file and ``remedy`` when it differs from the one recorded at write
    time (a file written without a record is taken as it is)."""
    actual, recorded = sha256_file(path), recorded_digest(path)
    if recorded.is_file() and recorded.read_text().strip() != actual:
        raise StoreError(f"{path} is damaged or was changed after it was written (its SHA-256 differs from the one in "
                         f"{recorded.name}); {remedy}")
    return actual


def intact(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and, where its SHA-256 was recorded, still has it."""
    recorded = recorded_digest(path)
    if not Path(path).exists():
        return False
    return not recorded.is_file() or recorded.read_text().strip() == sha256_file(path)


def save_pickle(document: Any, path: str | os.PathLike) -> str:
    """Pickle ``document`` to ``path`` atomically, its SHA-256 recorded beside it; returns the SHA-256."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as fh:
            pickle.dump(document, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return record_sha256(tmp, path)


def load_pickle(path: str | os.PathLike, remedy: str) -> Any:
    """Unpickle ``path`` after checking its recorded SHA-256; a damaged or truncated file is a StoreError that names
    it and says ``remedy`` (re-run the verb that wrote it). Unpickling can run code: load only files you wrote.
    A file written without a recorded SHA-256 is not hashed (its caller may check it against its own record)."""
    if recorded_digest(path).is_file():
        checked_sha256(path, remedy)
    try:
        with Path(path).open("rb") as fh:
            return pickle.load(fh)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise StoreError(f"{path} cannot be read ({one_line_reason(exc)}); {remedy}") from exc


def one_line_reason(exc: BaseException) -> str:
    """``Type: first line of the message``: a library's error, quoted inside one line of ours."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
