"""The GPU check in one run: GPU tests, streaming embedding with nvImageCodec decode, tiling on all cores, MIL
training, each with patches/s, GPU utilisation (``nvidia-smi`` sampled in the background) and peak memory,
and the throughput targets marked pass or fail. ``benchmarks/gpu_check.sh`` runs it; one JSON comes out.

Parts (each skipped, with the reason, where it cannot run here):
  gpu_tests             ``pytest -m gpu`` (needs a CUDA device)
  tiling                ``pathomics tile --threads <cores>`` from the shell on the synthetic slide, start-up included
  embed_resnet50_trunc  resnet50-trunc bf16, random weights, end to end from a coords-only store, nvImageCodec decode
  embed_vit_l16         the ``uni`` preset's ViT-L/16 and recipe, bf16, random weights, the same way
  mil                   ABMIL training and evaluation epochs over random bags

The coords-only store lists the patches of a synthetic 0.25 µm/px slide tiled at 0.5 µm/px x 256 px, repeated
until it holds ``--patches`` (a slide that size takes minutes to write; every repeat decodes its tiles again,
as the decoder's tile cache holds one strip). Each embedding part is warmed up on one copy, then timed.

    benchmarks/gpu_check.sh                                   # on a GPU machine, a few minutes
    benchmarks/gpu_check.sh --device cpu --smoke --json /tmp/check.json   # tiny sizes, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embedding import build_slide_store
from mil_epochs import random_pool, time_model
from pathomics.device import resolve_device
from pathomics.embed import EmbedConfig, embed_store
from pathomics.encoders.backbones import load_backbone
from pathomics.layout import OutputLayout
from pathomics.mil import MILConfig
from pathomics.slide.nvimgcodec_tiles import nvimgcodec_available
from pathomics.store import PatchStoreWriter, open_patch_store, read_feature_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).parent / "results" / "gpu_check.json"
PARTS = ("gpu_tests", "tiling", "embed_resnet50_trunc", "embed_vit_l16", "mil")
EMBED_MODELS = {"embed_resnet50_trunc": "resnet50-trunc", "embed_vit_l16": "uni"}  # uni: ViT-L/16 with its recipe
SMOKE_MODEL = "shufflenet-v2"  # what both embedding parts run in --smoke, at a 64-px input
# (part, metric, minimum): the targets on an H100/H200-class card
TARGETS = (("embed_resnet50_trunc", "patches_per_s", 4000.0), ("embed_vit_l16", "patches_per_s", 2500.0),
           ("embed_resnet50_trunc", "gpu_busy_mean_pct", 85.0), ("embed_vit_l16", "gpu_busy_mean_pct", 85.0))
SMI_QUERY = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def parse_smi_line(line: str) -> tuple[float, float] | None:
    """``"87, 10240"`` → (87.0, 10240.0): utilisation % and memory used (MiB); None for anything else."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return (float(parts[0]), float(parts[1])) if len(parts) == 2 else None
    except ValueError:
        return None


def summarize_samples(samples: list[tuple[float, float]]) -> dict:
    """Mean and median GPU busy % and the peak memory used over a part's samples."""
    if not samples:
        return {"gpu_samples": 0}
    busy = [s[0] for s in samples]
    return {"gpu_samples": len(samples), "gpu_busy_mean_pct": round(statistics.fmean(busy), 1),
            "gpu_busy_median_pct": statistics.median(busy), "gpu_memory_used_peak_mib": max(s[1] for s in samples)}


