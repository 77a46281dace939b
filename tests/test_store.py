"""Atomic outputs: nothing half-written is visible, and what is published has ordinary permissions."""

from __future__ import annotations

import os

import pytest

from pathomics.io import atomic_path


def test_outputs_get_ordinary_file_permissions(tmp_path):
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
