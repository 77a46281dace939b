"""Archive runs: tile and embed each slide on Dask workers, then MIL and survival over the cohort.

Slides are independent tasks on a Dask cluster: a local one by default (``workers`` processes), or an
existing one at ``scheduler`` (the same code path; workers must see the same file system). Every stage
skips finished, validated outputs, so a re-run resumes where a crash or reboot stopped. Each slide is
processed under an exclusive ``flock`` on ``<out>/locks/<slide_id>.lock`` (``locks.exclusive_lock``), so
two runs on one output directory never process a slide twice; a slide held by the other run is waited
for at the end, then found finished. One failing slide is recorded and the others go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pathomics.device import resolve_device
from pathomics.embed import EmbedConfig, config_backbone
from pathomics.errors import CohortError, ConfigError, InputError, PathomicsError
from pathomics.layout import DONE, SKIPPED, OutputLayout
from pathomics.manifest import SlideEntry
from pathomics.mil import MILConfig
from pathomics.batch import FAILED, StatusRow, progress, run_one, update_status
from pathomics.locks import exclusive_lock
from pathomics.runner.jobs import embed_job, tile_job
from pathomics.runner.preflight import (EncoderIdentity, check_duplicate_files, check_patient_ids, match_patients,
                                       resolve_encoder)
from pathomics.io import atomic_path, digest, intact, load_pickle, save_pickle, write_json
from pathomics.survival.config import SurvivalConfig
from pathomics.slide import source_stat
from pathomics.tiling import TileConfig

if TYPE_CHECKING:
    from pathomics.survival import SurvivalResult

log = logging.getLogger(__name__)
BUSY = "busy"
COHORT = "cohort"  # the slide_id of cohort-level rows in status.csv


@dataclass(frozen=True)
class RunConfig:
    """The stage configurations of an archive run, and where it runs."""

    tile: TileConfig = field(default_factory=TileConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    mil: MILConfig = field(default_factory=lambda: MILConfig(task="survival"))
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)
    mil_model: Path | None = None  # apply this trained MIL checkpoint instead of cross-validated training
    workers: int = 1
    threads_per_worker: int | None = None  # decode and torch threads of each local worker; None: cores // workers
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or (self.threads_per_worker is not None and self.threads_per_worker < 1):
            raise ConfigError(f"workers and threads per worker must be at least 1, got {self.workers} and "
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


def encoder_tile_config(model: str, **options: Any) -> TileConfig:
    """``TileConfig(**options)`` for embedding with encoder ``model``: a foundation preset tiles at the MPP and
    patch size it was trained at, unless ``options`` set them; other encoders keep TileConfig's defaults."""
    from pathomics.encoders.foundation import PRESETS

    recipe = PRESETS.get(model)
    trained = {"target_mpp": recipe.mpp, "patch_size": recipe.patch_size} if recipe else {}
    return TileConfig(**{**{k: v for k, v in trained.items() if v is not None}, **options})


def process_slide(entry: SlideEntry, out_dir: Path, tile: TileConfig, embed: EmbedConfig, wait: bool = False) -> list[StatusRow]:
    """Tile then embed one slide under its lock (runs on a Dask worker); a failed tile skips the embedding."""
    with exclusive_lock(OutputLayout(out_dir).lock(entry.slide_id), wait) as locked:
        if not locked:
            return [StatusRow(entry.slide_id, "tile", BUSY, 0.0, "another run holds this slide's lock")]
        tiled = run_one("tile", tile_job(entry, out_dir, tile))
        update_status(out_dir, [tiled])  # recorded here, so a slide finished before a Ctrl-C of the run is `done`
        if tiled.state == FAILED:
            return [tiled]
        job = embed_job(OutputLayout(out_dir).store(entry.slide_id), out_dir, _worker_embed_config(embed), worker_backbone(embed))
        embedded = run_one("embed", job)
        update_status(out_dir, [embedded])
        if embedded.state != FAILED:
            write_json(OutputLayout(out_dir).slide_stamp(entry.slide_id),
                       {"key": slide_key(entry, out_dir, tile, embed), "patches": embedded.patches})
        return [tiled, embedded]


