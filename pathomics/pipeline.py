"""Archive runs: tile and embed each slide on Dask workers, then MIL and survival over the cohort.

Slides are independent tasks on a Dask cluster: a local one by default (``workers`` processes), or an
existing one at ``scheduler`` (the same code path; workers must see the same file system). Every stage
skips finished, validated outputs, so a re-run resumes where a crash or reboot stopped. Each slide is
processed under an exclusive ``flock`` on ``<out>/locks/<slide_id>.lock`` (``batch.exclusive_lock``), so
two runs on one output directory never process a slide twice; a slide held by the other run is waited
for at the end, then found finished. One failing slide is recorded and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pathomics.batch import DONE, FAILED, StatusRow, exclusive_lock, progress, run_one, update_status
from pathomics.errors import CohortError
from pathomics.extract import EmbedConfig, embed_job, resolve_device
from pathomics.manifest import SlideEntry
from pathomics.mil import MILConfig
from pathomics.store import feature_path, store_path
from pathomics.survival.config import SurvivalConfig
from pathomics.tiling import TileConfig, tile_job

if TYPE_CHECKING:
    from pathomics.survival import SurvivalResult

log = logging.getLogger(__name__)
BUSY = "busy"
# Out-of-fold signatures come from a different MIL model per fold, so their sig_* spaces do not line up
# across folds while the per-fold standardised risk does: archive runs fuse modalities at decision level.
RUN_FUSION = "decision"
COHORT = "cohort"  # the slide_id of cohort-level rows in status.csv


@dataclass(frozen=True)
class RunConfig:
    """The stage configurations of an archive run, and where it runs."""

    tile: TileConfig = field(default_factory=TileConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    mil: MILConfig = field(default_factory=lambda: MILConfig(task="survival"))
    survival: SurvivalConfig = field(default_factory=lambda: SurvivalConfig(fusion=RUN_FUSION))
    mil_model: Path | None = None  # apply this trained MIL checkpoint instead of cross-validated training
    workers: int = 1
    threads_per_worker: int | None = None  # decode and torch threads of each local worker; None: cores // workers
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or (self.threads_per_worker is not None and self.threads_per_worker < 1):
            raise ValueError(f"workers and threads per worker must be at least 1, got {self.workers} and "
                             f"{self.threads_per_worker}")

    @property
    def worker_threads(self) -> int:
        """Threads each local worker decodes and runs torch with, so that workers share the cores, not oversubscribe them."""
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)


@dataclass(frozen=True)
class RunResult:
    """Every status row of the run, where the signatures are, and the fitted survival models."""

    rows: list[StatusRow]
    signatures: Path
    survival: SurvivalResult

    @property
    def slide_rows(self) -> list[StatusRow]:
        """The per-slide rows (tile, embed), without the cohort-level ones."""
        return [r for r in self.rows if r.slide_id != COHORT]


def process_slide(entry: SlideEntry, out_dir: Path, tile: TileConfig, embed: EmbedConfig, wait: bool = False) -> list[StatusRow]:
    """Tile then embed one slide under its lock (runs on a Dask worker); a failed tile skips the embedding."""
    with exclusive_lock(out_dir / "locks" / f"{entry.slide_id}.lock", wait) as locked:
        if not locked:
            return [StatusRow(entry.slide_id, "tile", BUSY, 0.0, "another run holds this slide's lock")]
        tiled = run_one("tile", tile_job(entry, out_dir, tile))
        if tiled.state == FAILED:
            return [tiled]
        job = embed_job(store_path(out_dir, entry.slide_id), out_dir, _worker_embed_config(embed), worker_backbone(embed))
        return [tiled, run_one("embed", job)]


def _worker_embed_config(config: EmbedConfig) -> EmbedConfig:
    """Background readers only where they pay: feeding a GPU, from a worker process allowed to start them.

    Dask workers start processes by spawning, so each reader imports torch afresh, about 2 s per reader and
    slide; on a CPU the worker's cores are busy with the model anyway. Measured on 8 slides of ~230 patches
    (benchmarks/archive.py settings, 1 worker): 47.6 s with 2 readers, 14.4 s reading in the worker.
    """
    on_gpu = resolve_device(config.device).type == "cuda"
    return config if on_gpu and not multiprocessing.current_process().daemon else replace(config, num_workers=0)


@lru_cache(maxsize=2)
def worker_backbone(config: EmbedConfig):  # noqa: ANN202 - a torch module, imported lazily
    """The backbone, loaded once per worker process and reused for every slide it embeds."""
    from pathomics.models.backbones import load_backbone

    return load_backbone(config.model, config.weights, config.input_size)


def run_slides(entries: Sequence[SlideEntry], out_dir: Path, config: RunConfig, client: object | None = None,
               show_progress: bool = True) -> list[StatusRow]:
    """Tile and embed every slide on Dask; slides another run holds are waited for at the end, then skipped.

    ``client``: a connected ``distributed.Client`` to use instead of the one ``config`` describes. On a local
    cluster each worker decodes with ``config.worker_threads`` threads; an external cluster's workers keep the tile config's.
    """
    from distributed import as_completed

    tile = config.tile if config.scheduler else replace(config.tile, threads=config.worker_threads)
    rows: list[StatusRow] = []
    with contextlib.nullcontext(client) if client is not None else dask_client(config) as client, \
            progress("tile + embed", len(entries), show_progress) as advance:

        def submit(batch: Sequence[SlideEntry], wait: bool) -> dict:
            return {client.submit(process_slide, e, out_dir, tile, config.embed, wait,
                                  key=f"slide-{e.slide_id}-{time.time_ns()}", pure=False): e for e in batch}

        pending, busy = submit(entries, wait=False), []
        for wait in (False, True):
            for future in as_completed(list(pending)):
                entry = pending.pop(future)
                slide_rows = _result_rows(future, entry)
                if not wait and any(r.state == BUSY for r in slide_rows):
                    busy.append(entry)
                    continue
                rows += slide_rows
                update_status(out_dir, slide_rows)
                advance(entry.slide_id, FAILED if any(r.state == FAILED for r in slide_rows) else slide_rows[-1].state,
                        max((r.patches for r in slide_rows if r.state == DONE), default=0))
            pending, busy = submit(busy, wait=True), []
    return rows


def _result_rows(future, entry: SlideEntry) -> list[StatusRow]:  # noqa: ANN001 - a distributed.Future
    """The rows a slide task returned, or one failed row when the task itself died (e.g. its worker was killed)."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - anything that killed the task is this slide's failure
        return [StatusRow(entry.slide_id, "tile+embed", FAILED, 0.0, f"{type(exc).__name__}: {exc}")]


