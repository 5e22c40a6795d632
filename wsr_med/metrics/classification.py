"""Figures a clinical paper reports for a classifier: AUC with a bootstrap CI, sensitivity, specificity, calibration."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix

__all__ = ["COLLAPSE_TOLERANCE", "collapse_warning", "json_ready", "binary_auc", "roc_auc", "bootstrap_ci", "bootstrap_auc_ci", "expected_calibration_error", "classification_metrics",
           "reliability_bins", "small_sample_warnings", "SMALL_SAMPLE",
           "SMALL_CLASS"]


# A model whose class probabilities vary by less than this across all cases says nothing about any case.
# Collapsed eval-mode BatchNorm models vary by 1e-16 to 1e-5; a model early in training that already ranks
# cases (AUC 0.65) varies by 1e-3.
COLLAPSE_TOLERANCE = 1e-4


def collapse_warning(probs: np.ndarray, tolerance: float = COLLAPSE_TOLERANCE) -> str | None:
    """A warning when ``(N, K)`` probabilities are (nearly) the same for every case, else None.

    The usual cause is BatchNorm running statistics that never caught up with training (eval-mode
    features then collapse to one point); other causes are a learning rate too high or too few epochs.
    """
    probs = np.asarray(probs, dtype=float)
    if len(probs) < 2:
        return None
    spread = float((probs.max(0) - probs.min(0)).max())
    if spread >= tolerance:
        return None
    return (f"predictions are nearly the same for every case (class probabilities vary by at most {spread:.2g} over "
            f"{len(probs)} cases): the model has collapsed. Try a lower learning_rate, more epochs or "
            "class_balance=weighted_loss, and a bn_momentum of at least 0.1.")


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: the chance that a positive case scores above a negative one (ties half).

    Equal to scikit-learn's ``roc_auc_score``, without its input checks, which dominate the time of a bootstrap.

    Args:
        positive: ``(N,)`` booleans, both values present.
        scores: ``(N,)`` scores, higher meaning more likely positive.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        raise ValueError("AUC needs both positive and negative cases")
    return float((rankdata(scores)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary (probability of class 1) for 2 classes, macro one-vs-rest otherwise.

    Args:
        labels: ``(N,)`` class indices, every class present.
        probs: ``(N, K)`` class probabilities.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([binary_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]))


def bootstrap_ci(groups: list[np.ndarray], statistic: Callable[[list[np.ndarray]], float], n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic``, resampling cases within each group.

    Args:
        groups: per group (e.g. per cross-validation fold), the ``(N_g,)`` class labels of its cases.
        statistic: maps one index array per group (the resampled cases) to a number.

    A resample missing one of its group's classes has no AUC, so it is redrawn (up to 20x ``n_boot`` draws).
    """
    rng = np.random.default_rng(seed)
    n_classes = [len(np.unique(y)) for y in groups]
    values = []
    for _ in range(20 * n_boot):
        indices = [rng.integers(0, len(y), len(y)) for y in groups]
        if any(len(np.unique(y[i])) < k for y, i, k in zip(groups, indices, n_classes)):
            continue
        values.append(statistic(indices))
        if len(values) == n_boot:
            break
    if not values:
        return float("nan"), float("nan")
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def bootstrap_auc_ci(labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of :func:`roc_auc`, resampling cases."""
    return bootstrap_ci([labels], lambda idx: roc_auc(labels[idx[0]], probs[idx[0]]), n_boot, alpha, seed)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> tuple[float, dict]:
    """ECE of the top-class confidence over ``n_bins`` equal-width bins, and the reliability-diagram bins."""
    return reliability_bins(probs.max(1), (probs.argmax(1) == labels).astype(float), n_bins)


def reliability_bins(confidence: np.ndarray, hit: np.ndarray, n_bins: int = 10) -> tuple[float, dict]:
    """ECE and the reliability bins of stated probabilities ``confidence`` against outcomes ``hit`` (1/0): per equal-width
    bin the mean ``confidence``, the share of hits (``accuracy``) and the ``count``."""
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    ece, table = 0.0, {"confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        mask = bins == b
        count = int(mask.sum())
        table["count"].append(count)
        table["confidence"].append(float(confidence[mask].mean()) if count else float("nan"))
        table["accuracy"].append(float(hit[mask].mean()) if count else float("nan"))
        if count:
            ece += count / len(confidence) * abs(table["accuracy"][-1] - table["confidence"][-1])
    return float(ece), table


SMALL_SAMPLE = 30  # fewer evaluated cases than this, or
SMALL_CLASS = 10  # fewer cases of a present class than this: the report says the figures are uncertain


def small_sample_warnings(n: int, support: dict[str, int]) -> list[str]:
    """The caveats for too few cases (all, or of a class present), as report lines."""
    out = []
    if n < SMALL_SAMPLE:
        out.append(f"only {n} cases were evaluated (fewer than {SMALL_SAMPLE}): every figure here is uncertain, "
                   "read the confidence intervals")
    few = {c: k for c, k in support.items() if 0 < k < SMALL_CLASS}
    if few:
        listed = ", ".join(f"{c} ({k})" for c, k in few.items())
        out.append(f"fewer than {SMALL_CLASS} cases of {listed}: its sensitivity, AUC and PPV rest on very few cases")
    return out


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float = 0.5,
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """Every evaluation figure, JSON-ready.

    Binary: the positive class is ``classes[1]`` and a case is positive when its probability is
    at least ``threshold``; multi-class: the predicted class is the most probable, and sensitivity
    / specificity are given per class (one-vs-rest).
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    k = probs.shape[1]
    pred = (probs[:, 1] >= threshold).astype(int) if k == 2 else probs.argmax(1)
    cm = confusion_matrix(labels, pred, labels=np.arange(k))
    per_class = {}
    for c, name in enumerate(classes):
        tp, fn = cm[c, c], cm[c].sum() - cm[c, c]
        fp, tn = cm[:, c].sum() - cm[c, c], cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        present = 0 < (labels == c).sum() < len(labels)
        per_class[name] = {
            "auc": binary_auc(labels == c, probs[:, c]) if present else float("nan"),
            "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
            "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
            "ppv": float(tp / (tp + fp)) if tp + fp else float("nan"),
            "npv": float(tn / (tn + fn)) if tn + fn else float("nan"),
            "support": int((labels == c).sum()),
            "prevalence": float((labels == c).mean()),
        }
    absent = [name for name in classes if per_class[name]["support"] == 0]
    warnings = []
    if not absent:
        auc = roc_auc(labels, probs)
        low, high = bootstrap_auc_ci(labels, probs, n_boot=n_boot, seed=seed)
    elif k > 2 and k - len(absent) >= 2:  # macro AUC over the classes these cases hold
        present = [c for c, name in enumerate(classes) if name not in absent]

        def macro(idx: list[np.ndarray]) -> float:
            return float(np.mean([binary_auc(labels[idx[0]] == c, probs[idx[0], c]) for c in present]))

        auc = macro([np.arange(len(labels))])
        low, high = bootstrap_ci([labels], macro, n_boot, seed=seed)
        warnings.append(f"no case of class {', '.join(absent)}: the AUC is the macro over the {len(present)} classes present")
    else:
        auc = low = high = float("nan")
        warnings.append(f"no case of class {', '.join(absent)}: AUC is not defined on these cases")
    warnings += small_sample_warnings(len(labels), {name: m["support"] for name, m in per_class.items()})
    ece, reliability = expected_calibration_error(labels, probs)
    out = {
        "n": int(len(labels)),
        "classes": list(classes),
        "absent_classes": absent,
        "warnings": warnings,
        "auc": auc,
        "auc_kind": "binary" if k == 2 else "macro one-vs-rest",
        "auc_ci95": [low, high],
        "accuracy": float((pred == labels).mean()),
        # the mean per-class sensitivity: what accuracy says when every class counts alike
        "balanced_accuracy": float(np.mean([m["sensitivity"] for m in per_class.values() if m["support"]])),
        "threshold": threshold if k == 2 else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": ece,
        "reliability": reliability,
    }
    if k == 2:
        out["positive_class"] = classes[1]
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            out[key] = per_class[classes[1]][key]
    return out


def json_ready(value):
    """``value`` with every NaN or infinity replaced by None: valid JSON (``null``) for every parser."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
