"""Decisions from probabilities: temperature scaling and operating points, fitted on validation cases only.

``Decision`` is what evaluate, predict and the served model apply to a network's softmax output:
probabilities recalibrated by one temperature, then the class (binary: positive when the calibrated
probability reaches the run's threshold; multi-class: the most probable class).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from wsr_med.metrics.classification import bootstrap_ci

__all__ = ["OPERATING_POINTS", "Decision", "apply_temperature", "brier_score", "choose_threshold", "fit_decision",
           "fit_temperature", "negative_log_likelihood", "operating_point_metrics", "parse_operating_point",
           "TEMPERATURE_BOUNDS", "temperature_at_bound"]

# ``operating_point`` settings: youden (max sensitivity + specificity - 1), sensitivity:X / specificity:X
# (the highest threshold that keeps sensitivity >= X, the lowest that keeps specificity >= X), fixed:X.
OPERATING_POINTS = ("youden", "sensitivity:<0-1>", "specificity:<0-1>", "fixed:<0-1>")


def parse_operating_point(rule: str) -> tuple[str, float | None]:
    """``"sensitivity:0.95"`` -> ``("sensitivity", 0.95)``; ``"youden"`` -> ``("youden", None)``."""
    kind, _, value = str(rule).partition(":")
    if kind == "youden" and not value:
        return kind, None
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if kind not in ("sensitivity", "specificity", "fixed") or not 0 <= target <= 1:
        raise ValueError(f"operating_point must be one of {', '.join(OPERATING_POINTS)}; got '{rule}'")
    return kind, target


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``log(probs) / temperature`` (= softmax of logits / T): ``(N, K)`` probabilities."""
    logits = np.log(np.clip(np.asarray(probs, dtype=float), 1e-12, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean over cases of the squared distance between the probabilities and the one-hot label."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature (within :data:`TEMPERATURE_BOUNDS`) minimising the NLL of ``apply_temperature(probs, T)``."""
    labels = np.asarray(labels).astype(int)
    low, high = TEMPERATURE_BOUNDS
    result = minimize_scalar(lambda log_t: negative_log_likelihood(labels, apply_temperature(probs, np.exp(log_t))),
                             bounds=(np.log(low), np.log(high)), method="bounded")
    return float(np.exp(result.x))


def temperature_at_bound(temperature: float) -> bool:
    """Whether a fitted temperature stopped at a bound: too few or perfectly separated cases to calibrate on."""
    low, high = TEMPERATURE_BOUNDS
    return not 1.02 * low < temperature < high / 1.005


def _roc_table(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score as a threshold, with the sensitivity and specificity it gives (ascending)."""
    candidates = np.unique(scores)
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    sensitivity = (len(pos) - np.searchsorted(pos, candidates, "left")) / max(len(pos), 1)
    specificity = np.searchsorted(neg, candidates, "left") / max(len(neg), 1)
    return candidates, sensitivity, specificity


def choose_threshold(positive: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
    """The threshold on ``scores`` (a case is positive when its score >= threshold) that ``rule`` picks."""
    kind, target = parse_operating_point(rule)
    if kind == "fixed":
        return float(target)
    positive, scores = np.asarray(positive, dtype=bool), np.asarray(scores, dtype=float)
    if positive.all() or not positive.any():
        raise ValueError("an operating point needs positive and negative cases")
    candidates, sensitivity, specificity = _roc_table(positive, scores)
    if kind == "youden":
        return float(candidates[np.argmax(sensitivity + specificity)])
    if kind == "sensitivity":  # the highest threshold still reaching the target sensitivity
        return float(candidates[sensitivity >= target].max())
    ok = specificity >= target  # the lowest threshold reaching the target specificity
    return float(candidates[ok].min()) if ok.any() else float(np.nextafter(candidates.max(), np.inf))


@dataclass
class Decision:
    """What turns a network's softmax output into calibrated probabilities and a class.

    ``threshold`` is on the calibrated probability of ``classes[1]`` (binary tasks only; None: argmax).
    """

    temperature: float = 1.0
    threshold: float | None = None
    operating_point: str = "argmax"
    fitted_on: str = ""

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self.temperature) if self.temperature != 1.0 else np.asarray(probs, dtype=float)

    def classes(self, calibrated: np.ndarray) -> np.ndarray:
        """Class index per case from calibrated probabilities."""
        if self.threshold is not None and calibrated.shape[1] == 2:
            return (calibrated[:, 1] >= self.threshold).astype(int)
        return calibrated.argmax(1)

    def rule(self, classes: list[str]) -> str:
        """How the class is decided, in words (``predictions.csv``'s ``decision_rule``, an SR's algorithm parameters)."""
        return f"prob_{classes[1]} >= {self.threshold:.6g}" if self.threshold is not None and len(classes) == 2 \
            else "highest probability"

    def class_thresholds(self, classes: list[str]) -> dict[str, float]:
        """The threshold each class's probability is compared with: the positive class's, for two classes."""
        return {classes[1]: self.threshold} if self.threshold is not None and len(classes) == 2 else {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_run(cls, run):
        """The decision of a :class:`wsr_med.runs.RunFolder`: its ``calibration.json``, or for runs without one
        uncalibrated probabilities with threshold 0.5 (binary) or the most probable class. A multi-label run's is a
        :class:`wsr_med.metrics.multilabel.FindingDecision`."""
        calibration = run.calibration()
        if run.multilabel():  # several findings per scan: one decision per finding
            from wsr_med.metrics.multilabel import FindingDecision

            if calibration is not None:
                return FindingDecision(**calibration["decision"])
            return FindingDecision.unfitted(run.classes(), "none (the run has no calibration for its model)")
        if calibration is not None:
            return cls(**calibration["decision"])
        binary = len(run.classes()) == 2
        return cls(threshold=0.5 if binary else None, operating_point="fixed:0.5" if binary else "argmax",
                   fitted_on="none (the run has no calibration for its model)")


def fit_decision(labels: np.ndarray, probs: np.ndarray, operating_point: str = "youden", fitted_on: str = "validation") -> tuple[Decision, dict]:
    """Fit the temperature (by NLL) and, for binary tasks, the threshold of ``operating_point`` on these cases
    (the validation split: never the cases a report is made on). Returns the decision and what the fit did."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    temperature = fit_temperature(labels, probs)
    calibrated = apply_temperature(probs, temperature)
    threshold = None
    if probs.shape[1] == 2:
        threshold = choose_threshold(labels == 1, calibrated[:, 1], operating_point)
    decision = Decision(temperature, threshold, operating_point if threshold is not None else "argmax", fitted_on)
    fit = {"n_cases": int(len(labels)), "nll_before": negative_log_likelihood(labels, probs),
           "nll_after": negative_log_likelihood(labels, calibrated)}
    return decision, fit


def operating_point_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, n_boot: int = 1000,
                            seed: int = 0) -> dict:
    """Binary: sensitivity, specificity, PPV, NPV at ``threshold`` with 95% bootstrap CIs, and sensitivity at
    specificity 0.90 / 0.95 (and the reverse), each ``[value, low, high]``."""
    positive = np.asarray(labels) == 1

    def at(threshold_of: callable, which: str):
        def statistic(idx: list[np.ndarray]) -> float:
            p, s = positive[idx[0]], scores[idx[0]]
            t = threshold_of(p, s)
            called = s >= t
            tp, fp = (called & p).sum(), (called & ~p).sum()
            fn, tn = (~called & p).sum(), (~called & ~p).sum()
            values = {"sensitivity": tp / max(tp + fn, 1), "specificity": tn / max(tn + fp, 1),
                      "ppv": tp / (tp + fp) if tp + fp else float("nan"), "npv": tn / (tn + fn) if tn + fn else float("nan")}
            return float(values[which])
        return statistic

    labels_int = positive.astype(int)
    everything = [np.arange(len(labels_int))]
    out = {}
    fixed = lambda p, s: threshold  # noqa: E731 - the stored threshold, not refitted per resample
    for which in ("sensitivity", "specificity", "ppv", "npv"):
        statistic = at(fixed, which)
        out[which] = [statistic(everything), *bootstrap_ci([labels_int], statistic, n_boot, seed=seed)]
    for target in (0.90, 0.95):  # thresholds refitted in each resample: the CI covers the choice too
        spec_rule, sens_rule = f"specificity:{target}", f"sensitivity:{target}"
        statistic = at(lambda p, s, r=spec_rule: choose_threshold(p, s, r), "sensitivity")
        out[f"sensitivity_at_specificity_{target:.2f}"] = [statistic(everything), *bootstrap_ci([labels_int], statistic, n_boot, seed=seed)]
        statistic = at(lambda p, s, r=sens_rule: choose_threshold(p, s, r), "specificity")
        out[f"specificity_at_sensitivity_{target:.2f}"] = [statistic(everything), *bootstrap_ci([labels_int], statistic, n_boot, seed=seed)]
    return out
