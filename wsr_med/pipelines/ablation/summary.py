"""The study's summary: statistics over folds x seeds (corrected resampled t-test, case bootstrap) and its
tables and figures."""

from __future__ import annotations

import csv
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np

from wsr_med.data.csv_files import unneutralise, write_csv
from wsr_med.files import atomic_write
from wsr_med.metrics import bootstrap_ci, corrected_resampled_ttest, figure, roc_auc
from wsr_med.metrics.multilabel import finding_aucs, macro_auc
from wsr_med.pipelines.ablation.grid import Cell
from wsr_med.runs import RunFolder

__all__ = ["fold_differences", "paired_difference", "summarise"]


def _cases_file(output: Path, cell: Cell, head: str) -> Path:
    """The per-case predictions of ``cell``'s backbone, size and fold with ``head``."""
    return output / replace(cell, head=head).name / RunFolder.EVAL / RunFolder.CASES


def _read_cases(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """A cell's ``cases.csv``: paths, labels (class indices; multi-label ``(N, F)`` with NaN masked), probabilities, classes."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    paths = [r["path"] for r in rows]
    if f"label_{classes[0]}" in rows[0]:  # multi-label
        labels = np.array([[float(r[f"label_{c}"]) if r[f"label_{c}"] else np.nan for c in classes] for r in rows])
    else:
        labels = np.array([classes.index(unneutralise(r["label"])) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return paths, labels, probs, classes


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """The head comparison's AUC: ROC AUC; multi-label, the macro AUC over findings."""
    return macro_auc(labels, probs) if labels.ndim == 2 else roc_auc(labels, probs)


def _strata(labels: np.ndarray) -> np.ndarray:
    """What a case bootstrap redraws on: the classes; multi-label, nothing (a finding missing from a resample is skipped)."""
    return np.zeros(len(labels), dtype=int) if labels.ndim == 2 else labels


def _accuracy(row: dict) -> str:
    """mean ± sd; a multi-label study has no accuracy (several findings per case): —."""
    return "—" if row["accuracy_mean"] != row["accuracy_mean"] else f"{row['accuracy_mean']:.3f} ± {row['accuracy_sd']:.3f}"


def finding_differences(output: Path, cells: list[Cell], head: str) -> dict[str, float]:
    """Multi-label: per finding, the mean over cells of its AUC(head) - AUC(gap) on the same held-out cases."""
    per_cell = []
    for c in cells:
        _, labels, probs_h, findings = _read_cases(_cases_file(output, c, head))
        _, _, probs_g, _ = _read_cases(_cases_file(output, c, "gap"))
        per_cell.append(np.array(finding_aucs(labels, probs_h)) - np.array(finding_aucs(labels, probs_g)))
    return dict(zip(findings, np.nanmean(np.stack(per_cell), axis=0).tolist()))


def made_with() -> str:
    """The software a table came from: wsr_med (and its git commit when run from a checkout), torch, MONAI, MLflow."""
    import subprocess
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True).stdout.strip()
    except OSError:  # no git here: an installed package says its version
        commit = ""
    return (f"wsr_med {version('wsr_med')}" + (f" (commit {commit})" if commit else "") +
            f", torch {version('torch')}, MONAI {version('monai')}, MLflow {version('mlflow')}")


def fold_differences(output: Path, cells: list[Cell], head: str) -> list[tuple[Cell, float, np.ndarray, np.ndarray, np.ndarray]]:
    """Per cell (fold x seed): AUC(head) - AUC(gap) on the same held-out cases, with those cases' labels and
    both heads' probabilities."""
    out = []
    for c in cells:
        paths, labels, probs_h, _ = _read_cases(_cases_file(output, c, head))
        paths_g, labels_g, probs_g, _ = _read_cases(_cases_file(output, c, "gap"))
        if paths != paths_g or not np.array_equal(labels, labels_g, equal_nan=True):
            raise ValueError(f"{head} and gap were evaluated on different cases in {c.name}")
        out.append((c, _auc(labels, probs_h) - _auc(labels, probs_g), labels, probs_h, probs_g))
    return out


