"""What the bundle's evaluators feed their metrics: ignite output transforms over decollated MONAI outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["metric_inputs", "per_class_auc_metrics"]


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
