"""Multi-label evaluation: several findings per image, each a binary question, some labels masked (uncertain).

Labels are ``(N, F)`` with 1.0 present, 0.0 absent and NaN masked (``uncertain=ignore``): a masked label takes no part
in any figure of its finding. Probabilities are ``(N, F)`` sigmoid outputs, one per finding, independent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score

from wsr_med.metrics.classification import SMALL_CLASS, binary_auc, bootstrap_ci, collapse_warning, reliability_bins
from wsr_med.metrics.operating_point import apply_temperature, choose_threshold, fit_temperature, operating_point_metrics

__all__ = ["FindingDecision", "collapsed_findings", "finding_aucs", "macro_auc", "finding_calibration", "fit_finding_decisions",
           "multilabel_metrics", "selection_auc", "sigmoid_temperature"]


def _finding(labels: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled cases of finding ``k``: (bool labels, probabilities)."""
    known = ~np.isnan(labels[:, k])
    return labels[known, k] == 1.0, probs[known, k]


def collapsed_findings(probs: np.ndarray, findings: list[str]) -> str:
    """A warning naming the findings whose probabilities are (nearly) the same for every case, or "" (each finding
    on its own: one can collapse while the others still rank cases; :func:`wsr_med.metrics.collapse_warning`)."""
    probs = np.asarray(probs, dtype=float)
    collapsed = [f for k, f in enumerate(findings) if collapse_warning(probs[:, k : k + 1])]
    return (f"the predictions of {', '.join(collapsed)} are nearly the same for every case: the model has collapsed for "
            f"{'it' if len(collapsed) == 1 else 'them'}" if collapsed else "")


