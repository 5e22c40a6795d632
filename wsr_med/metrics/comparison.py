"""Comparing two models over repeated cross-validation: the corrected resampled t-test."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["corrected_resampled_ttest"]


def corrected_resampled_ttest(differences, n_train: float, n_test: float, alpha: float = 0.05) -> dict:
    """Nadeau & Bengio (2003): the mean of ``J`` paired differences from repeated k-fold cross-validation
    (folds x seeds), its ``1 - alpha`` confidence interval and two-sided p-value.

    The ``J`` training sets overlap, so the differences are correlated and ``s**2 / J`` understates the
    variance of their mean; the corrected variance is ``(1 / J + n_test / n_train) * s**2``, with a t
    distribution of ``J - 1`` degrees of freedom.

    Args:
        differences: one score difference (e.g. AUC(head) - AUC(gap)) per fold and seed, on the same cases.
        n_train, n_test: cases used for training (all of it, inner validation included) and for the
            difference, per fold (means over folds).
    """
    d = np.asarray(differences, dtype=float)
    j = len(d)
    mean = float(d.mean()) if j else float("nan")
    if j < 2:
        return {"mean": mean, "ci": [float("nan"), float("nan")], "t": float("nan"), "p": float("nan"), "J": j, "df": 0}
    se = math.sqrt((1 / j + n_test / n_train) * float(d.var(ddof=1)))
    df = j - 1
    if se == 0:
        t, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return {"mean": mean, "ci": [mean - half, mean + half], "t": float(t), "p": p, "J": j, "df": df}
