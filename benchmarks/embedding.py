"""Embedding throughput: the backbone alone on in-memory tensors vs the whole pipeline from a patch store.

For each backbone (shufflenet-v2, resnet50-trunc; ``--models uni`` for the ViT-L/16 of the ``uni`` preset
with its recipe) and precision (fp32 and the device's fast one), at the same batch size: model-only
patches/s (prepared tensors already on the device, forward passes only) and
end-to-end patches/s of ``embed_store`` (store read in background workers, copy, normalise and resize,
forward, HDF5 write). The ratio pipeline/model-only shows how much of the I/O is hidden (target ≥ 0.9).
On a CPU, model-only is also timed with whole batches in one forward pass, against the micro-batches the
encoder uses there (``Encoder.micro_batch``): the ratio micro/whole is what micro-batching gains.
Random weights (throughput does not depend on them) and random-noise patches (the costliest to decompress).

    python benchmarks/embedding.py --quick               # a couple of minutes on a 2-core CPU
    python benchmarks/embedding.py --models uni --patches 128 --batch-size 32 --repeats 2   # ViT-L/16, random weights (~10 min on 2 cores)
    python benchmarks/embedding.py --device cuda --patches 16384 --batch-size 512
    python benchmarks/embedding.py --device cuda --from-slide --decoder nvimgcodec workers --models resnet50-trunc  # GPU decode
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pathomics.embed import DECODERS, EmbedConfig, Encoder, default_workers, embed_store, resolve_device, resolve_precision
from pathomics.layout import OutputLayout
from pathomics.encoders.backbones import load_backbone
from pathomics.encoders.base import Backbone
from pathomics.store import STORE_ATTRS, PatchStoreWriter, open_patch_store

MODELS = ("shufflenet-v2", "resnet50-trunc")  # --models uni adds UNI's ViT-L/16 and recipe (random weights)
DEFAULT_JSON = Path(__file__).parent / "results" / "embedding.json"


def build_store(out: Path, n: int, patch_size: int) -> Path:
    """A patch store of ``n`` random-noise patches (no slide needed; pixels are what the pipeline reads)."""
    attrs = {key: 0 for key in STORE_ATTRS} | {
        "slide_id": "bench", "source_path": "none", "backend": "none", "mpp_source": "user", "tissue_method": "none",
        "pathomics_version": "bench", "patch_size": patch_size, "target_mpp": 0.5, "complete": False}
    coords = np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], axis=1) * patch_size
    writer = PatchStoreWriter(OutputLayout(out).store("bench"), attrs, coords, np.ones(n, np.float32), with_pixels=True)
    rng = np.random.default_rng(0)
    for start in range(0, n, writer.shard):
        writer.write(start, rng.integers(0, 256, (min(writer.shard, n - start), patch_size, patch_size, 3), dtype=np.uint8))
    return writer.publish()


def build_slide_store(out: Path, n: int, patch_size: int) -> Path:
    """A coords-only store of a synthetic slide with about ``n`` tissue patches: the pipeline decodes them from the slide."""
    from pathomics.synthetic import write_slide
    from pathomics.tiling import TileConfig, tile_slide

    side = 2 * patch_size * math.ceil((n / 0.31 * 4 / 3) ** 0.5)  # the blob covers about 31% of a 4:3 slide
    slide = write_slide(out / "bench.svs", side, side * 3 // 4, mpp=0.25, seed=3)
    return tile_slide(slide.path, out, TileConfig(target_mpp=0.5, patch_size=patch_size, with_pixels=False)).path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_medians(runs: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each run after one warm-up each, alternating them so that load hits all alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def model_only(encoder: Encoder, n: int, batch_size: int, patch_size: int, whole: bool = False) -> Callable[[], None]:
    """Forward passes alone over the pipeline's batch sizes, on one prepared batch already on the device,
    in the encoder's micro-batches (or in ``whole`` batches)."""
    images = torch.randint(0, 256, (batch_size, patch_size, patch_size, 3), dtype=torch.uint8)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    step = batch_size if whole or encoder.micro_batch is None else encoder.micro_batch
    with torch.inference_mode():
        x = encoder.prepare(images)

    def run() -> None:
        with torch.inference_mode():
            for size in sizes:
                for part in x[:size].split(step):
                    encoder.forward(part)

    return run


def pipeline(store: Path, out: Path, config: EmbedConfig, backbone: Backbone) -> Callable[[], None]:
    """``embed_store`` end to end, each run into a fresh output folder (nothing skipped)."""
    runs = iter(range(1 << 30))
    return lambda: embed_store(store, out / f"run{next(runs)}", config, backbone=backbone)


