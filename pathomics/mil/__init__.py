"""The MIL stage: feature files + a labels table -> trained aggregators, slide signatures, attention, heatmaps.

``train_mil`` cross-validates an aggregator at patient level (all slides of a patient in one fold), writes
out-of-fold ``signatures.parquet``, ``attention/<slide_id>.h5`` and ``metrics.json`` (plus ``mil_config.json``
and checkpoints under ``mil_models/``), and refits a final model on every patient for ``predict_mil``.
Modules: ``config`` (MILConfig), ``bags`` (feature files matched to labels), ``aggregators`` (the models),
``train`` (losses and the training loop), ``crossval``, ``predict``, ``artifacts`` (checkpoints, attention,
signatures) and ``heatmap``. Names load on first use, so ``pathomics.mil.config`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MILConfig": "config",
    "LabelledBags": "bags",
    "load_bags": "bags",
    "read_labels": "bags",
    "read_patients": "bags",
    "MILEnsemble": "aggregators",
    "build_aggregator": "aggregators",
    "list_aggregators": "aggregators",
    "register_aggregator": "aggregators",
    "MILRun": "crossval",
    "train_mil": "crossval",
    "predict_mil": "predict",
    "apply_trained": "predict",
    "SlideResult": "artifacts",
    "TrainedMIL": "artifacts",
    "load_trained": "artifacts",
    "read_attention": "artifacts",
    "write_signatures": "artifacts",
    "export_signatures": "artifacts",
    "draw_heatmap": "heatmap",
    "render_heatmap": "heatmap",
    "render_heatmaps": "heatmap",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pathomics.mil' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pathomics.mil.{module}"), name)


__all__ = sorted(_EXPORTS)