def finding_aucs(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """Each finding's ROC AUC on its labelled cases (NaN labels left out); NaN for a finding without both outcomes."""
    out = []
    for k in range(labels.shape[1]):
        positive, p = _finding(np.asarray(labels, dtype=float), np.asarray(probs, dtype=float), k)
        out.append(binary_auc(positive, p) if 0 < positive.sum() < len(positive) else float("nan"))
    return out


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """The mean of :func:`finding_aucs` over the findings that have both outcomes here (NaN when none has)."""
    values = [v for v in finding_aucs(labels, probs) if v == v]
    return float(np.mean(values)) if values else float("nan")


def selection_auc(labels: np.ndarray, probs: np.ndarray, findings: list[int], average: str = "macro") -> float:
    """The AUC of the findings at the column indices ``findings``, averaged as ``average`` says: ``macro`` (the mean of
    their AUCs), ``micro`` (their labelled finding-case pairs pooled) or ``weighted`` (their AUCs weighted by positive
    cases). NaN when none of them has both outcomes."""
    labels, probs = np.asarray(labels, dtype=float)[:, findings], np.asarray(probs, dtype=float)[:, findings]
    if average == "micro":
        known = ~np.isnan(labels)
        positive = labels[known] == 1.0
        return binary_auc(positive, probs[known]) if 0 < positive.sum() < len(positive) else float("nan")
    aucs = np.array(finding_aucs(labels, probs))
    weights = np.nansum(labels == 1.0, axis=0) if average == "weighted" else np.ones(len(findings))
    scored = ~np.isnan(aucs)
    return float(np.average(aucs[scored], weights=weights[scored])) if scored.any() else float("nan")


def sigmoid_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Independent sigmoid probabilities ``(N,)`` recalibrated by one temperature (each as a two-class softmax)."""
    two = np.stack([1.0 - probs, probs], axis=1)
    return apply_temperature(two, temperature)[:, 1]


@dataclass
class FindingDecision:
    """What turns a multi-label network's sigmoid outputs into calibrated probabilities and findings: per finding a
    temperature and a threshold on its calibrated probability (``findings``: name -> ``{"temperature", "threshold",
    "fitted"}``, in the model's output order), fitted on the validation split (:func:`fit_finding_decisions`)."""

    findings: dict[str, dict]
    operating_point: str = "youden"
    fitted_on: str = ""

    @classmethod
    def unfitted(cls, findings: list[str], why: str) -> "FindingDecision":
        return cls({f: {"temperature": 1.0, "threshold": 0.5, "fitted": False} for f in findings}, "fixed:0.5", why)

    @property
    def thresholds(self) -> dict[str, float]:
        return {f: d["threshold"] for f, d in self.findings.items()}

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        """``(N, F)`` sigmoid outputs -> calibrated probabilities, each finding by its own temperature."""
        probs = np.asarray(probs, dtype=float)
        return np.stack([sigmoid_temperature(probs[:, k], d["temperature"]) for k, d in enumerate(self.findings.values())],
                        axis=1) if len(probs) else probs

    def classes(self, calibrated: np.ndarray) -> np.ndarray:
        """``(N, F)`` booleans: each finding called present at its threshold."""
        return np.asarray(calibrated) >= np.array([d["threshold"] for d in self.findings.values()])

    def rule(self, classes: list[str] | None = None) -> str:
        return "per finding: prob_<finding> >= its threshold (" + ", ".join(
            f"{f} {t:.6g}" for f, t in self.thresholds.items()) + ")"

    def class_thresholds(self, classes: list[str] | None = None) -> dict[str, float]:
        return self.thresholds

    def to_dict(self) -> dict:
        return asdict(self)


def fit_finding_decisions(labels: np.ndarray, probs: np.ndarray, findings: list[str],
                          operating_point: str = "youden") -> dict[str, dict]:
    """Per finding, fitted on these (validation) cases: a temperature by NLL and the threshold of ``operating_point``
    on the calibrated probability; a finding without both labelled outcomes keeps temperature 1 and threshold 0.5."""
    out = {}
    for k, name in enumerate(findings):
        positive, p = _finding(labels, probs, k)
        if positive.all() or not positive.any():
            out[name] = {"temperature": 1.0, "threshold": 0.5, "fitted": False}
            continue
        temperature = fit_temperature(positive.astype(int), np.stack([1.0 - p, p], axis=1))
        calibrated = sigmoid_temperature(p, temperature)
        out[name] = {"temperature": temperature, "threshold": choose_threshold(positive, calibrated, operating_point),
                     "fitted": True}
    return out


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, findings: list[str],
                       thresholds: dict[str, float] | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every evaluation figure of a multi-label task, JSON-ready.

    Per finding: ROC AUC with a 95% bootstrap CI, average precision, prevalence, labelled and positive counts, and at
    its threshold (``thresholds``, chosen on validation; 0.5 without) sensitivity, specificity, PPV and NPV with CIs.
    Overall: the macro AUC (mean over findings with both outcomes, CI by resampling cases) and the micro AUC (all
    labelled finding-case pairs pooled), each labelled as such; ``by_auc``: the findings from best to worst.
    """
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    thresholds = thresholds or {}
    per_finding, warnings = {}, []
    scored = []
    for k, name in enumerate(findings):
        positive, p = _finding(labels, probs, k)
        n, n_pos = len(positive), int(positive.sum())
        entry = {"n": n, "positives": n_pos, "masked": int(len(labels) - n),
                 "prevalence": float(n_pos / n) if n else float("nan"), "threshold": float(thresholds.get(name, 0.5))}
        if 0 < n_pos < n:
            scored.append(k)
            entry["auc"] = binary_auc(positive, p)
            entry["auc_ci95"] = list(bootstrap_ci([positive.astype(int)], lambda i, y=positive, s=p: binary_auc(y[i[0]], s[i[0]]),
                                                  n_boot, seed=seed))
            entry["average_precision"] = float(average_precision_score(positive, p))
            entry.update(operating_point_metrics(positive.astype(int), p, entry["threshold"], n_boot, seed))
        else:
            entry.update({"auc": float("nan"), "auc_ci95": [float("nan")] * 2, "average_precision": float("nan")})
            warnings.append(f"{name}: {'no positive' if n_pos == 0 else 'no negative'} case here, its AUC is not defined")
        if 0 < n_pos < SMALL_CLASS:
            warnings.append(f"{name}: only {n_pos} positive cases, its figures rest on very few")
        per_finding[name] = entry

    def macro(idx: list[np.ndarray]) -> float:
        values = []
        for k in scored:
            positive, p = _finding(labels[idx[0]], probs[idx[0]], k)
            if 0 < positive.sum() < len(positive):
                values.append(binary_auc(positive, p))
        return float(np.mean(values)) if values else float("nan")

    everything = [np.arange(len(labels))]
    strata = np.zeros(len(labels), dtype=int)  # resample cases as a whole: the findings of one image go together
    known = ~np.isnan(labels)
    pooled_labels, pooled_probs = labels[known] == 1.0, probs[known]
    return {
        "task": "multilabel",
        "n": int(len(labels)),
        "findings": list(findings),
        "per_finding": per_finding,
        "macro_auc": macro(everything) if scored else float("nan"),
        "macro_auc_ci95": list(bootstrap_ci([strata], macro, n_boot, seed=seed)) if scored else [float("nan")] * 2,
        "micro_auc": binary_auc(pooled_labels, pooled_probs) if 0 < pooled_labels.sum() < len(pooled_labels) else float("nan"),
        "by_auc": sorted(findings, key=lambda f: -np.nan_to_num(per_finding[f]["auc"], nan=-1.0)),
        "warnings": warnings,
    }


def finding_calibration(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, findings: list[str]) -> dict:
    """Per finding, on its labelled cases: ECE before and after calibration and the reliability bins after
    (predicted probability against observed frequency)."""
    out = {}
    for k, name in enumerate(findings):
        positive, p_raw = _finding(labels, raw, k)
        _, p = _finding(labels, calibrated, k)
        if not len(positive):
            continue
        before, _ = reliability_bins(p_raw, positive.astype(float))  # probability of the finding vs its frequency
        after, reliability = reliability_bins(p, positive.astype(float))
        out[name] = {"ece_before": before, "ece_after": after, "reliability": reliability}
    return out
