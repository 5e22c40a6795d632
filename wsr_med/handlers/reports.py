"""Evaluation writers: the evaluation report (metrics.json, cases.csv, report.html, figures) and the predictions CSV."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsr_med import tracking
from wsr_med.data.csv_files import write_csv
from wsr_med.files import atomic_write
from wsr_med.handlers.collectors import Collector
from wsr_med.metrics import (
    Decision,
    brier_score,
    choose_threshold,
    classification_metrics,
    collapse_warning,
    expected_calibration_error,
    json_ready,
    negative_log_likelihood,
    operating_point_metrics,
    temperature_at_bound,
    plot_confusion,
    plot_examples,
    plot_reliability,
    plot_roc,
    small_sample_warnings,
    write_html_report,
)
from wsr_med.metrics.multilabel import FindingDecision, finding_calibration, multilabel_metrics
from wsr_med.metrics.plots import plot_finding_reliability, plot_finding_rocs
from wsr_med.metrics.report import write_multilabel_report
from wsr_med.runs import RunFolder, path_id

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["EvaluationReporter", "PredictionWriter", "evaluation_provenance"]

logger = logging.getLogger(__name__)

VALIDATION_CAVEAT = ("these are the run's validation cases, which chose the best epoch and fitted the temperature and "
                     "threshold: the figures are optimistic; evaluate the test split or another folder for an unbiased estimate")


class EvaluationReporter(Collector):
    """Write ``metrics.json``, ROC / confusion / reliability PNGs, ``report.html`` and the per-case
    ``cases.csv`` (label and probabilities, for paired comparisons) to ``report_dir``; log them to MLflow.

    Args:
        classes: class names, in the model's order.
        report_dir: where the files go (created).
        decision: the run's temperature and operating point (:meth:`wsr_med.metrics.Decision.of_run`, fitted on
            its validation split); probabilities are recalibrated with it before every figure.
        threshold: a fixed threshold on the positive class instead of the run's (binary tasks); None: the run's.
        n_boot: bootstrap resamples for the confidence intervals.
        run_dir: the training run folder; its MLflow run receives the report (prefix ``eval_``).
        tracking_uri: MLflow tracking URI; None or empty for no MLflow logging.
        tag: name of this evaluation in MLflow (metrics ``<tag>_auc``..., artifacts under ``<tag>/``).
        provenance: what is evaluated (see :func:`evaluation_provenance`), shown first in the report.
        eval_split: ``all`` (a folder), ``test`` or ``validation`` (the run's splits), recorded as ``split`` in
            ``metrics.json``; the validation split gets a caveat: those cases chose the checkpoint and the decision.

    The local report also shows example cases per class (``examples.png``: the most confident right and wrong
    ones, as small thumbnails); the copy sent to MLflow leaves them out, as no image leaves the machine.
    """

    keep_thumbnails = True

    def __init__(self, classes: list[str], report_dir: str | Path, decision: Decision | None = None,
                 threshold: float | None = None, n_boot: int = 1000, run_dir: str | Path | None = None,
                 tracking_uri: str | None = None, tag: str = "eval", provenance: dict | None = None,
                 eval_split: str | None = None) -> None:
        super().__init__()
        self.classes = list(classes)
        self.report_dir = Path(report_dir)
        self.multilabel = isinstance(decision, FindingDecision) or bool(run_dir and RunFolder(run_dir).multilabel())
        if self.multilabel:
            self.decision = decision or FindingDecision.unfitted(self.classes, "none (calibrated=False)")
            if threshold is not None:
                self.decision = FindingDecision({f: {**d, "threshold": float(threshold)} for f, d in self.decision.findings.items()},
                                                f"fixed:{threshold}", "the threshold setting")
        else:
            self.decision = decision or Decision(threshold=0.5 if len(self.classes) == 2 else None)
            if threshold is not None:
                self.decision = Decision(self.decision.temperature, float(threshold), f"fixed:{threshold}", "the threshold setting")
        self.n_boot = n_boot
        self.run_dir = Path(run_dir) if run_dir else None
        self.tracking_uri = tracking_uri
        self.tag = tag
        self.provenance = dict(provenance or {})
        self.eval_split = eval_split
        self.metrics: dict | None = None

    def finish(self, engine: Engine) -> None:
        if not self.labels:
            raise ValueError("evaluation needs labelled cases; for unlabelled scans use the inference workflow")
        if self.multilabel:
            self._finish_findings()
            return
        labels, raw = np.array(self.labels), np.stack(self.probs)
        probs = self.decision.probabilities(raw)
        threshold = self.decision.threshold if self.decision.threshold is not None else 0.5
        self.metrics = classification_metrics(labels, probs, self.classes, threshold, self.n_boot)
        self.metrics["operating_point"] = self._operating_point(labels, probs)
        self.metrics["calibration"] = self._calibration(labels, raw, probs)
        self.metrics["provenance"] = self.provenance
        self.metrics["split"] = self.eval_split
        self.metrics["warnings"] += self._caveats(self.metrics["calibration"])
        collapsed = collapse_warning(probs)
        if collapsed:
            self.metrics["warnings"].append(f"The model's {collapsed}")
        unusual = sum(bool(u) for u in self.unlike_training)
        if unusual:
            first = next(u for u in self.unlike_training if u)
            self.metrics["warnings"].append(f"{unusual} of {len(self.labels)} cases look unlike the training data "
                                            f"(e.g. {first}); see the unlike_training column of cases.csv")
        for warning in self.metrics["warnings"]:
            logger.warning("%s", warning)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.report_dir / RunFolder.METRICS, json.dumps(json_ready(self.metrics), indent=1, allow_nan=False))
        # 9 significant digits round-trip float32: AUC recomputed from the file matches metrics.json
        write_csv(self.report_dir / RunFolder.CASES, ["path", "label", *[f"prob_{c}" for c in self.classes], "unlike_training"],
                  [[p, self.classes[y], *[f"{v:.9g}" for v in pr], u]
                   for p, y, pr, u in zip(self.paths, self.labels, probs, self.unlike_training)])
        before = self.metrics["calibration"]
        plots = [plot_roc(labels, probs, self.classes, self.metrics, self.report_dir / "roc.png"),
                 plot_confusion(self.metrics, self.report_dir / "confusion_matrix.png"),
                 plot_reliability(self.metrics, self.report_dir / "reliability.png"),
                 plot_reliability({"ece": before["ece_before"], "reliability": before.pop("reliability_before")},
                                  self.report_dir / "reliability_uncalibrated.png")]
        self._plots = plots
        examples = plot_examples(self.thumbnails, labels, probs, self.classes, self.report_dir / "examples.png")
        report = write_html_report(self.metrics, [*plots, *([examples] if examples else [])], self.report_dir / RunFolder.REPORT,
                                   provenance=self.provenance)
        low, high = self.metrics["auc_ci95"]
        logger.info("evaluation on %d cases: AUC (%s) %.4f [%.4f, %.4f], accuracy %.4f, balanced accuracy %.4f; report %s",
                    self.metrics["n"], self.metrics["auc_kind"], self.metrics["auc"], low, high, self.metrics["accuracy"],
                    self.metrics["balanced_accuracy"], report)  # NaN prints as nan
        self._log_mlflow()

    def _operating_point(self, labels: np.ndarray, probs: np.ndarray) -> dict:
        """Binary: the run's point with bootstrap CIs and the fixed-specificity/sensitivity points; multi-class:
        argmax, and each class's one-vs-rest Youden point on these cases (for reference only: chosen on them)."""
        point = {"rule": self.decision.operating_point, "chosen_on": self.decision.fitted_on}
        if len(self.classes) == 2:
            point["threshold"] = self.decision.threshold if self.decision.threshold is not None else 0.5
            if len(np.unique(labels)) == 2:
                point.update(operating_point_metrics(labels, probs[:, 1], point["threshold"], self.n_boot))
            return point
        point["one_vs_rest_youden_on_these_cases"] = {
            c: {"threshold": t, "sensitivity": float((probs[labels == k, k] >= t).mean()),
                "specificity": float((probs[labels != k, k] < t).mean())}
            for k, c in enumerate(self.classes) if 0 < (labels == k).sum() < len(labels)
            for t in [choose_threshold(labels == k, probs[:, k], "youden")]}
        return point

    def _finish_findings(self) -> None:
        """Multi-label: :func:`wsr_med.metrics.multilabel.multilabel_metrics` on the calibrated probabilities at each
        finding's validation threshold, per-finding calibration, ``cases.csv``, small-multiple figures, the report."""
        targets, raw = np.stack(self.targets), np.stack(self.probs)
        probs = self.decision.probabilities(raw)
        m = self.metrics = multilabel_metrics(targets, probs, self.classes, self.decision.thresholds, self.n_boot)
        m["operating_point"] = {"rule": self.decision.operating_point, "chosen_on": self.decision.fitted_on}
        m["calibration"] = finding_calibration(targets, raw, probs, self.classes)
        m["provenance"], m["split"] = self.provenance, self.eval_split
        m["warnings"] += small_sample_warnings(len(targets), {})
        if self.eval_split == "validation":
            m["warnings"].append(VALIDATION_CAVEAT)
        unusual = sum(bool(u) for u in self.unlike_training)
        if unusual:
            m["warnings"].append(f"{unusual} of {len(targets)} cases look unlike the training data; see the unlike_training "
                                 "column of cases.csv")
        for warning in m["warnings"]:
            logger.warning("%s", warning)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.report_dir / RunFolder.METRICS, json.dumps(json_ready(m), indent=1, allow_nan=False))
        write_csv(self.report_dir / RunFolder.CASES,
                  ["path", *[f"label_{c}" for c in self.classes], *[f"prob_{c}" for c in self.classes], "unlike_training"],
                  [[path, *["" if v != v else f"{v:g}" for v in label], *[f"{v:.9g}" for v in row], unlike]
                   for path, label, row, unlike in zip(self.paths, targets, probs, self.unlike_training)])
        self._plots = [plot_finding_rocs(targets, probs, m, self.report_dir / "finding_rocs.png"),
                       plot_finding_reliability(m["calibration"], self.report_dir / "finding_reliability.png")]
        report = write_multilabel_report(m, self._plots, self.report_dir / RunFolder.REPORT, provenance=self.provenance)
        logger.info("evaluation on %d cases, %d findings: macro AUC %.4f [%.4f, %.4f], micro AUC %.4f; report %s", m["n"],
                    len(self.classes), m["macro_auc"], *m["macro_auc_ci95"], m["micro_auc"], report)
        self._log_mlflow()

    def _caveats(self, calibration: dict) -> list[str]:
        """What the figures cannot be trusted for: the cases that tuned the model, a calibration that failed."""
        out = []
        if self.eval_split == "validation":
            out.append(VALIDATION_CAVEAT)
        if calibration["fitted_on"].startswith("validation") and temperature_at_bound(calibration["temperature"]):
            out.append(f"the temperature {calibration['temperature']:.3g} stopped at its bound: the validation cases were too "
                       "few or perfectly separated to calibrate on, so the probabilities are not calibrated")
        if calibration["ece_after"] > calibration["ece_before"] + 0.01:
            out.append(f"calibration made these cases' ECE worse ({calibration['ece_before']:.3f} → "
                       f"{calibration['ece_after']:.3f}): the probabilities are not reliable as risks here")
        return out

    def _calibration(self, labels: np.ndarray, raw: np.ndarray, probs: np.ndarray) -> dict:
        """ECE, Brier score and NLL on these cases before and after the run's temperature."""
        ece_before, reliability_before = expected_calibration_error(labels, raw)
        return {"temperature": self.decision.temperature, "fitted_on": self.decision.fitted_on,
                "ece_before": ece_before, "ece_after": expected_calibration_error(labels, probs)[0],
                "brier_before": brier_score(labels, raw), "brier_after": brier_score(labels, probs),
                "nll_before": negative_log_likelihood(labels, raw), "nll_after": negative_log_likelihood(labels, probs),
                "reliability_before": reliability_before}

    def _log_mlflow(self) -> None:
        run_id = RunFolder(self.run_dir).mlflow_run_id if self.run_dir else None
        if not tracking.enabled(self.tracking_uri) or run_id is None:
            return
        tracking.Tolerant(self.tracking_uri, keeps=str(self.report_dir)).call(self._send, tracking.client(self.tracking_uri), run_id)

    def _send(self, client, run_id: str) -> None:
        m = self.metrics
        if self.multilabel:
            values = {"macro_auc": m["macro_auc"], "micro_auc": m["micro_auc"],
                      **{tracking.metric_name(f"auc_{f}"): v["auc"] for f, v in m["per_finding"].items()}}
            self._upload(client, run_id, values, write_multilabel_report)
            return
        values = {"auc": m["auc"], "auc_ci95_low": m["auc_ci95"][0], "auc_ci95_high": m["auc_ci95"][1],
                  "accuracy": m["accuracy"], "ece": m["ece"]}
        values.update({k: m[k] for k in ("balanced_accuracy", "sensitivity", "specificity", "ppv", "npv") if k in m})
        values.update({tracking.metric_name(f"auc_{c}"): v["auc"] for c, v in m["per_class"].items()})
        self._upload(client, run_id, values, write_html_report)

    def _upload(self, client, run_id: str, values: dict, write_report) -> None:
        """The metrics (``<tag>_<name>``), ``metrics.json``, the figures and a report without example images."""
        for k, v in values.items():
            if v == v:  # NaN is not a metric
                client.log_metric(run_id, f"{self.tag}_{k}", float(v))
        for path in [self.report_dir / RunFolder.METRICS, *self._plots]:
            client.log_artifact(run_id, str(path), self.tag)
        with tempfile.TemporaryDirectory() as tmp:  # the report without example images: no image leaves the machine
            shared = write_report(self.metrics, self._plots, Path(tmp) / RunFolder.REPORT, provenance=self.provenance)
            client.log_artifact(run_id, str(shared), self.tag)