def paired_difference(output: Path, cells: list[Cell], head: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over cells of AUC(head) - AUC(gap) on the same held-out cases, with a paired case-bootstrap 95% CI.

    Each cell is a different trained model, so AUC is taken within a cell, then averaged: pooling the cells'
    predictions would rank one model's scores against another's. The bootstrap resamples cases within each
    cell, the same cases for both heads: it covers case sampling with every model fixed, not retraining
    (:func:`wsr_med.metrics.corrected_resampled_ttest` over the cells covers that).
    """
    folds = [(y, ph, pg) for _, _, y, ph, pg in fold_differences(output, cells, head)]

    def mean_difference(indices: list[np.ndarray]) -> float:
        return float(np.mean([_auc(y[i], ph[i]) - _auc(y[i], pg[i]) for (y, ph, pg), i in zip(folds, indices)]))

    low, high = bootstrap_ci([_strata(y) for y, _, _ in folds], mean_difference, n_boot, seed=seed)
    return mean_difference([np.arange(len(y)) for y, _, _ in folds]), low, high


def _corrected_half_width(results: list[dict]) -> float:
    """Half width of the 95% interval of the mean AUC of ``results`` (one per fold x seed) by the corrected
    resampled t (Nadeau & Bengio): the interval the table's comparisons use, not the plain t interval, which
    ignores that the folds' training sets overlap (about 2x too narrow here)."""
    n_train = statistics.mean(r.get("n_train", 0) for r in results) or 1.0
    n_test = statistics.mean(r.get("n_test", 0) for r in results)
    low, high = corrected_resampled_ttest([r["auc"] for r in results], n_train, n_test)["ci"]
    return (high - low) / 2


def summarise(output: Path, results: list[dict], cells: list[Cell], missing: list[Cell] = ()) -> list[Path]:
    """Write summary.csv / summary.md and the plots of the finished ``cells`` and their ``results``; returns the files.
    ``missing``: the grid's cells not finished yet, listed at the top of summary.md (a partial summary says so)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("network") or r["backbone"], r["image_size"], r["head"]), []).append(r)
    rows, listed = [], []
    for (network, size, head), rs in groups.items():
        aucs, accs = [r["auc"] for r in rs], [r["accuracy"] for r in rs]
        row = {"network": network, "image_size": size, "head": head, "cells": len(rs),
               "auc_mean": statistics.mean(aucs), "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
               "auc_last_epoch_mean": statistics.mean(r.get("auc_last_epoch", float("nan")) for r in rs),
               "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "auc_shuffled_mean": statistics.mean(r["auc_shuffled"] for r in rs),
               "params": rs[0]["params"], "head_params": rs[0]["head_params"],
               # a median: a cell that shared the machine with another job must not move the row
               "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in rs)}
        finished = set(cells)
        same = [c for c in cells if ((c.network or c.backbone), c.image_size, c.head) == (network, size, head)
                and replace(c, head="gap") in finished]  # compared where the gap cell has finished too
        if head != "gap" and same:
            differences = fold_differences(output, same, head)
            n_train = statistics.mean(r.get("n_train", 0) for r in rs) or 1.0
            n_test = statistics.mean(r.get("n_test", 0) for r in rs)
            test = corrected_resampled_ttest([d for _, d, *_ in differences], n_train, n_test)
            row.update({"auc_vs_gap": test["mean"], "auc_vs_gap_ci_low": test["ci"][0], "auc_vs_gap_ci_high": test["ci"][1],
                        "auc_vs_gap_p": test["p"]})
            _, row["auc_vs_gap_bootstrap_low"], row["auc_vs_gap_bootstrap_high"] = paired_difference(output, same, head)
            listed.append(f"- {network}, {size} px, {head} - gap, per fold x seed: " + ", ".join(
                f"f{c.fold}s{c.seed} {d:+.3f}" for c, d, *_ in differences))
            if differences[0][2].ndim == 2:  # multi-label: the macro AUC above, and where it comes from
                listed.append(f"- {network}, {size} px, {head} - gap, per finding (mean over folds x seeds): " + ", ".join(
                    f"{f} {d:+.3f}" for f, d in finding_differences(output, same, head).items()))
        rows.append(row)
    fields = ["network", "image_size", "head", "cells", "auc_mean", "auc_sd", "auc_last_epoch_mean", "accuracy_mean",
              "accuracy_sd", "auc_vs_gap", "auc_vs_gap_ci_low", "auc_vs_gap_ci_high", "auc_vs_gap_p",
              "auc_vs_gap_bootstrap_low", "auc_vs_gap_bootstrap_high", "auc_shuffled_mean", "params", "head_params",
              "seconds_per_epoch"]
    write_csv(output / "summary.csv", fields, [[r.get(k, "") for k in fields] for r in rows])
    partial = [f"**Partial: {len(missing)} of the grid's {len(cells) + len(missing)} cells have not finished** "
               f"(run the same command again to finish them): {', '.join(c.name for c in missing)}.", ""] if missing else []
    lines = [*partial, "| network | size | head | folds x seeds | AUC mean ± sd | AUC, last epoch | accuracy mean ± sd | "
             "ΔAUC vs gap [95% CI, corrected t] | p | case-bootstrap CI (models fixed) | AUC, positions shuffled | params | "
             "head params | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        has = "auc_vs_gap" in r
        delta = f"{r['auc_vs_gap']:+.3f} [{r['auc_vs_gap_ci_low']:+.3f}, {r['auc_vs_gap_ci_high']:+.3f}]" if has else "—"
        boot = f"[{r['auc_vs_gap_bootstrap_low']:+.3f}, {r['auc_vs_gap_bootstrap_high']:+.3f}]" if has else "—"
        p_value = ("<0.001" if r["auc_vs_gap_p"] < 0.001 else f"{r['auc_vs_gap_p']:.3f}") if has else "—"
        lines.append(f"| {r['network']} | {r['image_size']} | {r['head']} | {r['cells']} | {r['auc_mean']:.3f} ± {r['auc_sd']:.3f} | "
                     f"{r['auc_last_epoch_mean']:.3f} | {_accuracy(r)} | {delta} | {p_value} | "
                     f"{boot} | {r['auc_shuffled_mean']:.3f} | {r['params']:,} | {r['head_params']:,} | {r['seconds_per_epoch']:.1f} |")
    lines += ["", "AUC on each cell's held-out fold, with the checkpoint its inner validation split chose. The CI and p "
              "of ΔAUC are the corrected resampled t-test over folds x seeds (Nadeau & Bengio 2003); the case "
              "bootstrap keeps every trained model fixed and covers case sampling only.", "", f"Made with {made_with()}.",
              "", *listed]
    atomic_write(output / "summary.md", "\n".join(lines) + "\n")

    configs = sorted({(r["network"], r["image_size"]) for r in rows})
    fig, axes = figure(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (network, size) in zip(axes[0], configs):
        sub = [r for r in rows if (r["network"], r["image_size"]) == (network, size)]
        spreads = [_corrected_half_width(groups[(network, size, r["head"])]) for r in sub]
        ax.errorbar(range(len(sub)), [r["auc_mean"] for r in sub], yerr=spreads, fmt="o", capsize=4)
        ax.set_xticks(range(len(sub)), [r["head"] for r in sub], rotation=45, ha="right")
        ax.set(title=f"{network}, {size} px", ylabel="held-out AUC (mean, 95% CI, corrected t)")
    fig.tight_layout()
    fig.savefig(output / "auc_by_head.png", dpi=110)
    fig, axes = figure(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (network, size) in zip(axes[0], configs):
        for head in sorted({r["head"] for r in results}):
            curves = [r["val_auc_curve"] for r in results
                      if ((r.get("network") or r["backbone"]), r["image_size"], r["head"]) == (network, size, head)]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], 0), label=head)
        ax.set(title=f"{network}, {size} px", xlabel="epoch", ylabel="inner-validation AUC (mean over cells)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "val_curves.png", dpi=110)
    return [output / n for n in ("summary.csv", "summary.md", "auc_by_head.png", "val_curves.png")]
