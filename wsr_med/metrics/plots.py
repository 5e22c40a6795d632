"""Figures for evaluation reports and MLflow: ROC, confusion matrix, reliability diagram, Wise-SrNet weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

__all__ = ["figure", "plain", "example_caption", "plot_examples", "plot_roc", "plot_confusion", "plot_reliability", "plot_spatial_weights", "plot_finding_rocs",
           "plot_finding_reliability"]


def figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (4.5, 4.5), **kwargs):
    """``(fig, axes)`` on a figure of its own: no pyplot, so no GUI backend and no global state (headless servers, CI)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plain(text: str) -> str:
    """``text`` shown as written: a ``$`` would start matplotlib's mathtext (and ``ward $\\x$`` crashes it)."""
    return str(text).replace("$", r"\$")


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: list[str], metrics: dict, path: str | Path) -> Path:
    """ROC curve(s): the positive class for binary tasks, one-vs-rest per class otherwise."""
    fig, ax = figure(figsize=(4.5, 4.5))
    shown = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for c in shown:
        if 0 < (labels == c).sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{plain(classes[c])} (AUC {metrics['per_class'][classes[c]]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    low, high = metrics["auc_ci95"]
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, AUC {metrics['auc']:.3f} [{low:.3f}, {high:.3f}]")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(metrics: dict, path: str | Path) -> Path:
    cm = np.array(metrics["confusion_matrix"])
    classes = metrics["classes"]
    fig, ax = figure(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    names = [plain(c) for c in classes]
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=f"accuracy {metrics['accuracy']:.3f}")
    return _save(fig, path)


def plot_reliability(metrics: dict, path: str | Path) -> Path:
    rel = metrics["reliability"]
    n_bins = len(rel["count"])
    centres = (np.arange(n_bins) + 0.5) / n_bins
    fig, ax = figure(figsize=(4.5, 4.5))
    acc = np.nan_to_num(np.array(rel["accuracy"], dtype=float))
    ax.bar(centres, acc, width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability, ECE {metrics['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def example_caption(true: str, predicted: str, probability: float) -> str:
    """``true left · predicted left``, then ``p 0.89`` below it (p: the probability of the predicted class)."""
    return f"true {plain(true)} · predicted {plain(predicted)}\np {probability:.2f}"


def plot_examples(thumbnails: list, labels: np.ndarray, probs: np.ndarray, classes: list[str], path: str | Path,
                  per_class: int = 2) -> Path | None:
    """Example cases per true class: the ``per_class`` most confident correct ones, then the most confident
    wrong ones, as thumbnails ``(h, w)`` with the probability given to the true (or predicted) class."""
    pred = probs.argmax(1)
    rows = []
    for c in range(len(classes)):
        right = [i for i in np.argsort(-probs[:, c]) if labels[i] == c and pred[i] == c and thumbnails[i] is not None]
        wrong = [i for i in np.argsort(-probs.max(1)) if labels[i] == c and pred[i] != c and thumbnails[i] is not None]
        rows.append((c, right[:per_class], wrong[:per_class]))
    if not any(r or w for _, r, w in rows):
        return None
    fig, axes = figure(len(rows), 2 * per_class, figsize=(2.4 * 2 * per_class, 2.7 * len(rows)), squeeze=False)
    for ax_row, (c, right, wrong) in zip(axes, rows):
        cells = [(i, True) for i in right] + [None] * (per_class - len(right)) + [(i, False) for i in wrong]
        for ax, cell in zip(ax_row, cells + [None] * (2 * per_class - len(cells))):
            ax.axis("off")
            if cell is None:
                continue
            i, correct = cell
            ax.imshow(thumbnails[i], cmap="gray", vmin=0, vmax=255)
            ax.set_title(example_caption(classes[c], classes[pred[i]], probs[i, pred[i]]), fontsize=9,
                         color="black" if correct else "firebrick")
    return _save(fig, path)


def _grid(n: int, size: float = 2.6):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = figure(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot_finding_rocs(labels: np.ndarray, probs: np.ndarray, metrics: dict, path: str | Path) -> Path:
    """Multi-label: one ROC curve per finding (its labelled cases), small multiples in the order of ``metrics["by_auc"]``."""
    findings = metrics["findings"]
    fig, axes = _grid(len(findings))
    for ax, name in zip(axes, metrics["by_auc"]):
        k = findings.index(name)
        known = ~np.isnan(labels[:, k])
        positive = labels[known, k] == 1
        if 0 < positive.sum() < len(positive):
            fpr, tpr, _ = roc_curve(positive, probs[known, k])
            ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{plain(name)}, AUC {metrics['per_finding'][name]['auc']:.3f}", fontsize=9)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity")
    return _save(fig, path)


def plot_finding_reliability(calibration: dict, path: str | Path) -> Path:
    """Multi-label: a reliability diagram per finding (after calibration), small multiples."""
    fig, axes = _grid(len(calibration))
    for ax, (name, c) in zip(axes, calibration.items()):
        rel = c["reliability"]
        n_bins = len(rel["count"])
        ax.bar((np.arange(n_bins) + 0.5) / n_bins, np.nan_to_num(np.array(rel["accuracy"], dtype=float)), width=1 / n_bins,
               edgecolor="k", alpha=0.7)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="share with the finding")
        ax.set_title(f"{plain(name)}, ECE {c['ece_after']:.3f}", fontsize=9)
    return _save(fig, path)


def plot_spatial_weights(weights: np.ndarray, path: str | Path, mean_image: np.ndarray | None = None) -> Path:
    """Learned Wise-SrNet depthwise kernels ``(C, 1, *k)`` (2D): their mean over channels and four channel groups.

    Next to the mean input image when one is given, to read where the head looks.
    """
    w = weights.reshape(weights.shape[0], *weights.shape[-2:])
    groups = np.array_split(np.arange(w.shape[0]), 4)
    panels = [("mean over channels", w.mean(0))] + [(f"channels {g[0]}-{g[-1]}", w[g].mean(0)) for g in groups]
    if mean_image is not None:
        panels.insert(0, ("mean input", mean_image))
    fig, axes = figure(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (title, panel) in zip(axes, panels):
        im = ax.imshow(panel, cmap="gray" if title == "mean input" else "magma")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
        if title != "mean input":
            fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)
