"""Stage functions as per-slide batch jobs: each returns (``done`` or ``skipped``, patches) or raises."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pathomics.batch import Outcome, SlideJob
from pathomics.layout import store_slide_id
from pathomics.manifest import SlideEntry
from pathomics.tiling import TileConfig, tile_slide

if TYPE_CHECKING:  # torch is imported only when embedding runs: `pathomics tile` starts in a fraction of the time
    from pathomics.embed import EmbedConfig
    from pathomics.encoders.base import Backbone


def tile_job(entry: SlideEntry, out_dir: str | os.PathLike, config: TileConfig,
             tissue_geojson: str | os.PathLike | None = None, backend: str = "auto") -> SlideJob:
    """``tile_slide`` as a batch job; ``tissue_geojson`` overrides the entry's."""
    def run() -> Outcome:
        result = tile_slide(entry.slide_path, out_dir, config, mpp=entry.mpp, slide_id=entry.slide_id,
                            tissue_geojson=tissue_geojson or entry.tissue_geojson, backend=backend)
        return result.state, result.n_patches

    return SlideJob(entry.slide_id, run)


def embed_job(store_path: str | os.PathLike, out_dir: str | os.PathLike, config: EmbedConfig,
              backbone: Backbone | None = None) -> SlideJob:
    """``embed_slide`` as a batch job, named after the store directory."""
    from pathomics.embed import embed_slide

    def run() -> Outcome:
        result = embed_slide(store_path, out_dir, config, backbone)
        return result.state, result.n_patches

    return SlideJob(store_slide_id(store_path), run)
