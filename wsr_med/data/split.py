"""Patient-level, stratified, seeded splits, written to a datalist JSON for reproduction and audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from wsr_med.data.scan import DatasetScan
from wsr_med.files import atomic_write

__all__ = ["assign_folds", "split_items", "write_datalist", "read_datalist"]


def _strata(items: list[dict]) -> np.ndarray:
    """What a fold keeps in proportion: the class; multi-label, each scan's rarest present finding (rarest over the
    whole set), or -1 for none: the rare findings, which a random split starves first, are spread over the folds."""
    labels = [i["label"] for i in items]
    if not labels or not isinstance(labels[0], list):
        return np.array(labels)
    positives = np.array([[value == 1.0 for value in label] for label in labels])
    counts = positives.sum(0)
    return np.array([int(np.argmin(np.where(row, counts, np.inf))) if row.any() else -1 for row in positives])


def assign_folds(items: list[dict], n_folds: int, seed: int = 0) -> list[int]:
    """Fold index per item: every patient in one fold, class (multi-label: rarest finding) proportions kept as far as
    patients allow."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    n_patients = len({i["patient"] for i in items})
    if n_patients < n_folds:
        raise ValueError(f"{n_patients} patients cannot be split into {n_folds} patient-level folds.")
    labels = _strata(items)
    groups = np.array([i["patient"] for i in items])
    folds = np.zeros(len(items), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(items)), labels, groups)):
        folds[held_out] = fold
    return folds.tolist()


def split_items(items: list[dict], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
                n_folds: int = 0, fold: int = 0, inner_validation: bool = False) -> dict[str, list[dict]]:
    """Split items into ``training``/``validation``/``test`` at the patient level.

    * A ``split`` field on the items (from a manifest) wins: ``train``/``val``/``test``.
    * ``n_folds >= 2``: k-fold cross-validation; fold ``fold`` is the validation set and
      ``test_fraction`` is ignored. With ``inner_validation``, fold ``fold`` is the ``test`` set instead
      (the reported one) and ``val_fraction`` of the other folds' patients, stratified, is the
      ``validation`` set that picks the checkpoint: the reported fold chooses nothing.
    * Otherwise: ``test_fraction`` of the patients go to test, then ``val_fraction`` (of all) to
      validation, each by a stratified group fold of the nearest size.
    """
    if all("split" in i for i in items):
        names = {"train": "training", "training": "training", "val": "validation", "validation": "validation", "test": "test"}
        unknown = {i["split"] for i in items} - set(names)
        if unknown:
            raise ValueError(f"unknown split values {sorted(unknown)}; expected train, val or test")
        out = {"training": [], "validation": [], "test": []}
        for i in items:
            out[names[i["split"]]].append(i)
        return out
    if n_folds >= 2:
        if not 0 <= fold < n_folds:
            raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
        folds = assign_folds(items, n_folds, seed)
        rest = [i for i, f in zip(items, folds) if f != fold]
        held_out = [i for i, f in zip(items, folds) if f == fold]
        if not inner_validation:
            return {"training": rest, "validation": held_out, "test": []}
        inner = assign_folds(rest, max(2, round(1 / val_fraction)), seed + 1)
        return {"training": [i for i, f in zip(rest, inner) if f != 0],
                "validation": [i for i, f in zip(rest, inner) if f == 0], "test": held_out}
    rest, test = items, []
    if test_fraction > 0:
        folds = assign_folds(items, max(2, round(1 / test_fraction)), seed)
        rest = [i for i, f in zip(items, folds) if f != 0]
        test = [i for i, f in zip(items, folds) if f == 0]
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    folds = assign_folds(rest, max(2, round((1 - test_fraction) / val_fraction)), seed + 1)
    return {"training": [i for i, f in zip(rest, folds) if f != 0],
            "validation": [i for i, f in zip(rest, folds) if f == 0], "test": test}


def write_datalist(path: str | Path, scan: DatasetScan, splits: dict[str, list[dict]], **settings) -> Path:
    """Write the split as a MONAI-style datalist JSON (image paths relative to ``base_dir``).

    ``settings`` (seed, fractions, fold...) are stored with it, so a run can be reproduced and
    audited; patients appear only as hashes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"base_dir": str(scan.root.resolve()), "classes": scan.classes, "settings": settings,
           "counts": {k: len(v) for k, v in splits.items()}, "bad_files": len(scan.bad_files), **splits}
    atomic_write(path, json.dumps(doc, indent=1))
    return path


def read_datalist(path: str | Path, key: str) -> list[dict]:
    """The items of one split of a datalist: ``image`` resolved against its ``base_dir``, ``relative_path`` as stored."""
    doc = json.loads(Path(path).read_text())
    base = Path(doc["base_dir"])
    return [{**item, "image": str(base / item["image"]), "relative_path": item["image"]} for item in doc[key]]
