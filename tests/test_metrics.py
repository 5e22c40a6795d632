"""The AUC used by evaluation, bootstrap CIs and the ablation's paired comparison."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from wsr_med.metrics import binary_auc, bootstrap_ci, roc_auc


def test_auc_equals_scikit_learn_with_ties_and_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 8)[rng.integers(0, 8, 200)]  # 8 distinct rows: many ties
    assert roc_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    binary = labels % 2
    assert roc_auc(binary, probs[:, :2]) == pytest.approx(roc_auc_score(binary, probs[:, 1]))
    assert binary_auc([True, False, True], [0.9, 0.9, 0.1]) == 0.25  # one tie counts half


def test_auc_refuses_a_single_class():
    with pytest.raises(ValueError, match="both positive and negative"):
        binary_auc(np.ones(4, bool), np.arange(4))


def test_bootstrap_redraws_resamples_missing_a_class():
    # two cases of two classes: only resamples holding both are kept, so the statistic is always 1
    groups = [np.array([0, 1]), np.array([1, 0, 1])]
    both = lambda idx: float(all(len(set(y[i])) == 2 for y, i in zip(groups, idx)))  # noqa: E731
    assert bootstrap_ci(groups, both, n_boot=50) == (1.0, 1.0)
