"""Validation-time monitors of a training: a model that has collapsed, and the calibration of the best epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsr_med.files import atomic_write
from wsr_med.handlers.collectors import Collector
from wsr_med.metrics import collapse_warning, fit_decision, json_ready, parse_operating_point, temperature_at_bound
from wsr_med.runs import RunFolder

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CalibrationFitter", "CollapseMonitor"]

logger = logging.getLogger(__name__)


class CollapseMonitor(Collector):
    """On the validator: warn every epoch whose validation predictions are (nearly) the same for every case.

    Such a model ranks nothing (AUC near 0.5, accuracy the majority share) while training loss may look
    fine; see :func:`wsr_med.metrics.collapse_warning`. The last warning is kept in ``self.warning``.

    Args:
        findings: a multi-label model's findings: each is checked on its own (one finding can collapse while the
            others still rank cases), and the warning names those that did.
    """

    def __init__(self, findings: list[str] | None = None) -> None:
        super().__init__()
        self.findings = findings

    def finish(self, engine: Engine) -> None:
        probs = np.stack(self.probs) if self.probs else None
        if probs is not None and self.findings:
            from wsr_med.metrics.multilabel import collapsed_findings

            self.warning = collapsed_findings(probs, self.findings) or None
        else:
            self.warning = collapse_warning(probs) if probs is not None else None
        if self.warning:
            logger.warning("epoch %s: validation %s", engine.state.epoch, self.warning)


class CalibrationFitter(Collector):
    """On the validator: when this epoch's weights became ``model.pt`` (``best.json`` says so), fit the temperature
    (by NLL) and the operating point on these validation cases and write ``calibration.json`` beside them.

    Only validation cases are used: the test split and evaluated folders never choose a threshold.

    Args:
        run_dir: the run folder.
        operating_point: ``youden``, ``sensitivity:0.95``, ``specificity:0.95`` or ``fixed:0.5`` (binary tasks;
            multi-class decisions are the most probable class).
    """

    def __init__(self, run_dir: str | Path, operating_point: str = "youden") -> None:
        super().__init__()
        parse_operating_point(operating_point)  # a wrong rule is refused when the workflow is built
        self.run = RunFolder(run_dir)
        self.operating_point = operating_point

    def finish(self, engine: Engine) -> None:
        best = self.run.best()
        epoch = int(engine.state.epoch)
        if best.get("epoch") != epoch or not self.labels:
            return
        if self.run.multilabel():
            self._fit_findings(epoch)
            return
        try:
            decision, fit = fit_decision(np.array(self.labels), np.stack(self.probs), self.operating_point,
                                         fitted_on=f"validation split, epoch {epoch}")
        except ValueError as e:  # e.g. one class only in a tiny validation split
            logger.warning("epoch %d: no calibration fitted (%s); evaluation and prediction use threshold 0.5", epoch, e)
            (self.run / RunFolder.CALIBRATION).unlink(missing_ok=True)
            return
        doc = {"epoch": epoch, "n_cases": len(self.labels), "decision": decision.to_dict(), **fit,
               "collapsed": collapse_warning(np.stack(self.probs)) or ""}
        atomic_write(self.run / RunFolder.CALIBRATION, json.dumps(json_ready(doc), indent=1))
        if temperature_at_bound(decision.temperature):
            logger.warning("epoch %d: the fitted temperature %.3g is at its bound: the %d validation cases are too few or "
                           "perfectly separated to calibrate on", epoch, decision.temperature, len(self.labels))
        logger.info("epoch %d: temperature %.3f (validation NLL %.4f -> %.4f)%s", epoch, decision.temperature,
                    fit["nll_before"], fit["nll_after"],
                    f", {self.operating_point} threshold {decision.threshold:.4f}" if decision.threshold is not None else "")

    def _fit_findings(self, epoch: int) -> None:
        """Multi-label: a temperature and an ``operating_point`` threshold per finding, on its labelled validation cases."""
        from wsr_med.metrics.multilabel import FindingDecision, collapsed_findings, fit_finding_decisions

        findings = fit_finding_decisions(np.stack(self.targets), np.stack(self.probs), self.run.classes(), self.operating_point)
        decision = FindingDecision(findings, self.operating_point, f"validation split, epoch {epoch}")
        unfitted = [f for f, d in findings.items() if not d["fitted"]]
        if unfitted:
            logger.warning("epoch %d: %s lack positive or negative validation cases: threshold 0.5, no calibration",
                           epoch, ", ".join(unfitted))
        doc = {"epoch": epoch, "n_cases": len(self.probs), "decision": decision.to_dict(),
               "collapsed": collapsed_findings(np.stack(self.probs), self.run.classes())}
        atomic_write(self.run / RunFolder.CALIBRATION, json.dumps(json_ready(doc), indent=1))
        logger.info("epoch %d: per-finding temperatures and %s thresholds fitted on %d validation cases", epoch,
                    self.operating_point, len(self.probs))
