"""Evaluator handlers: the evaluation report, the predictions CSV, and a warning when a model has collapsed."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wsr_med import tracking
from wsr_med.data.csv_files import write_csv
from wsr_med.handlers.mlflow_tracker import fold_in_monai_tracking
from wsr_med.metrics import (
    classification_metrics,
    collapse_warning,
    json_ready,
    plot_examples,
    plot_confusion,
    plot_reliability,
    plot_roc,
    write_html_report,
)
from wsr_med.runs import RunFolder

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CollapseMonitor", "EvaluationReporter", "PredictionWriter"]

logger = logging.getLogger(__name__)


class _Collector:
    """Gathers probabilities (and labels, paths) of every case an evaluator sees."""

    keep_thumbnails = False

    def __init__(self) -> None:
        self._reset()

    def _reset(self, engine: Engine | None = None) -> None:
        self.probs: list[np.ndarray] = []
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.unlike_training: list[str] = []  # why each case looks unlike the training data ("" if it does not)
        self.thumbnails: list[np.ndarray | None] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        if not engine.has_event_handler(fold_in_monai_tracking, Events.STARTED):
            engine.add_event_handler(Events.STARTED, fold_in_monai_tracking)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def _collect(self, engine: Engine) -> None:
        # MONAI evaluators decollate: the batch and the output are lists with one dict per case.
        for out, item in zip(engine.state.output, engine.state.batch):
            self._add(out, item)

    def _add(self, out: dict, item: dict) -> None:
        self.probs.append(torch.as_tensor(out["pred"]).float().cpu().numpy())
        label = out.get("label")
        if label is not None:
            label = torch.as_tensor(label)
            self.labels.append(int(label.argmax()) if label.numel() > 1 else int(label))
        self.paths.append(str(item.get("relative_path", item.get("image", ""))))
        self.unlike_training.append(str(item.get("unlike_training", "")))
        if self.keep_thumbnails:
            self.thumbnails.append(_thumbnail(item.get("image")))

    def finish(self, engine: Engine) -> None:
        raise NotImplementedError


def _thumbnail(image, size: int = 64) -> np.ndarray | None:
    """A small uint8 picture of a preprocessed 2D input ``(C, H, W)`` in [0, 1] (first channel), or None."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        return None
    small = torch.nn.functional.adaptive_avg_pool2d(image[:1].float().cpu()[None], size)[0, 0]
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


class CollapseMonitor(_Collector):
    """On the validator: warn every epoch whose validation predictions are (nearly) the same for every case.

    Such a model ranks nothing (AUC near 0.5, accuracy the majority share) while training loss may look
    fine; see :func:`wsr_med.metrics.collapse_warning`. The last warning is kept in ``self.warning``.
    """

    def finish(self, engine: Engine) -> None:
        self.warning = collapse_warning(np.stack(self.probs)) if self.probs else None
        if self.warning:
            logger.warning("epoch %s: validation %s", engine.state.epoch, self.warning)