class PredictionWriter(Collector):
    """Write ``predictions.csv``: path, predicted class, one probability column per class, ``decision_rule`` (how the
    class was decided: ``prob_<positive class> >= <threshold>`` for two classes, else ``highest probability``), and
    ``unlike_training`` (why the scan looks unlike the training data; empty when it does not, see
    :mod:`wsr_med.data.profile`).

    Args:
        classes: class names in the model's order (the class map saved with the model).
        output_file: the CSV path; written to a temporary name and renamed, never half-written.
        decision: the run's temperature and operating point: the probabilities are calibrated with it and
            ``predicted_class`` is its decision (binary: the threshold; multi-class: the most probable class).
    """

    def __init__(self, classes: list[str], output_file: str | Path, decision: Decision | None = None) -> None:
        super().__init__()
        self.classes = list(classes)
        self.output_file = Path(output_file)
        self.decision = decision or Decision()

    def finish(self, engine: Engine) -> None:
        probs = self.decision.probabilities(np.stack(self.probs)) if self.probs else np.zeros((0, len(self.classes)))
        if isinstance(self.decision, FindingDecision):
            self._write_findings(probs)
            return
        predicted = self.decision.classes(probs)
        rule = self.decision.rule(self.classes)
        write_csv(self.output_file, ["path", "predicted_class", *[f"prob_{c}" for c in self.classes], "decision_rule",
                                     "unlike_training"],
                  [[path, self.classes[int(k)], *[f"{p:.9g}" for p in row], rule, unlike]
                   for path, k, row, unlike in zip(self.paths, predicted, probs, self.unlike_training)])
        logger.info("predictions for %d scans written to %s", len(self.paths), self.output_file)

    def _write_findings(self, probs: np.ndarray) -> None:
        """Multi-label: per finding its calibrated probability and whether it is called present at its threshold, the
        list of findings called present (``none`` for none), the rule, ``unlike_training``."""
        rows = _finding_rows(self.classes, probs, self.decision.classes(probs))
        rule = self.decision.rule(self.classes)
        write_csv(self.output_file, ["path", *[f"prob_{c}" for c in self.classes], *[f"present_{c}" for c in self.classes],
                                     "findings", "decision_rule", "unlike_training"],
                  [[path, *row, rule, unlike] for path, row, unlike in zip(self.paths, rows, self.unlike_training)])
        logger.info("predictions for %d scans written to %s", len(self.paths), self.output_file)


