"""What the bundle's evaluators feed their metrics: ignite output transforms over decollated MONAI outputs, and the
metric that chooses the best epoch (:class:`ModelSelection`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wsr_med.settings import SELECTION_AVERAGES, default

__all__ = ["ModelSelection", "auc_metric", "evaluation_metrics", "masked_macro_auc", "metric_inputs",
           "per_class_auc_metrics", "validation_metrics"]

logger = logging.getLogger(__name__)


def metric_inputs(kind: str = "probs") -> Callable:
    """An ignite ``output_transform`` giving batched ``(y_pred, y)`` from a decollated MONAI evaluator output.

    ``probs``: (softmax probabilities, one-hot labels) for ROC AUC; ``index``: (probabilities,
    class indices) for accuracy; ``log_probs``: (log-probabilities, class indices) for an NLL loss,
    which equals the cross-entropy of the logits.
    """

    def transform(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        pred = torch.stack([o["pred"] for o in output])
        label = torch.stack([o["label"] for o in output])
        if kind == "probs":
            return pred, label
        index = label.argmax(1)
        return (pred.clamp_min(1e-12).log(), index) if kind == "log_probs" else (pred, index)

    return transform


def per_class_auc_metrics(classes: list[str], prefix: str = "val_auc") -> dict:
    """``{"<prefix>_<class>": ROCAUC}`` one-vs-rest per class for multi-class tasks (none for binary ones,
    where the single AUC says it all), to add to an evaluator's ``additional_metrics``."""
    from monai.handlers import ROCAUC

    from wsr_med.tracking import metric_name

    if len(classes) <= 2:
        return {}

    def column(c: int) -> Callable:
        def transform(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
            pred, label = metric_inputs("probs")(output)
            return pred[:, c], label[:, c]

        return transform

    return {metric_name(f"{prefix}_{name}"): ROCAUC(output_transform=column(c)) for c, name in enumerate(classes)}


def masked_macro_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-label validation AUC (ignite's argument order): :func:`wsr_med.metrics.multilabel.macro_auc`."""
    from wsr_med.metrics.multilabel import macro_auc

    return macro_auc(labels.float().numpy(), probs.float().numpy())


def _finding_auc(k: int) -> Callable:
    def compute(probs: torch.Tensor, labels: torch.Tensor) -> float:
        return masked_macro_auc(probs[:, k : k + 1], labels[:, k : k + 1])

    return compute


def auc_metric(multilabel: bool = False):
    """The validation AUC that picks the best epoch: ROC AUC (macro one-vs-rest over classes, MONAI's ``ROCAUC``); multi-
    label, :func:`masked_macro_auc` over findings. Both gather every rank's cases under torchrun."""
    from ignite.metrics import EpochMetric
    from monai.handlers import ROCAUC

    if not multilabel:
        return ROCAUC(output_transform=metric_inputs("probs"))
    return EpochMetric(masked_macro_auc, output_transform=metric_inputs("probs"), check_compute_fn=False)


def validation_metrics(classes: list[str], multilabel: bool = False, prefix: str = "val_",
                       selection: "ModelSelection | None" = None) -> dict:
    """The metrics logged each validation besides the key metric (``selection``'s): accuracy and loss (NLL), and
    one-vs-rest AUC per class for three classes or more; multi-label, the AUC of each finding (and the macro AUC of them
    all as ``val_auc`` when the validation loss selects)."""
    from ignite.metrics import Accuracy, EpochMetric, Loss

    from wsr_med.tracking import metric_name

    if multilabel:
        monitored = {f"{prefix}auc": auc_metric(True)} if selection is not None and selection.metric != "val_auc" else {}
        return {**monitored, **{metric_name(f"{prefix}auc_{name}"): EpochMetric(
            _finding_auc(k), output_transform=metric_inputs("probs"), check_compute_fn=False)
            for k, name in enumerate(classes)}}
    return {f"{prefix}accuracy": Accuracy(output_transform=metric_inputs("index")),
            f"{prefix}loss": Loss(torch.nn.NLLLoss(), output_transform=metric_inputs("log_probs")),
            **per_class_auc_metrics(classes, f"{prefix}auc")}


def evaluation_metrics(classes: list[str], multilabel: bool = False) -> dict:
    """What an evaluation logs as it runs (its report computes every figure itself): the AUC, accuracy and per-class
    AUCs; multi-label, the macro AUC and each finding's."""
    from ignite.metrics import Accuracy

    if multilabel:
        return {"auc": auc_metric(True), **validation_metrics(classes, True, prefix="")}
    return {"auc": auc_metric(False), "accuracy": Accuracy(output_transform=metric_inputs("index")),
            **per_class_auc_metrics(classes, "auc")}


def _negative_bce(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Minus the binary cross-entropy of ``probs`` on the labelled findings (NaN labels left out): higher is better."""
    known = ~torch.isnan(labels.float())
    p = probs.float()[known].clamp(1e-7, 1 - 1e-7)
    return -float(torch.nn.functional.binary_cross_entropy(p, labels.float()[known])) if known.any() else float("nan")


@dataclass(frozen=True)
class ModelSelection:
    """What chooses the best epoch (``model.pt``, ``best.json``), decided once from the validation split.

    Single-label: the validation ROC AUC (``val_auc``). Multi-label: the AUC of the findings that have at least
    ``min_cases`` positives and ``min_cases`` negatives in the validation split, averaged as ``average`` says (macro,
    micro or support-weighted, :func:`wsr_med.metrics.multilabel.selection_auc`), still named ``val_auc``; a finding
    below that is monitored (its own ``val_auc_<finding>``) and never selects: a finding with two validation positives
    would otherwise decide which model the user gets. When no finding qualifies, the validation loss (binary
    cross-entropy, logged as ``val_neg_loss``: higher is better) selects, and the run says so.

    Attributes:
        metric: the evaluator's key metric (``val_auc`` or ``val_neg_loss``).
        findings: the findings that select (multi-label), in the model's output order.
        left_out: finding -> its validation counts, for the findings that do not.
    """

    metric: str = "val_auc"
    multilabel: bool = False
    findings: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()
    left_out: dict = field(default_factory=dict)
    average: str = "macro"
    min_cases: int = default("selection_min_cases")

    @classmethod
    def of(cls, data, min_cases: int = default("selection_min_cases"),
           average: str = default("selection_average")) -> "ModelSelection":
        """The selection for ``data`` (:class:`wsr_med.workflows.data.PreparedData`); says it in one line (rank 0)."""
        from monai.utils import look_up_option

        average = look_up_option(average, SELECTION_AVERAGES)
        if not data.multilabel:
            return cls()
        kept, left_out = [], {}
        for k, name in enumerate(data.classes):
            values = [item["label"][k] for item in data.validation]
            positives, negatives = sum(v == 1.0 for v in values), sum(v == 0.0 for v in values)
            if positives >= min_cases and negatives >= min_cases:
                kept.append(k)
            else:
                left_out[name] = f"{positives} positive and {negatives} negative cases"
        selection = cls("val_auc" if kept else "val_neg_loss", True, tuple(data.classes[k] for k in kept), tuple(kept),
                        left_out, average, int(min_cases))
        from wsr_med.workflows.data import _rank

        if _rank() == 0:
            logger.info("%s", selection.describe())
        return selection

    def describe(self) -> str:
        """The rule in one line: which findings choose the model, which do not and why."""
        if not self.multilabel:
            return "the best epoch is the one with the highest validation AUC"
        enough = f"at least {self.min_cases} positives and {self.min_cases} negatives in the validation split"
        out = "; ".join(f"{name}: {counts}" for name, counts in self.left_out.items())
        if not self.findings:
            return (f"no finding has {enough} ({out}): the best epoch is the one with the lowest validation loss "
                    "(binary cross-entropy); every finding's AUC is still logged")
        rule = (f"the best epoch is chosen on the {self.average} validation AUC of the findings with {enough}: "
                f"{', '.join(self.findings)}")
        return rule + (f" (monitored, not selecting: {out})" if out else "")

    def to_dict(self) -> dict:
        """What ``best.json`` and MLflow record of it (multi-label; ``{}`` for single-label)."""
        if not self.multilabel:
            return {}  # single-label: the validation AUC, as always
        selected_on = f"{self.average} AUC of {', '.join(self.findings)}" if self.findings else \
            "validation loss (no finding had enough validation cases)"
        return {"metric": self.metric, "average": self.average if self.findings else None,
                "min_cases": self.min_cases, "findings": list(self.findings), "left_out": dict(self.left_out),
                "rule": self.describe(), "selected_on": selected_on}

    def key_metric(self) -> dict:
        """The evaluator's ``key_val_metric``: ``{name: ignite metric}``."""
        from ignite.metrics import EpochMetric

        from wsr_med.metrics.multilabel import selection_auc

        if not self.multilabel:
            return {self.metric: auc_metric(False)}
        if not self.findings:
            return {self.metric: EpochMetric(_negative_bce, output_transform=metric_inputs("probs"),
                                             check_compute_fn=False)}
        indices, average = list(self.indices), self.average

        def compute(probs: torch.Tensor, labels: torch.Tensor) -> float:
            return selection_auc(labels.float().numpy(), probs.float().numpy(), indices, average)

        return {self.metric: EpochMetric(compute, output_transform=metric_inputs("probs"), check_compute_fn=False)}
