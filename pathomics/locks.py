"""Per-slide and per-stage locks: an exclusive ``flock`` that the kernel drops when its holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pathomics.io import writing


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False at once if another process holds it and not ``wait``.

    The kernel grants the lock atomically and drops it when the holder's file is closed or the holder
    dies, so a killed run leaves no stale lock behind (unlike check-then-create lock files).
    """
    path = Path(path)
    with writing(path):  # a read-only or full output folder: one line naming the lock file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
