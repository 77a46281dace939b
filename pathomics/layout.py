"""Every path under an output directory, in one place: stages meet at these files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DONE, SKIPPED, FAILED = "done", "skipped", "failed"  # a stage's outcome for one slide, as status.csv records it
PARTIAL_SUFFIX = ".partial"  # a store being built; renamed away once complete
DIGEST_SUFFIX = ".sha256"  # beside a pickled output (a checkpoint, a result): its SHA-256, checked when loaded
STATUS_FILE = "status.csv"
SIGNATURES_FILE = "signatures.parquet"
FINAL_CHECKPOINT = "final.pt"  # the MIL model refitted on every patient


def feature_file_in(directory: str | os.PathLike, slide_id: str) -> Path:
    """``<slide_id>.h5`` in a folder of feature files (``features/``, or one a CLAM/TRIDENT run wrote)."""
    return Path(directory) / f"{slide_id}.h5"


def store_slide_id(store_path: str | os.PathLike) -> str:
    """The slide id a patch store's directory is named after."""
    return Path(store_path).name.removesuffix(PARTIAL_SUFFIX).removesuffix(".zarr")


def tissue_annotation(directory: str | os.PathLike, slide_id: str) -> Path:
    """``<slide_id>.geojson`` in a folder of tissue outlines drawn elsewhere (``tile --tissue-dir``)."""
    return Path(directory) / f"{slide_id}.geojson"


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
        """``tiles/<slide_id>.thumb.png``: the thumbnail with the tissue outline and the kept patches drawn on it."""
        return self.tiles / f"{slide_id}.thumb.png"

    def plain_thumbnail(self, slide_id: str) -> Path:
        """``tiles/<slide_id>.plain.png``: the same thumbnail with nothing drawn on it, for heatmaps and reports."""
        return self.tiles / f"{slide_id}.plain.png"

    def store_ids(self) -> list[str]:
        """Slide ids of every patch store under tiles/, complete or still ``.partial``."""
        names = {p.name.removesuffix(PARTIAL_SUFFIX) for p in self.tiles.glob("*.zarr*") if p.is_dir()}
        return sorted(store_slide_id(n) for n in names if n.endswith(".zarr"))

    # quality control
    def qc_table(self, slide_id: str) -> Path:
        """Per-patch quality scores ``qc/<slide_id>.parquet``, in the store's order."""
        return self.root / "qc" / f"{slide_id}.parquet"

    def qc_thumbnail(self, slide_id: str) -> Path:
        """``qc/<slide_id>.qc.png``: the slide thumbnail with flagged patches drawn in their flag's colour."""
        return self.root / "qc" / f"{slide_id}.qc.png"

    @property
    def qc_summary(self) -> Path:
        return self.root / "qc_summary.csv"

    # embedding
    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_file(self, slide_id: str) -> Path:
        """The CLAM/TRIDENT feature file ``features/<slide_id>.h5``."""
        return feature_file_in(self.features, slide_id)

    def feature_ids(self) -> list[str]:
        """Slide ids of every feature file under features/."""
        return sorted(p.stem for p in self.features.glob("*.h5"))

    # MIL
    @property
    def attention(self) -> Path:
        return self.root / "attention"

    def attention_file(self, slide_id: str) -> Path:
        return self.attention / f"{slide_id}.h5"

    def heatmap(self, slide_id: str) -> Path:
        return self.root / "heatmaps" / f"{slide_id}.png"

    def planted_heatmap(self, slide_id: str) -> Path:
        """The demo's map of where the signal was planted, beside the attention heatmap."""
        return self.root / "heatmaps" / f"{slide_id}.planted.png"

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
        return self.mil_models / FINAL_CHECKPOINT

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
    def survival_files(self) -> ResultFiles:
        return ResultFiles(self.survival)

    @property
    def grade_fusion(self) -> Path:
        """The comparison of plain and grade-guided fusion (``survival grade-fusion``)."""
        return self.survival / "grade_fusion.json"

    @property
    def report(self) -> Path:
        """The run's (and the demo's) report, at the top of its output directory."""
        return self.root / "report.html"

    @property
    def cohort(self) -> CohortFiles:
        """The synthetic cohort the demo writes and then reads like a user's tables."""
        return CohortFiles(self.root / "cohort")

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

    def slide_stamp(self, slide_id: str) -> Path:
        """``stages/slides/<slide_id>.json``: the digest of the inputs, settings and outputs a slide last finished
        tile + embed with, so that an unchanged re-run skips it without opening the slide."""
        return self.root / "stages" / "slides" / f"{slide_id}.json"

    # exports for other tools
    @property
    def export(self) -> Path:
        return self.root / "export"

    def qupath_geojson(self, slide_id: str) -> Path:
        """``export/qupath/<slide_id>.geojson``: the slide's patches as QuPath detection objects."""
        return self.export / "qupath" / f"{slide_id}.geojson"

    @property
    def anndata_slides(self) -> Path:
        """``export/anndata/slides.h5ad``: one row per slide, signatures in ``obsm``."""
        return self.export / "anndata" / "slides.h5ad"

    def anndata_patches(self, slide_id: str) -> Path:
        """``export/anndata/<slide_id>.h5ad``: one row per embedded patch, features in ``obsm``."""
        return self.export / "anndata" / f"{slide_id}.h5ad"

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    def lock(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"


@dataclass(frozen=True)
class ResultFiles:
    """The files of one survival results folder: ``<out>/survival/``, the folder ``survival fit --out`` names, or
    ``survival/longitudinal/``."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def table(self, name: str) -> Path:
        """``<name>.csv``: coefficients, predictions, nomogram, intervals."""
        return self.root / f"{name}.csv"

    def figure(self, name: str) -> Path:
        """``<name>.png``: km, td_auc, calibration, decision_curve, nomogram."""
        return self.root / f"{name}.png"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def model(self) -> Path:
        """The fitted models, pickled, that ``survival evaluate`` applies unchanged."""
        return self.root / "model.pkl"

    @property
    def model_provenance(self) -> Path:
        """``model.json``: the fitted models' configuration and library versions."""
        return self.root / "model.json"


@dataclass(frozen=True)
class CohortFiles:
    """The tables of a synthetic cohort: manifest, clinical and radiology tables, and the planted truth."""

    root: Path

    def slide(self, slide_id: str) -> Path:
        """``slides/<slide_id>.svs``: an Aperio-flavoured pyramidal TIFF."""
        return self.root / "slides" / f"{slide_id}.svs"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def clinical(self) -> Path:
        return self.root / "clinical.csv"

    @property
    def radiology(self) -> Path:
        return self.root / "radiology.csv"

    @property
    def truth(self) -> Path:
        return self.root / "truth.json"