def slide_key(entry: SlideEntry, out_dir: Path, tile: TileConfig, embed: EmbedConfig) -> str:
    """A digest of everything a slide's tile + embed depend on and produced: the entry, the settings (less the
    thread and reader counts, which change no output) and the identity of the slide, its tissue annotation, the
    weights file, the store and the feature file. Computed from ``stat`` calls alone, so it costs microseconds."""
    layout = OutputLayout(out_dir)
    try:
        source = source_stat(Path(entry.slide_path))
    except OSError:
        source = None
    settings = {"entry": [str(entry.slide_path), entry.slide_id, entry.mpp, source],
                "tile": {k: v for k, v in asdict(tile).items() if k != "threads"},
                "embed": {k: v for k, v in asdict(embed).items() if k != "num_workers"}}
    store = layout.store(entry.slide_id)
    paths = [store, store / "zarr.json", layout.feature_file(entry.slide_id)]
    paths += [Path(p) for p in (entry.tissue_geojson, embed.weights) if p and p != "random"]
    return inputs_key(settings, paths)


def _unchanged_rows(entry: SlideEntry, out_dir: Path, tile: TileConfig, embed: EmbedConfig) -> list[StatusRow] | None:
    """Skipped tile and embed rows when the slide's stamp says it finished with the same inputs and settings, else None."""
    start = time.perf_counter()
    try:
        stamp = json.loads(OutputLayout(out_dir).slide_stamp(entry.slide_id).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != slide_key(entry, out_dir, tile, embed):
        return None
    seconds = round(time.perf_counter() - start, 3)
    return [StatusRow(entry.slide_id, stage, SKIPPED, seconds, patches=int(stamp.get("patches", 0))) for stage in ("tile", "embed")]


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
    return config_backbone(config)


def run_slides(entries: Sequence[SlideEntry], out_dir: Path, config: RunConfig, client: object | None = None,
               show_progress: bool = True) -> list[StatusRow]:
    """Tile and embed every slide on Dask; slides another run holds are waited for at the end, then skipped.

    ``client``: a connected ``distributed.Client`` to use instead of the one ``config`` describes. On a local
    cluster each worker decodes with ``config.worker_threads`` threads; an external cluster's workers keep the tile config's.
    """
    from distributed import as_completed

    tile = config.tile if config.scheduler else replace(config.tile, threads=config.worker_threads)
    rows: list[StatusRow] = []
    unchanged = {e.slide_id: r for e in entries if (r := _unchanged_rows(e, out_dir, tile, config.embed))}
    if unchanged:  # no slide opened and, when nothing else is left, no cluster started
        rows += [r for slide_rows in unchanged.values() for r in slide_rows]
        update_status(out_dir, rows)
        log.info("tile + embed: %d slide(s) unchanged since they finished; skipped", len(unchanged))
    entries = [e for e in entries if e.slide_id not in unchanged]
    if not entries:
        return rows
    with contextlib.nullcontext(client) if client is not None else dask_client(config) as client, \
            progress("tile + embed", len(entries), show_progress) as advance:

        resources = task_resources(client)

        def submit(batch: Sequence[SlideEntry], wait: bool) -> dict:
            return {client.submit(process_slide, e, out_dir, tile, config.embed, wait, resources=resources,
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


def task_resources(client) -> dict[str, float] | None:  # noqa: ANN001 - a distributed.Client
    """``{"GPU": 1}`` when the cluster's workers advertise a ``GPU`` resource (``dask worker --resources GPU=1``),
    else None: each slide task then holds one card while it runs, so a worker per card runs one slide at a time
    however many threads it has. Asked only when some worker offers it: a task asking for a resource no worker
    has would wait forever."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers) else None


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
    quiet = "warning" if log.getEffectiveLevel() > logging.DEBUG else "info"  # Dask's INFO lines with -v only
    logging.getLogger("distributed").setLevel(quiet.upper())  # set when distributed was imported, before our config
    with dask.config.set({"distributed.worker.daemon": False, "distributed.logging.distributed": quiet}):
        with _workers_ignore_ctrl_c():  # the processes start here
            cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   # the scheduler's HTTP server always starts: on a free local port, never a taken 8787
                                   dashboard_address="127.0.0.1:0",
                                   env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                        "DASK_LOGGING__DISTRIBUTED": quiet})
        with cluster, Client(cluster) as client:
            yield client


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Start the local cluster's processes with SIGINT ignored (an ignored signal stays ignored in a child), then
    restore it: Ctrl-C reaches only this process, which stops the cluster, and no worker prints a traceback."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_run_inputs(entries: Sequence[SlideEntry], clinical: Path, radiology: Path | None,
                     config: RunConfig) -> pd.DataFrame:
    """Check every table the run will need before the first slide is touched; return the slides' labels.

    The clinical and radiology tables are validated as the survival stage will validate them (columns,
    values, missing-data policy), every slide needs a patient id, slides and clinical patients must match
    both ways (``preflight.match_patients``), and no slide file may be listed twice. Returns (slide_id,
    patient_id, time, event) for the slides of clinical patients.
    """
    from pathomics.survival import check_tables

    if not entries:
        raise InputError("no slides to process: give slide files or a manifest with at least one row")
    check_patient_ids(entries)
    check_duplicate_files(entries)
    if config.mil_model is not None and not Path(config.mil_model).exists():
        raise InputError(f"--mil-model-dir {config.mil_model} does not exist; give a `pathomics mil train` output "
                         "directory or checkpoint, or leave it out to train one")
    patients = check_tables(config.survival, clinical, radiology)
    kept = match_patients(entries, patients, clinical, config.survival)
    table = pd.read_csv(clinical, dtype={config.survival.id_col: str})
    columns = [config.survival.id_col, config.survival.time_col, config.survival.event_col]
    outcome = table[columns].set_axis(["patient_id", "time", "event"], axis=1)
    slides = pd.DataFrame({"slide_id": [e.slide_id for e in kept], "patient_id": [e.patient_id for e in kept]})
    return slides.merge(outcome, on="patient_id")


def write_labels(labels: pd.DataFrame, out_dir: Path, encoder: EncoderIdentity) -> tuple[Path, list[StatusRow]]:
    """``<out>/labels.csv`` for the slides whose feature file this run's encoder computed from the current store.

    A feature file of another model, weights or precision, or of an older store, is never put in a bag: it is
    left out with a failed ``bag`` row saying why. The file is left untouched when its content would not change.
    """
    layout = OutputLayout(out_dir)
    reasons = {s: stale_features(layout, s, encoder) for s in labels.slide_id}
    refused = [StatusRow(s, "bag", FAILED, 0.0, f"{layout.feature_file(s)}: {why}; not used (re-run to embed it again)")
               for s, why in reasons.items() if why and layout.feature_file(s).exists()]
    embedded = labels[[not reasons[s] for s in labels.slide_id]]
    if embedded.empty:
        raise CohortError("no slide of a clinical patient was embedded by this run's encoder; nothing trained. "
                          "See status.csv for why each slide failed")
    text = embedded.to_csv(index=False)
    if not (layout.labels.is_file() and layout.labels.read_text() == text):
        with atomic_path(layout.labels) as tmp:
            tmp.write_text(text)
    return layout.labels, refused


def stale_features(layout: OutputLayout, slide_id: str, encoder: EncoderIdentity) -> str | None:
    """Why a slide's feature file cannot go into this run's bags (None when it can)."""
    import h5py

    from pathomics.store import open_patch_store, store_fingerprint

    path = layout.feature_file(slide_id)
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
        fingerprint = store_fingerprint(open_patch_store(layout.store(slide_id)))
    except (OSError, PathomicsError) as exc:
        return f"no readable feature file and patch store ({exc})"
    why = encoder.mismatch(attrs)
    if why is not None:
        return f"computed with another encoder setting ({why})"
    if attrs.get("store_fingerprint") != fingerprint:
        return "computed from another version of the patch store"
    return None


def run_archive(entries: Sequence[SlideEntry], clinical: Path, out_dir: Path, config: RunConfig = RunConfig(),
                radiology: Path | None = None) -> RunResult:
    """Check the inputs, tile → embed every slide, then MIL (trained by cross-validation, or ``mil_model``
    applied) → survival → ``report.html`` (``runner.report``). A cohort stage whose inputs and config are unchanged since it last finished is skipped."""
    out_dir = Path(out_dir)
    labels = check_run_inputs(entries, clinical, radiology, config)
    embed, encoder = resolve_encoder(config.embed)
    config = replace(config, embed=embed)
    rows = run_slides([e for e in entries if e.slide_id in set(labels.slide_id)], out_dir, config)
    layout = OutputLayout(out_dir)
    with exclusive_lock(layout.lock(COHORT), wait=True):
        labels_path, refused = write_labels(labels, out_dir, encoder)
        rows += refused
        update_status(out_dir, refused)
        ids = pd.read_csv(labels_path, dtype={"slide_id": str, "patient_id": str})
        mil_inputs = [labels_path, *(layout.feature_file(s) for s in ids.slide_id)]
        if config.mil_model is not None:
            mil_inputs.append(Path(config.mil_model))
        rows.append(_cohort_stage(layout, "mil", {"mil": config.mil.to_dict(), "model": str(config.mil_model)},
                                  mil_inputs, [layout.signatures], lambda: _mil_stage(layout, labels_path, ids, config)))
        survival_inputs = [p for p in (Path(clinical), radiology and Path(radiology), layout.signatures) if p]
        rows.append(_cohort_stage(layout, "survival", config.survival.to_dict(), survival_inputs,
                                  [layout.survival_result], lambda: _survival_stage(layout, clinical, radiology, config)))
        survival = load_pickle(layout.survival_result, "re-run `pathomics run`: it recomputes a damaged result")
        report_inputs = [layout.signatures, layout.survival_result, layout.mil_metrics,
                         *(p for s in ids.slide_id for p in (layout.feature_file(s), layout.qc_table(s), layout.attention_file(s)))]
        rows.append(_cohort_stage(layout, "report", {"mil": config.mil.to_dict(), "model": str(config.mil_model)},
                                  report_inputs, [layout.report], lambda: _report_stage(out_dir, config, survival)))
    update_status(out_dir, rows[-3:])
    return RunResult(rows, layout.signatures, survival)


def _mil_stage(layout: OutputLayout, labels: Path, ids: pd.DataFrame, config: RunConfig) -> None:
    from pathomics.mil import predict_mil, train_mil

    if config.mil_model is None:
        train_mil(layout.features, labels, layout.root, config.mil)
    else:
        predict_mil(config.mil_model, layout.features, layout.root, slide_ids=list(ids.slide_id),
                    patients=dict(zip(ids.slide_id, ids.patient_id)), device=config.mil.device, show_progress=False)


def _survival_stage(layout: OutputLayout, clinical: Path, radiology: Path | None, config: RunConfig) -> None:
    from pathomics.survival import survival_fit

    save_pickle(survival_fit(config.survival, clinical, radiology, layout.signatures, layout.root), layout.survival_result)


def _report_stage(out_dir: Path, config: RunConfig, survival: SurvivalResult) -> None:
    from pathomics.runner.report import write_run_report

    write_run_report(out_dir, config, survival)


def _cohort_stage(layout: OutputLayout, stage: str, settings: dict, inputs: Sequence[Path], outputs: Sequence[Path],
                  run: Callable[[], None]) -> StatusRow:
    """Run a cohort-level stage unless its stamp says it finished on these inputs with these settings and
    its outputs are all there, intact (a damaged pickled result is recomputed)."""
    start = time.perf_counter()
    key = inputs_key(settings, inputs)
    stamp = layout.stage_stamp(stage)
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and all(map(intact, outputs)):
        log.info("%s: inputs and settings unchanged since it finished; skipped", stage)
        return StatusRow(COHORT, stage, SKIPPED, round(time.perf_counter() - start, 3))
    run()
    write_json(stamp, {"key": key, "stage": stage})
    return StatusRow(COHORT, stage, DONE, round(time.perf_counter() - start, 3))


def inputs_key(settings: dict, paths: Sequence[Path]) -> str:
    """A digest of a stage's settings and input files (each file's path, size and modification time)."""
    def identity(path: Path) -> list:
        if not path.exists():
            return [str(path), None]
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]

    document = {"settings": settings, "inputs": [identity(Path(p)) for p in paths]}
    return digest(document)
