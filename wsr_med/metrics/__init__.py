"""Evaluation metrics and plots."""

from wsr_med.metrics.classification import COLLAPSE_TOLERANCE, collapse_warning, json_ready, binary_auc, bootstrap_auc_ci, bootstrap_ci, classification_metrics, expected_calibration_error, roc_auc, small_sample_warnings
from wsr_med.metrics.plots import figure, plain, plot_confusion, plot_examples, plot_reliability, plot_roc, plot_spatial_weights
from wsr_med.metrics.report import write_html_report
from wsr_med.metrics.operating_point import (OPERATING_POINTS, Decision, apply_temperature, brier_score, choose_threshold,
                                               fit_decision, negative_log_likelihood, operating_point_metrics, parse_operating_point,
                                               temperature_at_bound)
from wsr_med.metrics.comparison import corrected_resampled_ttest
