"""pathomics: whole-slide images to slide signatures and recurrence models.

The library API is importable from the top level; submodules load on first use so that the
tiling path never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_slide": "pathomics.slide",
    "TileConfig": "pathomics.tiling",
    "tile_slide": "pathomics.tiling",
    "detect_tissue": "pathomics.tissue",
    "open_patch_store": "pathomics.store",
    "embed_store": "pathomics.embed",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pathomics' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