def _finding_rows(classes: list[str], probs: np.ndarray, present: np.ndarray) -> list[list[str]]:
    return [[*[f"{p:.9g}" for p in row], *["yes" if v else "no" for v in called],
             "|".join(c for c, v in zip(classes, called) if v) or "none"] for row, called in zip(probs, present)]


def evaluation_provenance(run: RunFolder, dataset_dir: str | None = None, eval_split: str | None = None) -> dict:
    """Where an evaluation comes from, without paths: run, model, training settings, data (hashed), split, date."""
    settings = run.settings()
    best = run.best()
    digest = hashlib.sha256(run.model.read_bytes()).hexdigest()[:16] if run.model.is_file() else "none"
    return {
        "evaluated": time.strftime("%Y-%m-%d %H:%M"),
        "run": settings.get("run_name", run.path.name),
        "MLflow run": run.mlflow_run_id or "none",
        "model (model.pt sha256)": digest,
        "best epoch": f"{best.get('epoch', '?')} of {settings.get('max_epochs', '?')} ({best.get('metric', '')} "
                      f"{best.get('value', float('nan')):.4f})" if best else "unknown",
        **({"model selection": best["selection"]["rule"]} if best.get("selection") else {}),
        "network": f"{settings.get('backbone')} {json.dumps(settings.get('backbone_kwargs') or {})}, head "
                   f"{settings.get('head')}, {settings.get('image_size')} px, {settings.get('in_channels')} channel(s)",
        "training": f"lr {settings.get('learning_rate')}, batch {settings.get('batch_size')}, seed {settings.get('seed')}, "
                    f"class_balance {settings.get('class_balance')}",
        "data (hashed location)": path_id(dataset_dir),
        "cases": {"all": "every scan of the folder", "test": "the run's test split",
                  "validation": "the run's validation split"}.get(eval_split or "", eval_split or "?"),
    }