def smi_index(device: torch.device) -> str:
    """nvidia-smi's id of a torch CUDA device (CUDA_VISIBLE_DEVICES renumbers what torch sees)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


@dataclass
class GpuSampler:
    """``nvidia-smi -lms`` in the background while a part runs: its (busy %, MiB used) samples."""

    command: list[str] | None
    samples: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def for_device(cls, device: torch.device, interval_ms: int) -> GpuSampler:
        smi = shutil.which("nvidia-smi")
        usable = smi is not None and device.type == "cuda"
        return cls([smi, *SMI_QUERY, f"-lms={interval_ms}", f"--id={smi_index(device)}"] if usable else None)

    @property
    def why_not(self) -> str | None:
        """Why nothing is sampled here (None: it is)."""
        if self.command is None:
            return "no nvidia-smi on PATH" if shutil.which("nvidia-smi") is None else "not a CUDA device"
        return None

    @contextmanager
    def sampling(self) -> Iterator[list[tuple[float, float]]]:
        """Sample while the block runs; yields the list the samples of this block land in."""
        taken: list[tuple[float, float]] = []
        if self.command is None:
            yield taken
            return
        proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        def read() -> None:
            for line in proc.stdout:
                if (sample := parse_smi_line(line)) is not None:
                    taken.append(sample)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield taken
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            reader.join(timeout=10)
            self.samples += taken


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: torch's allocator peak on a GPU (reset per part), peak RSS on a CPU."""
    if device.type == "cuda":
        return {"torch_peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_part(name: str, skip: str | None, body: Callable[[], dict], sampler: GpuSampler, device: torch.device) -> dict:
    """One part's row: ``{"skipped": reason}``, or its figures with seconds, GPU samples and peak memory."""
    if skip:
        print(f"{name:22s} skipped: {skip}", flush=True)
        return {"skipped": skip}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with sampler.sampling() as samples:
        row = body()
    row = {**row, "seconds": round(time.perf_counter() - start, 2), **summarize_samples(samples), **peak_memory(device)}
    if sampler.why_not:
        row["gpu_samples_skipped"] = sampler.why_not
    print(f"{name:22s} " + ", ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, dict)), flush=True)
    return row


def gpu_tests(timeout: int) -> dict:
    """``pytest -m gpu`` in a subprocess: its exit code and counts."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", str(ROOT / "tests")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", done.stdout)}
    return {"returncode": done.returncode, **counts, "passed_all": done.returncode == 0 and counts.get("passed", 0) > 0,
            "tail": done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []}


def repeat_store(store_path: Path, out: Path, patches: int) -> Path:
    """A coords-only store listing the patches of ``store_path`` again and again, ``patches`` in all."""
    store = open_patch_store(store_path)
    copies = -(-patches // len(store))
    coords = np.tile(store.coords, (copies, 1))[:patches]
    tissue = np.tile(store.tissue_fraction, copies)[:patches]
    attrs = {k: v for k, v in store.attrs.items() if k not in ("complete", "compression", "patches_written")}
    slide_id = f"{store.slide_id}x{copies}"
    return PatchStoreWriter(OutputLayout(out).store(slide_id), {**attrs, "slide_id": slide_id}, coords, tissue,
                            with_pixels=False).publish()


def embed_part(model: str, warm: Path, store: Path, out: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """Embed ``warm`` once, then time ``store`` end to end: patches/s, and the decoder the feature file records."""
    input_size = 64 if args.smoke else None
    backbone = load_backbone(model, "random", input_size, precision=args.precision)
    config = EmbedConfig(model=model, weights="random", device=str(device), precision=args.precision,
                         batch_size=args.batch_size, num_workers=args.num_workers, input_size=input_size, decoder="nvimgcodec")
    embed_store(warm, out / "warm-up", config, backbone=backbone)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    path = embed_store(store, out / "timed", config, backbone=backbone)
    seconds = time.perf_counter() - start
    result = read_feature_file(path)
    n = len(result.features)
    return {"model": backbone.name, "precision": args.precision, "input_size": backbone.input_size, "patches": n,
            "batch_size": args.batch_size, "decoder": result.attrs["decoder"], "timed_s": round(seconds, 2),
            "patches_per_s": round(n / seconds, 1)}


def tiling_part(slide: Path, out: Path, threads: int) -> dict:
    """``pathomics tile --threads N`` from the shell: wall time and patches/s with start-up."""
    command = [sys.executable, "-m", "pathomics.cli.main", "tile", str(slide), "--out", str(out), "--mpp", "0.5",
               "--patch-size", "256", "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    n = len(open_patch_store(OutputLayout(out).store(slide.stem)))
    return {"threads": threads, "patches": n, "wall_s": round(seconds, 2), "patches_per_s": round(n / seconds, 1)}


def mil_part(device: torch.device, bags: int, patches: int, dim: int) -> dict:
    """One ABMIL training epoch and one evaluation pass over random bags on ``device``."""
    row = time_model("abmil", random_pool(min(16, bags), patches, dim), bags, dim, MILConfig(), device)
    return {"model": "abmil", "bags": bags, "patches_per_bag": patches, "dim": dim, **row,
            "train_patches_per_s": round(bags * patches / row["train_s_per_epoch"], 1)}


def judge(parts: dict[str, dict], evaluate: str | None) -> list[dict]:
    """Each target with its measured value and pass/fail; ``evaluate``: why none is judged here (None: judge them)."""
    rows = []
    for part, metric, minimum in TARGETS:
        value = parts[part].get(metric)
        why = evaluate or parts[part].get("skipped") and f"{part} skipped" or (value is None and f"no {metric} measured")
        rows.append({"part": part, "metric": metric, "min": minimum, "value": value,
                     "pass": None if why else value >= minimum, **({"not_judged": why} if why else {})})
    return rows


def skip_reasons(device: torch.device, smoke: bool) -> dict[str, str | None]:
    """Why each part cannot run on ``device`` (None: it runs)."""
    no_gpu = None if device.type == "cuda" else "no CUDA device"
    on_gpu_only = None if smoke else no_gpu
    no_codec = None if nvimgcodec_available() else "nvImageCodec is not installed (pip install 'pathomics[gpu]')"
    return {"gpu_tests": no_gpu, "tiling": None, "embed_resnet50_trunc": on_gpu_only or no_codec,
            "embed_vit_l16": on_gpu_only or no_codec, "mil": on_gpu_only}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a small model, parts that need a GPU run "
                                                             "on the device given: checks the check itself, on a CPU")
    parser.add_argument("--patches", type=int, help="patches embedded per timed part (default 32768; --smoke 48)")
    parser.add_argument("--unique-patches", type=int, help="distinct patches on the synthetic slide (default 512; --smoke 16)")
    parser.add_argument("--batch-size", type=int, help="default 512; --smoke 16")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--sample-ms", type=int, default=200, help="nvidia-smi sampling interval")
    parser.add_argument("--tests-timeout", type=int, default=300, help="seconds allowed for pytest -m gpu")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    args.patches = args.patches or (48 if args.smoke else 32768)
    args.unique_patches = args.unique_patches or (16 if args.smoke else 512)
    args.batch_size = args.batch_size or (16 if args.smoke else 512)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    skips = skip_reasons(device, args.smoke)
    sampler = GpuSampler.for_device(device, args.sample_ms)
    cores = os.cpu_count() or 1
    parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pathomics-gpu-check-") as tmp:
        work = Path(tmp)
        parts["gpu_tests"] = run_part("gpu_tests", skips["gpu_tests"], lambda: gpu_tests(args.tests_timeout), sampler, device)
        (work / "slide").mkdir()
        warm = build_slide_store(work / "slide", args.unique_patches, 256)  # tiles a synthetic slide, pixels not kept
        slide = Path(open_patch_store(warm).attrs["source_path"])
        parts["tiling"] = run_part("tiling", None, lambda: tiling_part(slide, work / "tiled", cores), sampler, device)
        store = repeat_store(warm, work / "repeated", args.patches)
        for part, model in EMBED_MODELS.items():
            chosen = SMOKE_MODEL if args.smoke else model
            parts[part] = run_part(part, skips[part], lambda: embed_part(chosen, warm, store, work / part, device, args),
                                   sampler, device)
        sizes = (8, 64, 32) if args.smoke else (200, 5000, 1024)
        parts["mil"] = run_part("mil", skips["mil"], lambda: mil_part(device, *sizes), sampler, device)
    not_judged = "a --smoke run" if args.smoke else (None if device.type == "cuda" else "not a CUDA device")
    targets = judge(parts, not_judged)
    judged = [t["pass"] for t in targets if t["pass"] is not None]
    tests_ok = parts["gpu_tests"].get("passed_all")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    document = {
        "device": str(device), "device_name": name, "smoke": args.smoke, "cpu_count": cores, "torch": torch.__version__,
        "gpu_sampling": {"command": " ".join(sampler.command) if sampler.command else None, "skipped": sampler.why_not},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": parts, "targets": targets,
        "passed": bool(judged) and all(judged) and bool(tests_ok) if not not_judged else None,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "not judged"}[t["pass"]]
        print(f"target {t['part']} {t['metric']} >= {t['min']:g}: {t['value']} {verdict}")
    print(f"wrote {args.json}")
    return 0 if document["passed"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
