"""The demo: a synthetic cohort with a planted signal, the whole pipeline on it, and a report of what it recovered.

Embedding uses ``shufflenet-v2`` with RANDOM weights (nothing can be downloaded here); every output
says so. The report compares the four survival models and shows, for the highest-risk slides, the
attention heatmap beside the planted lesions, with the share of attention that falls on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pathomics.embed import EmbedConfig
from pathomics.layout import OutputLayout
from pathomics.manifest import read_manifest
from pathomics.mil import MILConfig
from pathomics.runner.pipeline import RunConfig, RunResult, run_archive
from pathomics.runner.report import HEATMAP_WIDTH
from pathomics.survival.config import SurvivalConfig
from pathomics.synthetic import SlideTruth, read_cohort_truth, write_cohort
from pathomics.tiling import TileConfig

FUSION_PENALIZERS = (0.0, 0.3, 3.0, 30.0)


def demo_config(workers: int = 1) -> RunConfig:
    """Stage settings sized for a few minutes on two CPU cores."""
    return RunConfig(
        # the slides' own 0.5 µm/px: ~340 patches a slide, enough lesion patches for attention to learn from
        tile=TileConfig(target_mpp=0.5, patch_size=128, min_tissue=0.5),
        embed=EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=128, input_size=128),
        # one model per fold: the demo is timed, and its survival numbers are those of this recipe
        mil=MILConfig(task="survival", model="abmil", folds=5, epochs=40, hidden_dim=128, lr=1e-3, seed=0,
                      ensemble=1),
        # ridge penalty by inner CV and non-negative stacking: chosen by benchmarks/fusion.py on cohorts of
        # other seeds (the best worst-case margin of combined over its best modality), never on the demo's
        survival=SurvivalConfig(covariates=("age", "stage", "tumour_size"), categorical=("stage",), folds=5,
                                n_bootstrap=200, risk_groups="median",
                                penalizer=FUSION_PENALIZERS, fusion_weights="non-negative"),
        workers=workers,
    )


@dataclass(frozen=True)
class PlantedAttention:
    """How much of a slide's attention falls on its planted lesion patches, against their share of patches."""

    slide_id: str
    risk: float
    planted_patch_share: float
    attention_on_planted: float


def attention_on_planted(out_dir: Path, truth: dict[str, SlideTruth], slide_ids: list[str]) -> list[PlantedAttention]:
    """For each slide: attention mass on patches whose centre lies in a planted region, vs those patches' share."""
    import shapely

    from pathomics.mil import read_attention
    from pathomics.store import open_patch_store

    signatures = pd.read_parquet(OutputLayout(out_dir).signatures).set_index("slide_id")
    found = []
    for slide_id in slide_ids:
        result = read_attention(OutputLayout(out_dir).attention_file(slide_id))
        half = int(open_patch_store(OutputLayout(out_dir).store(slide_id)).attrs["patch_size_level0"]) / 2
        centres = result.coords + half
        planted = shapely.contains_xy(truth[slide_id].lesions(), centres[:, 0], centres[:, 1])
        attention = result.attention / result.attention.sum()
        found.append(PlantedAttention(slide_id, float(signatures.loc[slide_id, "risk"]), float(planted.mean()),
                                      float(attention[planted].sum())))
    return found


def run_demo(out_dir: Path, n_patients: int = 80, seed: int = 0, workers: int = 1, top: int = 4) -> tuple[RunResult, list[PlantedAttention]]:
    """Write the cohort (once), run the pipeline on it, and write ``<out>/report.html``."""
    out_dir = Path(out_dir)
    cohort = write_cohort(OutputLayout(out_dir).cohort.root, n_patients=n_patients, seed=seed)
    result = run_archive(read_manifest(cohort.manifest), cohort.clinical, out_dir, demo_config(workers), radiology=cohort.radiology)
    truth = read_cohort_truth(cohort.truth)
    signatures = pd.read_parquet(OutputLayout(out_dir).signatures)
    everyone = attention_on_planted(out_dir, truth, list(signatures.slide_id))
    highest = sorted(everyone, key=lambda a: -a.risk)[:top]
    write_demo_report(out_dir, result, truth, everyone, highest, workers)
    return result, everyone


def write_demo_report(out_dir: Path, result: RunResult, truth: dict[str, SlideTruth],
                      everyone: list[PlantedAttention], highest: list[PlantedAttention], workers: int = 1) -> Path:
    """``<out>/report.html``: the run's report, the oracle comparison, and attention heatmaps beside the planted regions."""
    from pathomics.runner.report import write_run_report
    from pathomics.synthetic.oracle import oracle_section
    from pathomics.survival.figures import Section, image_html, paragraph, table_html

    layout = OutputLayout(out_dir)
    panels = ""
    for item in highest:
        planted = _planted_png(out_dir, truth[item.slide_id], layout.planted_heatmap(item.slide_id))
        panels += paragraph(f"{item.slide_id}: risk {item.risk:.3f}; {item.attention_on_planted:.0%} of attention on planted "
                            f"patches, which are {item.planted_patch_share:.0%} of its patches")
        panels += (image_html(layout.heatmap(item.slide_id), f"attention heatmap of {item.slide_id}")
                   + image_html(planted, f"planted regions of {item.slide_id}"))
    table = pd.DataFrame([vars(a) for a in highest])
    mean_on, mean_share = np.mean([a.attention_on_planted for a in highest]), np.mean([a.planted_patch_share for a in highest])
    about = Section("About this demo", paragraph(
        "A synthetic cohort with planted clinical, radiology and pathology effects on recurrence. Patch embeddings "
        "come from shufflenet-v2 with RANDOM weights (no pretrained weights are downloaded): the pathology signal "
        "is recovered from texture alone. Each slide has planted lesions whose nuclei are denser, larger and darker "
        "in proportion to the patient's latent grade; how much of the tissue is lesion does not depend on it."))
    attention = Section("Attention on planted regions", paragraph(
        f"Highest-risk {len(highest)} slides: on average {mean_on:.0%} of attention falls on planted lesion patches, "
        f"which make up {mean_share:.0%} of their patches (all slides: {np.mean([a.attention_on_planted for a in everyone]):.0%} "
        f"vs {np.mean([a.planted_patch_share for a in everyone]):.0%}). For each slide: its thumbnail and the attention "
        "over it (rank within the slide), then the planted lesions in red.") + table_html(table) + panels)
    oracle = oracle_section(layout.cohort.truth, layout.cohort.clinical, result.survival)
    return write_run_report(out_dir, demo_config(workers), result.survival, name="demo", before=[about],
                            after=[oracle, attention], heatmaps_shown=0)


def _planted_png(out_dir: Path, truth: SlideTruth, path: Path) -> Path:
    """The store's plain thumbnail, ``HEATMAP_WIDTH`` px wide, with the planted lesions outlined in red."""
    import cv2

    from pathomics.io import write_png
    from pathomics.store import open_patch_store

    slide_id = truth.path.stem
    store = open_patch_store(OutputLayout(out_dir).store(slide_id))
    image = cv2.imread(str(OutputLayout(out_dir).plain_thumbnail(slide_id)))
    image = cv2.resize(image, (HEATMAP_WIDTH, round(image.shape[0] * HEATMAP_WIDTH / image.shape[1])), interpolation=cv2.INTER_LANCZOS4)
    scale = image.shape[1] / float(store.attrs["slide_width"])
    for polygon in truth.lesions().geoms:
        cv2.polylines(image, [np.rint(np.asarray(polygon.exterior.coords) * scale).astype(np.int32)], True, (0, 0, 230), 2)
    return write_png(path, image)
