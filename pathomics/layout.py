"""Every path under an output directory, in one place: stages meet at these files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DONE, SKIPPED, FAILED = "done", "skipped", "failed"  # a stage's outcome for one slide, as status.csv records it
PARTIAL_SUFFIX = ".partial"  # a store being built; renamed away once complete
STATUS_FILE = "status.csv"
SIGNATURES_FILE = "signatures.parquet"


@dataclass(frozen=True)
class OutputLayout:
    """``<out>/``: tiles/, features/, attention/, heatmaps/, qc/, mil_models/, survival/, locks/ and the tables."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # tiling
    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    def store(self, slide_id: str) -> Path:
        """The patch store ``tiles/<slide_id>.zarr``."""
        return self.tiles / f"{slide_id}.zarr"

    def tissue_geojson(self, slide_id: str) -> Path:
        return self.tiles / f"{slide_id}.tissue.geojson"

    def thumbnail(self, slide_id: str) -> Path:
        return self.tiles / f"{slide_id}.thumb.png"

    def store_ids(self) -> list[str]:
        """Slide ids of every patch store under tiles/, complete or still ``.partial``."""
        names = {p.name.removesuffix(PARTIAL_SUFFIX) for p in self.tiles.glob("*.zarr*") if p.is_dir()}
        return sorted(n.removesuffix(".zarr") for n in names if n.endswith(".zarr"))

    # quality control
    def qc_table(self, slide_id: str) -> Path:
        """Per-patch quality scores ``qc/<slide_id>.parquet``, in the store's order."""
        return self.root / "qc" / f"{slide_id}.parquet"

    @property
    def qc_summary(self) -> Path:
        return self.root / "qc_summary.csv"

    # embedding
    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_file(self, slide_id: str) -> Path:
        """The CLAM/TRIDENT feature file ``features/<slide_id>.h5``."""
        return self.features / f"{slide_id}.h5"

    # MIL
    @property
    def attention(self) -> Path:
        return self.root / "attention"

    def attention_file(self, slide_id: str) -> Path:
        return self.attention / f"{slide_id}.h5"

    def heatmap(self, slide_id: str) -> Path:
        return self.root / "heatmaps" / f"{slide_id}.png"

    @property
    def signatures(self) -> Path:
        return self.root / SIGNATURES_FILE

    @property
    def mil_metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def mil_config(self) -> Path:
        return self.root / "mil_config.json"  # prefixed: an archive run shares one output directory

    @property
    def mil_models(self) -> Path:
        return self.root / "mil_models"

    def fold_checkpoint(self, fold: int) -> Path:
        return self.mil_models / f"fold_{fold}.pt"

    @property
    def final_checkpoint(self) -> Path:
        return self.mil_models / "final.pt"

    @property
    def splits(self) -> Path:
        """The cross-validation folds (patient → fold), saved so that finished folds are skipped."""
        return self.mil_models / "splits.json"

    @property
    def labels(self) -> Path:
        """The labels table an archive run derives from the clinical table."""
        return self.root / "labels.csv"

    # survival, runs
    @property
    def survival(self) -> Path:
        return self.root / "survival"

    @property
    def longitudinal(self) -> Path:
        """Results of ``survival longitudinal``: the time-varying Cox model and the landmark sequence model."""
        return self.survival / "longitudinal"

    @property
    def survival_result(self) -> Path:
        """The pickled SurvivalResult of an archive run, reloaded when the stage is skipped."""
        return self.survival / "result.pkl"

    def stage_stamp(self, stage: str) -> Path:
        """``stages/<stage>.json``: the digest of the inputs and settings a cohort-level stage last finished on."""
        return self.root / "stages" / f"{stage}.json"

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    def lock(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"