class EvaluationReporter(_Collector):
    """Write ``metrics.json``, ROC / confusion / reliability PNGs, ``report.html`` and the per-case
    ``cases.csv`` (label and probabilities, for paired comparisons) to ``report_dir``; log them to MLflow.

    Args:
        classes: class names, in the model's order.
        report_dir: where the files go (created).
        threshold: decision threshold on the positive class (binary tasks).
        n_boot: bootstrap resamples for the AUC confidence interval.
        run_dir: the training run folder; its MLflow run receives the report (prefix ``eval_``).
        tracking_uri: MLflow tracking URI; None or empty for no MLflow logging.
        tag: name of this evaluation in MLflow (metrics ``<tag>_auc``..., artifacts under ``<tag>/``).
        provenance: what is evaluated (see :meth:`wsr_med.runs.RunFolder.provenance`), shown first in the report.

    The local report also shows example cases per class (``examples.png``: the most confident right and wrong
    ones, as small thumbnails); the copy sent to MLflow leaves them out, as no image leaves the machine.
    """

    keep_thumbnails = True

    def __init__(self, classes: list[str], report_dir: str | Path, threshold: float = 0.5, n_boot: int = 1000,
                 run_dir: str | Path | None = None, tracking_uri: str | None = None, tag: str = "eval",
                 provenance: dict | None = None) -> None:
        super().__init__()
        self.classes = list(classes)
        self.report_dir = Path(report_dir)
        self.threshold = threshold
        self.n_boot = n_boot
        self.run_dir = Path(run_dir) if run_dir else None
        self.tracking_uri = tracking_uri
        self.tag = tag
        self.provenance = dict(provenance or {})
        self.metrics: dict | None = None

    def finish(self, engine: Engine) -> None:
        if not self.labels:
            raise ValueError("evaluation needs labelled cases; for unlabelled scans use the inference workflow")
        labels, probs = np.array(self.labels), np.stack(self.probs)
        self.metrics = classification_metrics(labels, probs, self.classes, self.threshold, self.n_boot)
        self.metrics["provenance"] = self.provenance
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
        (self.report_dir / "metrics.json").write_text(json.dumps(json_ready(self.metrics), indent=1, allow_nan=False))
        # 9 significant digits round-trip float32: AUC recomputed from the file matches metrics.json
        write_csv(self.report_dir / "cases.csv", ["path", "label", *[f"prob_{c}" for c in self.classes], "unlike_training"],
                  [[p, self.classes[y], *[f"{v:.9g}" for v in pr], u]
                   for p, y, pr, u in zip(self.paths, self.labels, self.probs, self.unlike_training)])
        plots = [plot_roc(labels, probs, self.classes, self.metrics, self.report_dir / "roc.png"),
                 plot_confusion(self.metrics, self.report_dir / "confusion_matrix.png"),
                 plot_reliability(self.metrics, self.report_dir / "reliability.png")]
        self._plots = plots
        examples = plot_examples(self.thumbnails, labels, probs, self.classes, self.report_dir / "examples.png")
        report = write_html_report(self.metrics, [*plots, *([examples] if examples else [])], self.report_dir / "report.html",
                                   provenance=self.provenance)
        low, high = self.metrics["auc_ci95"]
        logger.info("evaluation on %d cases: AUC (%s) %.4f [%.4f, %.4f], accuracy %.4f, balanced accuracy %.4f; report %s",
                    self.metrics["n"], self.metrics["auc_kind"], self.metrics["auc"], low, high, self.metrics["accuracy"],
                    self.metrics["balanced_accuracy"], report)  # NaN prints as nan
        self._log_mlflow()

    def _log_mlflow(self) -> None:
        run_id = RunFolder(self.run_dir).mlflow_run_id if self.run_dir else None
        if not tracking.enabled(self.tracking_uri) or run_id is None:
            return
        tracking.Tolerant(self.tracking_uri, keeps=str(self.report_dir)).call(self._send, tracking.client(self.tracking_uri), run_id)

    def _send(self, client, run_id: str) -> None:
        m = self.metrics
        values = {"auc": m["auc"], "auc_ci95_low": m["auc_ci95"][0], "auc_ci95_high": m["auc_ci95"][1],
                  "accuracy": m["accuracy"], "ece": m["ece"]}
        values.update({k: m[k] for k in ("balanced_accuracy", "sensitivity", "specificity", "ppv", "npv") if k in m})
        values.update({tracking.metric_name(f"auc_{c}"): v["auc"] for c, v in m["per_class"].items()})
        for k, v in values.items():
            if v == v:  # NaN is not a metric
                client.log_metric(run_id, f"{self.tag}_{k}", float(v))
        for name in ("metrics.json", "roc.png", "confusion_matrix.png", "reliability.png"):
            client.log_artifact(run_id, str(self.report_dir / name), self.tag)
        with tempfile.TemporaryDirectory() as tmp:  # the report without example images: no image leaves the machine
            shared = write_html_report(self.metrics, self._plots, Path(tmp) / "report.html", provenance=self.provenance)
            client.log_artifact(run_id, str(shared), self.tag)


class PredictionWriter(_Collector):
    """Write ``predictions.csv``: path, predicted class, one probability column per class, and ``unlike_training``
    (why the scan looks unlike the training data; empty when it does not, see :mod:`wsr_med.data.profile`).

    Args:
        classes: class names in the model's order (the class map saved with the model).
        output_file: the CSV path; written to a temporary name and renamed, never half-written.
    """

    def __init__(self, classes: list[str], output_file: str | Path) -> None:
        super().__init__()
        self.classes = list(classes)
        self.output_file = Path(output_file)

    def finish(self, engine: Engine) -> None:
        write_csv(self.output_file, ["path", "predicted_class", *[f"prob_{c}" for c in self.classes], "unlike_training"],
                  [[path, self.classes[int(np.argmax(probs))], *[f"{p:.9g}" for p in probs], unlike]
                   for path, probs, unlike in zip(self.paths, self.probs, self.unlike_training)])
        logger.info("predictions for %d scans written to %s", len(self.paths), self.output_file)
