"""Patient-level splits, the one place every stage takes its folds from: a patient never straddles folds."""

from __future__ import annotations

import numpy as np

from pathomics.errors import CohortError


def patient_folds(groups: np.ndarray, strata: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of each slide: patients (``groups``) never straddle folds; folds are stratified by ``strata``."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_patients = len(np.unique(groups))
    if folds > n_patients:
        raise CohortError(f"{folds} folds but only {n_patients} patients; lower --folds")
    for value in np.unique(strata).tolist():
        n = len(np.unique(groups[strata == value]))
        if n < folds:
            raise CohortError(f"only {n} patient(s) with label/event {value!r}, fewer than the {folds} folds; lower --folds")
    assignment = np.empty(len(groups), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), strata, groups)):
        assignment[test] = fold
    return assignment


def validation_split(groups: np.ndarray, strata: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of a validation subset: about ``fraction`` of the patients of each stratum, whole patients only."""
    rng = np.random.default_rng(seed)
    patients, first = np.unique(groups, return_index=True)
    chosen: list[str] = []
    for stratum in np.unique(strata[first]):
        members = rng.permutation(patients[strata[first] == stratum])
        chosen.extend(members[:round(fraction * len(members))])
    return np.isin(groups, chosen)


def row_splits(strata: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices of K folds of one-row-per-patient data, stratified by ``strata`` (e.g. the
    event indicator) when every stratum can fill every fold, plain shuffled K-fold otherwise."""
    from sklearn.model_selection import KFold, StratifiedKFold

    strata = np.asarray(strata)
    if folds > len(strata):
        raise CohortError(f"{folds} folds but only {len(strata)} patients; lower --folds")
    smallest = np.unique(strata, return_counts=True)[1].min()
    splitter = StratifiedKFold if smallest >= folds else KFold
    return list(splitter(folds, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata))