@contextlib.contextmanager
def dask_client(config: RunConfig) -> Iterator[object]:
    """A client of the given scheduler, or of a local cluster of ``workers`` processes, one task at a time each."""
    import dask
    from distributed import Client, LocalCluster

    if config.scheduler:
        with Client(config.scheduler) as client:
            yield client
        return
    threads = str(config.worker_threads)
    with dask.config.set({"distributed.worker.daemon": False, "distributed.logging.distributed": "warning"}), \
            LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                         env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}) as cluster, \
            Client(cluster) as client:
        yield client


def mil_labels(entries: Sequence[SlideEntry], clinical: pd.DataFrame, out_dir: Path, config: SurvivalConfig) -> Path:
    """``<out>/labels.csv`` (slide_id, patient_id, time, event) for the embedded slides of patients in the clinical table."""
    missing = [e.slide_id for e in entries if not e.patient_id]
    if missing:
        raise CohortError(f"the manifest gives no patient_id for {len(missing)} slide(s) (e.g. {missing[0]}); "
                          "add a patient_id column so slides can be joined with the clinical table")
    slides = pd.DataFrame({"slide_id": [e.slide_id for e in entries], "patient_id": [e.patient_id for e in entries]})
    slides = slides[[feature_path(out_dir, s).exists() for s in slides.slide_id]]
    clinical = clinical.rename(columns={config.id_col: "patient_id", config.time_col: "time", config.event_col: "event"})
    labels = slides.merge(clinical[["patient_id", "time", "event"]].astype({"patient_id": str}), on="patient_id")
    if labels.empty:
        raise CohortError("no embedded slide belongs to a patient of the clinical table; check the patient_id values")
    path = out_dir / "labels.csv"
    labels.to_csv(path, index=False)
    return path


def run_archive(entries: Sequence[SlideEntry], clinical: Path, out_dir: Path, config: RunConfig = RunConfig(),
                radiology: Path | None = None) -> RunResult:
    """Tile → embed every slide, then MIL (trained by cross-validation, or ``mil_model`` applied) → survival."""
    from pathomics.mil import predict_mil, train_mil
    from pathomics.survival import survival_fit

    out_dir = Path(out_dir)
    clinical_table = pd.read_csv(clinical, dtype={config.survival.id_col: str})
    rows = run_slides(entries, out_dir, config)
    with exclusive_lock(out_dir / "locks" / f"{COHORT}.lock", wait=True):
        labels = mil_labels(entries, clinical_table, out_dir, config.survival)
        start = time.perf_counter()
        if config.mil_model is None:
            train_mil(out_dir / "features", labels, out_dir, config.mil)
        else:
            ids = pd.read_csv(labels, dtype=str)
            predict_mil(config.mil_model, out_dir / "features", out_dir, slide_ids=list(ids.slide_id),
                        patients=dict(zip(ids.slide_id, ids.patient_id)), show_progress=False)
        rows.append(_cohort_row("mil", start))
        start = time.perf_counter()
        signatures = out_dir / "signatures.parquet"
        survival = survival_fit(config.survival, clinical, radiology, signatures, out_dir)
        rows.append(_cohort_row("survival", start))
    update_status(out_dir, rows[-2:])
    return RunResult(rows, signatures, survival)


def _cohort_row(stage: str, start: float) -> StatusRow:
    return StatusRow(COHORT, stage, DONE, round(time.perf_counter() - start, 3))

