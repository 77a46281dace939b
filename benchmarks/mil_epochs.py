"""MIL wall time per epoch: each aggregator trained (AdamW, batches of 16 bags, cross-entropy) and applied
(evaluation forward passes) over a cohort of random bags, on the CPU.

Defaults are the issue's cohort: 200 bags × 5,000 patches × 1,024 dims, aggregators at the stage's default
sizes (hidden 256; TransMIL with 8 heads and 256 landmarks). Bags are drawn from a pool of ``--pool``
distinct random bags so memory stays small; compute does not depend on the values.

    python benchmarks/mil_epochs.py                              # full size, about 5-10 minutes on 2 cores
    python benchmarks/mil_epochs.py --bags 20 --patches 1000     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pathomics.mil import MILConfig, train
from pathomics.mil.aggregators import build_aggregator
from pathomics.io import atomic_path

MODELS = ("mean", "max", "abmil", "gated-abmil", "clam-sb", "transmil")
DEFAULT_JSON = Path(__file__).parent / "results" / "mil_epochs.json"


def random_pool(n_pool: int, patches: int, dim: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_pool`` random bags with grid coordinates."""
    rng = np.random.default_rng(seed)
    i = np.arange(patches)
    coords = np.stack([i % 100, i // 100], axis=1).astype(np.int64) * 256
    return [(rng.standard_normal((patches, dim), dtype=np.float32), coords) for _ in range(n_pool)]


def time_model(name: str, pool: list, bags: int, dim: int, config: MILConfig,
               device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Seconds for one training epoch and one evaluation pass over ``bags`` bags on ``device``, batch by batch.

    Besides the measured totals, ``*_median_s`` is the median batch time × the number of batches: on a
    shared machine it discounts batches slowed by other processes.
    """
    torch.manual_seed(0)
    objective = train.Classification(["neg", "pos"])
    model = build_aggregator(name, dim, objective.n_outputs, **config.aggregator_options()).to(device)
    targets = train.Targets(label=np.arange(bags) % 2)
    settings = train.TrainConfig(epochs=1, patience=1, min_epochs=1, batch_size=config.batch_size, lr=config.lr,
                                   weight_decay=config.weight_decay, max_patches=None, aux_weight=config.aux_weight, seed=0)

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        return pool[i % len(pool)]

    batches = [np.arange(start, min(start + config.batch_size, bags)) for start in range(0, bags, config.batch_size)]
    train.fit(model, objective, targets, load, batches[0], np.arange(0), settings, device)  # warm-up
    train_times = [_seconds(partial(train.fit, model, objective, targets, load, b, np.arange(0), settings, device))
                   for b in batches]
    predict_times = [_seconds(partial(train.predict, model, load, b, device)) for b in batches]
    return {"model": name, "train_s_per_epoch": round(sum(train_times), 2),
            "train_median_s": round(float(np.median(train_times)) * len(batches), 2),
            "predict_s_per_epoch": round(sum(predict_times), 2),
            "predict_median_s": round(float(np.median(predict_times)) * len(batches), 2),
            "parameters": sum(p.numel() for p in model.parameters())}


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--patches", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--pool", type=int, default=16, help="distinct random bags to cycle through")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = MILConfig()
    pool = random_pool(min(args.pool, args.bags), args.patches, args.dim)
    results = []
    print(f"{args.bags} bags × {args.patches} patches × {args.dim} dims, {args.threads} threads, "
          f"batch {config.batch_size}")
    print(f"{'model':<12} {'train s/epoch':>14} {'(median-based)':>15} {'predict s/epoch':>16} {'(median-based)':>15} "
          f"{'parameters':>11}")
    for name in args.models:
        row = time_model(name, pool, args.bags, args.dim, config)
        results.append(row)
        print(f"{name:<12} {row['train_s_per_epoch']:>14.1f} {row['train_median_s']:>15.1f} "
              f"{row['predict_s_per_epoch']:>16.1f} {row['predict_median_s']:>15.1f} {row['parameters']:>11,}", flush=True)
    document = {
        "benchmark": "mil", "bags": args.bags, "patches": args.patches, "dim": args.dim, "threads": args.threads,
        "config": {k: v for k, v in config.to_dict().items() if k in ("hidden_dim", "dropout", "batch_size", "lr")},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "results": results,
    }
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
