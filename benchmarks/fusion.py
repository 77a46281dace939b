"""Choosing the fusion recipe on cohorts the demo did not use: validated Harrell C of each modality and of the
combined model, under several penalty and stacking settings, beside the C of the planted components (oracle).

Cohorts come from the demo's generator (``simulate_cohort_tables``) at the demo's size, with seeds 1.. (the demo
uses seed 0, never seen here). The pathology risk is the generator's slide risk plus noise (``--pathology-noise``)
so that its C is near what attention-MIL reaches on the demo's slides, not the generator's near-perfect reading.

    .venv/bin/python benchmarks/fusion.py [--seeds 20] [--first-seed 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pathomics.survival import SurvivalConfig, survival_fit
from pathomics.survival.metrics import concordance
from pathomics.synthetic.cohort import simulate_cohort_tables
from pathomics.synthetic.demo import FUSION_PENALIZERS

BASE = SurvivalConfig(covariates=("age", "stage", "tumour_size"), categorical=("stage",), folds=5, n_bootstrap=0,
                      fusion="decision")
RIDGE_GRID = FUSION_PENALIZERS  # the grid the demo uses
RECIPES = {
    "unpenalised": BASE,
    "non-negative": dataclasses.replace(BASE, fusion_weights="non-negative"),
    "ridge by inner CV": dataclasses.replace(BASE, penalizer=RIDGE_GRID),
    "ridge by inner CV, non-negative": dataclasses.replace(BASE, penalizer=RIDGE_GRID, fusion_weights="non-negative"),
}
MODELS = ("clinical", "radiology", "pathology", "combined")


def one_cohort(seed: int, n: int, pathology_noise: float) -> list[dict[str, float]]:
    clinical, radiology, signatures, truth = simulate_cohort_tables(n, seed)
    rng = np.random.default_rng(10_000 + seed)
    signatures = signatures.assign(risk=signatures["risk"] + pathology_noise * rng.standard_normal(len(signatures)))
    time, event = clinical["time"].to_numpy(), clinical["event"].to_numpy()
    components = truth.components.loc[clinical["patient_id"]]
    oracle = {k: concordance(time, event, components[k].to_numpy()) for k in ("clinical", "radiology", "pathology")}
    oracle["combined"] = concordance(time, event, truth.linear_predictor.loc[clinical["patient_id"]].to_numpy())
    rows = []
    for recipe, config in RECIPES.items():
        result = survival_fit(config, clinical, radiology, signatures)
        c = {name: result.models[name].metrics["c_index_harrell"]["estimate"] for name in MODELS}
        rows.append({"seed": seed, "recipe": recipe, **c, **{f"{k} oracle": v for k, v in oracle.items()},
                     "combined - best single": c["combined"] - max(c[k] for k in MODELS[:3])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="cohorts: N seeds from --first-seed")
    parser.add_argument("--first-seed", type=int, default=1, help="the first cohort's seed (the demo's 0 is refused)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fusion.json")
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--pathology-noise", type=float, default=1.0)
    args = parser.parse_args()
    if args.first_seed < 1:
        parser.error("--first-seed must be 1 or more: seed 0 is the demo's cohort, never used to choose a recipe")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    frame = pd.DataFrame([row for seed in seeds
                          for row in one_cohort(seed, args.patients, args.pathology_noise)])
    frame["combined >= best single"] = frame["combined - best single"] >= 0
    frame["clinical - oracle"] = frame["clinical"] - frame["clinical oracle"]
    summary = frame.groupby("recipe", sort=False)[
        [*MODELS, "combined - best single", "combined >= best single", "clinical - oracle"]].mean()
    summary["worst combined - best single"] = frame.groupby("recipe", sort=False)["combined - best single"].min()
    summary = summary.round(3)
    print(f"{args.seeds} cohorts of {args.patients} patients (seeds {seeds[0]}-{seeds[-1]}), mean over cohorts:")
    print(summary.to_string())
    out = args.json
    out.write_text(json.dumps({"args": {**vars(args), "json": str(out)}, "summary": summary.reset_index().to_dict(orient="records"),
                               "cohorts": frame.to_dict(orient="records")}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
