"""What the bundle's evaluators feed their metrics: ignite output transforms over decollated MONAI outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["auc_metric", "evaluation_metrics", "masked_macro_auc", "metric_inputs", "per_class_auc_metrics",
           "validation_metrics"]


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


def validation_metrics(classes: list[str], multilabel: bool = False, prefix: str = "val_") -> dict:
    """The metrics logged each validation besides ``val_auc``: accuracy and loss (NLL), and one-vs-rest AUC per class for
    three classes or more; multi-label, the AUC of each finding."""
    from ignite.metrics import Accuracy, EpochMetric, Loss

    from wsr_med.tracking import metric_name

    if multilabel:
        return {metric_name(f"{prefix}auc_{name}"): EpochMetric(_finding_auc(k), output_transform=metric_inputs("probs"),
                                                                 check_compute_fn=False)
                for k, name in enumerate(classes)}
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