def measure(args: argparse.Namespace, store: Path, work: Path) -> list[dict]:
    device = resolve_device(args.device)
    fast = resolve_precision("auto", device)
    rows = []
    for model in args.models:
        for precision in dict.fromkeys(("fp32", fast)):
            backbone = load_backbone(model, "random", precision=precision)  # a foundation preset holds bf16 weights at bf16
            encoder = Encoder(backbone, device, precision)
            runs = {"model_only": model_only(encoder, args.patches, args.batch_size, args.patch_size)}
            for decoder in args.decoder:  # the first is "pipeline"; each further one is timed beside it
                config = EmbedConfig(model=model, weights="random", device=str(device), precision=precision,
                                     batch_size=args.batch_size, num_workers=args.num_workers, decoder=decoder)
                runs["pipeline" if decoder == args.decoder[0] else decoder] = pipeline(
                    store, work / f"{model}-{precision}-{decoder}", config, backbone)
            if encoder.micro_batch:
                runs["whole_batches"] = model_only(encoder, args.patches, args.batch_size, args.patch_size, whole=True)
            rate = {name: args.patches / t for name, t in paired_medians(runs, args.repeats, device).items()}
            alone, whole = rate["model_only"], rate["pipeline"]
            row = {"model": model, "weights": "random", "precision": precision, "model_only_patches_per_s": round(alone, 1),
                   "pipeline_patches_per_s": round(whole, 1), "ratio": round(whole / alone, 3), "micro_batch": encoder.micro_batch}
            if encoder.micro_batch:
                row |= {"whole_batch_patches_per_s": round(rate["whole_batches"], 1),
                        "micro_batch_gain": round(alone / rate["whole_batches"], 3)}
            if len(args.decoder) > 1:
                row["pipeline_patches_per_s_by_decoder"] = {d: round(rate["pipeline" if d == args.decoder[0] else d], 1)
                                                            for d in args.decoder}
            rows.append(row)
            print(f"{model:16s} {precision:5s} {alone:12.1f} {whole:12.1f} {whole / alone:7.3f} "
                  f"{row.get('whole_batch_patches_per_s', float('nan')):12.1f} {row.get('micro_batch_gain', float('nan')):7.2f}",
                  flush=True)
            for decoder in args.decoder[1:]:
                print(f"{'':16s} {'':5s} {'--decoder ' + decoder:>12s} {rate[decoder]:12.1f} {rate[decoder] / alone:7.3f}", flush=True)
    return rows


def environment(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "patches": args.patches, "patch_size": args.patch_size,
            "input_size": 224, "batch_size": args.batch_size, "num_workers": args.num_workers, "repeats": args.repeats,
            "channels_last": True, "store": "coords-only, decoded from a slide" if args.from_slide else "pixels",
            "decoder": args.decoder, "load_average_1min": round(os.getloadavg()[0], 2),  # other processes skew CPU figures
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--patches", type=int, help="patches in the store (default: 4096 on a GPU, 512 on a CPU; --quick: 1024 and 128)")
    parser.add_argument("--batch-size", type=int, help="default: 512 on a GPU, 32 on a CPU")
    parser.add_argument("--num-workers", type=int, default=default_workers())
    parser.add_argument("--patch-size", type=int, default=256, help="stored patch side (resized to 224 on the device)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement, median reported (default 3; --quick 2)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, help="torch CPU threads in the main process (default: torch's, one per core); "
                                                    "1 leaves a core to the readers and resists load from other processes")
    parser.add_argument("--quick", action="store_true", help="small sizes: a couple of minutes on a 2-core CPU")
    parser.add_argument("--from-slide", action="store_true",
                        help="a coords-only store of a synthetic slide: the pipeline decodes patches from the slide (streaming)")
    parser.add_argument("--decoder", nargs="+", choices=DECODERS, default=["auto"],
                        help="who decodes a coords-only store (--from-slide): nvimgcodec decodes on the device (pathomics[gpu]); "
                             "several (e.g. workers nvimgcodec) are timed side by side, the first as 'pipeline'")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    gpu = resolve_device(args.device).type == "cuda"
    if args.patches is None:
        args.patches = (1024 if args.quick else 4096) if gpu else (128 if args.quick else 512)
    args.batch_size = args.batch_size or (512 if gpu else 32)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'model':16s} {'prec':5s} {'model-only/s':>12s} {'pipeline/s':>12s} {'ratio':>7s} {'whole-batch/s':>12s} "
          f"{'gain':>7s}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pathomics-bench-") as tmp:
        build = build_slide_store if args.from_slide else build_store
        store = build(Path(tmp), args.patches, args.patch_size)
        args.patches = len(open_patch_store(store))
        rows = measure(args, store, Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"environment": environment(args), "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
