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


def test_operating_points_on_constructed_scores():
    from wsr_med.metrics import choose_threshold

    positive = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    scores = np.arange(10) / 10  # one negative (0.5) among the positives
    assert choose_threshold(positive, scores, "youden") == 0.4  # sensitivity 1, specificity 4/5
    assert choose_threshold(positive, scores, "sensitivity:0.8") == 0.6  # highest threshold keeping 4 of 5 positives
    assert choose_threshold(positive, scores, "specificity:1.0") == 0.6  # lowest threshold calling no negative
    assert choose_threshold(positive, scores, "fixed:0.3") == 0.3
    with pytest.raises(ValueError, match="operating_point must be one of"):
        choose_threshold(positive, scores, "sensitivity:high")


def test_temperature_scaling_fixes_an_overconfident_model_and_is_reapplied(tmp_path):
    import json

    from wsr_med.metrics import Decision, apply_temperature, fit_decision, negative_log_likelihood
    from wsr_med.runs import RunFolder

    rng = np.random.default_rng(0)
    calibrated = rng.uniform(0.05, 0.95, 2000)
    labels = (rng.random(2000) < calibrated).astype(int)  # each case positive with its stated probability
    honest = np.stack([1 - calibrated, calibrated], 1)
    overconfident = apply_temperature(honest, 0.25)  # the same ranking, four times too sharp
    decision, fit = fit_decision(labels, overconfident, "youden")
    assert decision.temperature == pytest.approx(4, rel=0.15) and fit["nll_after"] < fit["nll_before"] - 0.1
    assert negative_log_likelihood(labels, decision.probabilities(overconfident)) == pytest.approx(fit["nll_after"])
    (tmp_path / "best.json").write_text(json.dumps({"metric": "val_auc", "value": 0.8, "epoch": 3}))
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "calibration.json").write_text(json.dumps({"epoch": 3, "decision": decision.to_dict(), **fit}))
    assert Decision.of_run(RunFolder(tmp_path)) == decision  # stored, read back, the same
    (tmp_path / "best.json").write_text(json.dumps({"metric": "val_auc", "value": 0.9, "epoch": 4}))
    assert Decision.of_run(RunFolder(tmp_path)).temperature == 1.0  # fitted for another epoch's weights: not used


def test_operating_point_metrics_have_intervals():
    from wsr_med.metrics import operating_point_metrics

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(labels * 0.4 + rng.random(200) * 0.6, 0, 1)
    m = operating_point_metrics(labels, scores, 0.5, n_boot=200)
    called = scores >= 0.5
    assert m["sensitivity"][0] == pytest.approx(called[labels == 1].mean())
    assert m["specificity"][0] == pytest.approx((~called)[labels == 0].mean())
    for key, (value, low, high) in m.items():
        assert low <= value <= high, key
    assert m["specificity_at_sensitivity_0.95"][0] <= m["specificity_at_sensitivity_0.90"][0]


def test_corrected_resampled_t_test_by_hand():
    """Six differences (3 folds x 2 seeds), 80 training and 20 test cases per fold."""
    from scipy import stats

    from wsr_med.metrics import corrected_resampled_ttest

    d = [0.01, 0.03, -0.01, 0.02, 0.00, 0.04]
    # mean 0.015; s^2 = 0.00175 / 5 = 0.00035; corrected variance (1/6 + 20/80) * 0.00035 = 0.000145833
    se = 0.000145833333 ** 0.5  # 0.0120761
    out = corrected_resampled_ttest(d, n_train=80, n_test=20)
    assert out["mean"] == pytest.approx(0.015) and out["J"] == 6 and out["df"] == 5
    assert out["t"] == pytest.approx(1.24212, abs=1e-4)  # 0.015 / 0.0120761
    assert out["p"] == pytest.approx(2 * stats.t.sf(1.24212, 5), abs=1e-4) and 0.26 < out["p"] < 0.28
    assert out["ci"] == pytest.approx([0.015 - 2.570582 * se, 0.015 + 2.570582 * se], abs=1e-6)
    naive = stats.ttest_1samp(d, 0).pvalue  # without the correction: overlapping training sets ignored
    assert naive < out["p"]


def test_small_samples_and_example_captions_say_what_they_mean():
    from wsr_med.metrics.classification import small_sample_warnings
    from wsr_med.metrics.plots import example_caption
    from wsr_med.metrics.operating_point import temperature_at_bound, TEMPERATURE_BOUNDS

    assert small_sample_warnings(100, {"a": 50, "b": 50}) == []
    few = small_sample_warnings(12, {"a": 9, "b": 3, "c": 0})
    assert len(few) == 2 and "only 12 cases" in few[0] and "a (9), b (3)" in few[1] and "c (" not in few[1]
    assert example_caption("left", "right", 0.891) == "true left · predicted right\np 0.89"
    assert example_caption("$x$", "a", 0.5).startswith(r"true \$x\$")  # no mathtext
    assert temperature_at_bound(TEMPERATURE_BOUNDS[0]) and temperature_at_bound(TEMPERATURE_BOUNDS[1])
    assert not temperature_at_bound(1.0)
