"""Per-slide batch execution: failure isolation, ``status.csv`` bookkeeping and progress.

One bad slide never stops a batch: its error is recorded as ``failed`` with the message, and the
others go on. ``<out>/status.csv`` keeps one row per (slide_id, stage), updated atomically.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

from pathomics.errors import PathomicsError
from pathomics.layout import DONE, FAILED, SKIPPED, OutputLayout
from pathomics.locks import exclusive_lock
from pathomics.io import WrittenFiles, atomic_path, writing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusRow:
    """The outcome of one stage on one slide."""

    slide_id: str
    stage: str
    state: str
    seconds: float
    error: str = ""
    patches: int = 0  # patches the stage produced or read (0 where it does not apply)


Outcome = tuple[str, int]  # (DONE or SKIPPED, patches)


@dataclass(frozen=True)
class SlideJob:
    """One unit of batch work: ``run`` returns (DONE or SKIPPED, patches), or raises."""

    slide_id: str
    run: Callable[[], Outcome]


def run_jobs(stage: str, jobs: Sequence[SlideJob], out_dir: str | os.PathLike, show_progress: bool = True,
             at_once: int = 1) -> list[StatusRow]:
    """Run ``jobs``, ``at_once`` at a time (threads of this process; 1: one after another), isolating failures;
    record every outcome in ``status.csv``. Rows come back in the order the slides finished.

    Each slide is taken under its lock (the one ``run`` holds): a slide another process holds is left to the
    end and waited for, so two runs on one output directory never work on one slide at once nor twice.
    """
    layout = OutputLayout(out_dir)
    rows: list[StatusRow] = []
    with progress(stage, len(jobs), show_progress) as advance:
        def run_locked(job: SlideJob, wait: bool) -> bool:
            with exclusive_lock(layout.lock(job.slide_id), wait) as locked:
                if locked:
                    row = run_one(stage, job)
                    rows.append(row)
                    update_status(out_dir, [row])
                    advance(job.slide_id, row.state, row.patches if row.state == DONE else 0)
                return locked

        taken = in_threads(lambda job: run_locked(job, wait=False), jobs, at_once)
        for job in [job for job, locked in zip(jobs, taken) if not locked]:  # held elsewhere
            run_locked(job, wait=True)
    return rows


def in_threads(fn: Callable[[SlideJob], bool], jobs: Sequence[SlideJob], at_once: int) -> list[bool]:
    """``fn`` of each job, ``at_once`` at a time, in order. On Ctrl-C or an error the jobs not yet begun are
    cancelled and those running finish (a thread cannot be stopped; their slides are recorded)."""
    if at_once <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    pool = ThreadPoolExecutor(at_once, thread_name_prefix="pathomics-slide")
    try:
        return list(pool.map(fn, jobs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_one(stage: str, job: SlideJob) -> StatusRow:
    """Run one job, turning an expected failure (bad slide, bad store, I/O error) into a failed row.

    Anything else is a bug and propagates: it must not be recorded as a bad slide.
    """
    start = time.perf_counter()
    try:
        (state, patches), error = job.run(), ""
    except (PathomicsError, OSError) as exc:
        state, patches, error = FAILED, 0, one_line(exc)
    return StatusRow(job.slide_id, stage, state, round(time.perf_counter() - start, 3), error, patches)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line; of a multi-line message (a re-raised worker traceback) its last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return re.sub(r"^(?:\w+\.)+(?=\w+: )", "", lines[-1])  # "pathomics.errors.StoreError: ..." -> "StoreError: ..."
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_status(out_dir: str | os.PathLike) -> list[StatusRow]:
    """The rows of ``<out_dir>/status.csv`` (empty when there is none yet); a last row cut short by a killed
    writer is left out."""
    path = OutputLayout(out_dir).status
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [row for r in csv.DictReader(fh) if (row := _status_row(r)) is not None]


def _status_row(record: dict[str, str | None]) -> StatusRow | None:
    try:
        return StatusRow(record["slide_id"], record["stage"], record["state"], float(record["seconds"]),  # type: ignore[arg-type]
                         record["error"] or "", int(record.get("patches") or 0))
    except (TypeError, ValueError):  # fields missing or cut: the line a killed append left
        return None


STATUS_FIELDS = [f.name for f in fields(StatusRow)]
_written: WrittenFiles[dict[tuple[str, str], StatusRow]] = WrittenFiles()  # status files as this process left them


def update_status(out_dir: str | os.PathLike, rows: Iterable[StatusRow]) -> None:
    """Merge ``rows`` into ``status.csv``, replacing earlier rows of the same slide and stage, except that a
    ``skipped`` row never replaces a ``done`` one: the record of the run that did the work is kept.

    The read-merge-replace runs under an exclusive lock, so concurrent runs on one output directory
    never lose each other's rows. A file this process wrote last and that nobody changed since is not read
    again, and a new slide's row is appended to it: a batch's rows cost the same for its 5,000th slide as for
    its first (rewriting the table for every slide cost 54 ms a slide at 5,000). Anything else (a replaced
    row, a file another process changed) rewrites the table atomically.
    """
    layout = OutputLayout(out_dir)
    path = layout.status
    with exclusive_lock(layout.lock("status"), wait=True):
        merged = _written.take(path)
        ours = merged is not None
        if merged is None:
            merged = {(r.slide_id, r.stage): r for r in read_status(out_dir)}
        added, replaced = [], False
        for row in rows:
            key = (row.slide_id, row.stage)
            earlier = merged.get(key)
            if row == earlier or (row.state == SKIPPED and earlier is not None and earlier.state == DONE):
                continue
            merged[key] = row
            added.append(row)
            replaced = replaced or earlier is not None
        if ours and not replaced:
            if added:
                with writing(path), path.open("a", newline="") as fh:
                    csv.DictWriter(fh, fieldnames=STATUS_FIELDS).writerows(asdict(r) for r in added)
        else:
            with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=STATUS_FIELDS)
                writer.writeheader()
                writer.writerows(asdict(r) for r in merged.values())
        _written.wrote(path, merged)


def exit_code(rows: Sequence[StatusRow]) -> int:
    """0 when every slide succeeded, 1 when any failed (DESIGN's exit-code contract)."""
    return 1 if any(r.state == FAILED for r in rows) else 0


def summarize(stage: str, rows: Sequence[StatusRow]) -> str:
    """Done, skipped and failed counts (a line per stage when ``rows`` span several), then each failed slide and why."""
    stages = {name: [r for r in rows if r.stage == name] for name in dict.fromkeys(r.stage for r in rows)}
    if len(stages) <= 1:
        stages = {stage: list(rows)}
    lines = [f"{name}: {sum(r.state == DONE for r in group)} done, {sum(r.state == SKIPPED for r in group)} skipped "
             f"(already complete), {sum(r.state == FAILED for r in group)} failed" for name, group in stages.items()]
    lines += [f"  FAILED {r.slide_id}: {r.error}" for r in rows if r.state == FAILED]
    return "\n".join(lines)


class progress:
    """Slides done and patches per second: a rich progress bar on a terminal, a log line per slide elsewhere.

    The rate counts the patches of slides processed in this run (skipped slides add none) over the time since start.
    """

    def __init__(self, stage: str, total: int, enabled: bool) -> None:
        self.stage, self.total, self.enabled, self.bar = stage, total, enabled, None
        self.lock = threading.Lock()

    def __enter__(self) -> Callable[[str, str, int], None]:
        if self.enabled and sys.stderr.isatty():  # rich is imported only to draw a bar (a fifth of a second of start-up)
            self._start_bar()
        self.done, self.patches, self.start = 0, 0, time.perf_counter()
        return self.advance

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[last]}"), console=console)
            self.bar.start()
            self.task = self.bar.add_task(self.stage, total=self.total, rate="", last="")

    @property
    def rate(self) -> str:
        """Patches per second so far, as shown (nothing for a stage that counts no patches)."""
        if not self.patches:
            return ""
        return f"{self.patches / max(time.perf_counter() - self.start, 1e-9):.0f} patches/s"

    def advance(self, slide_id: str, state: str, patches: int = 0) -> None:
        """Count one finished slide and the ``patches`` it processed (from any of the batch's threads)."""
        with self.lock:
            self.done, self.patches = self.done + 1, self.patches + patches
            if self.bar is not None:
                self.bar.update(self.task, advance=1, rate=self.rate, last=f"{slide_id}: {state}")
            elif self.enabled:
                log.info("%s [%d/%d] %s: %s%s", self.stage, self.done, self.total, slide_id, state,
                         f" ({self.rate})" if self.rate else "")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


class epoch_progress:
    """Epochs of a model being trained: on a terminal, a rich bar (``mil abmil fold 2/5 ━━━ epoch 7/40 0:00:03``)
    that clears when training ends; elsewhere nothing (each fold's metrics are logged as it ends)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def __enter__(self) -> epoch_progress:
        if not (self.enabled and sys.stderr.isatty()):  # rich is imported only to draw a bar, as for `progress`
            return self
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
                                TimeElapsedColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=None)
        return self

    def show(self, description: str, epoch: int, epochs: int) -> None:
        """Show ``description`` at ``epoch`` of ``epochs`` (0: starting)."""
        if self.bar is not None:
            self.bar.update(self.task, description=description, completed=epoch, total=epochs, refresh=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
