"""pathomics: whole-slide images to slide signatures and recurrence models.

The library API is importable from the top level (``dir(pathomics)`` lists it); each name loads its
module on first use, so that ``import pathomics`` and the tiling path never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "PathomicsError": "pathomics.errors",
    "ConfigError": "pathomics.errors",
    "InputError": "pathomics.errors",
    "CohortError": "pathomics.errors",
    "SlideReadError": "pathomics.errors",
    "StoreError": "pathomics.errors",
    "ModelError": "pathomics.errors",
    # outputs and slide lists
    "OutputLayout": "pathomics.layout",
    "SlideEntry": "pathomics.manifest",
    "read_manifest": "pathomics.manifest",
    # slides, tissue, tiling
    "open_slide": "pathomics.slide",
    "detect_tissue": "pathomics.tissue",
    "TileConfig": "pathomics.tiling",
    "tile_slide": "pathomics.tiling",
    "QCConfig": "pathomics.qc",
    "open_patch_store": "pathomics.store",
    "read_feature_file": "pathomics.store",
    # embedding
    "EmbedConfig": "pathomics.embed",
    "embed_store": "pathomics.embed",
    # MIL
    "MILConfig": "pathomics.mil",
    "train_mil": "pathomics.mil",
    "predict_mil": "pathomics.mil",
    "export_signatures": "pathomics.mil",
    # survival
    "SurvivalConfig": "pathomics.survival",
    "survival_fit": "pathomics.survival",
    "survival_evaluate": "pathomics.survival",
    "CoxModel": "pathomics.survival",
    # exports for QuPath and scverse
    "export_qupath": "pathomics.export",
    "export_anndata": "pathomics.export",
    # archives
    "RunConfig": "pathomics.runner.pipeline",
    "run_archive": "pathomics.runner.pipeline",
    "encoder_tile_config": "pathomics.runner.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pathomics' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The public names and the module's own dunders (not its imports)."""
    return sorted({*_EXPORTS, *(name for name in globals() if name.startswith("__"))})
