"""The multi-label training loss: one binary cross-entropy per finding, masked labels left out."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskedBCEWithLogitsLoss", "finding_pos_weight"]


class MaskedBCEWithLogitsLoss(nn.Module):
    """``BCEWithLogitsLoss`` over the labelled entries only: a NaN label (``uncertain=ignore``) adds nothing to the loss
    or its gradient. The mean is over labelled entries, so a batch with many masked labels weighs the same.

    Args:
        pos_weight: ``(F,)`` weight of the positive term per finding (``class_balance=weighted_loss``:
            :func:`finding_pos_weight`), or None.

    Shapes: logits ``(B, F)``, labels ``(B, F)`` (1.0, 0.0 or NaN) -> a scalar.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.dtype)
        known = ~torch.isnan(labels)
        losses = F.binary_cross_entropy_with_logits(logits, torch.where(known, labels, torch.zeros_like(labels)),
                                                    pos_weight=self.pos_weight, reduction="none")
        return (losses * known).sum() / known.sum().clamp_min(1)


def finding_pos_weight(labels: list[list[float | None]]) -> torch.Tensor:
    """Per finding, negatives / positives among the labelled training cases (1 for a finding with no positive)."""
    values = torch.tensor([[float("nan") if v is None else v for v in label] for label in labels], dtype=torch.float64)
    positives = (values == 1.0).sum(0)
    negatives = (values == 0.0).sum(0)
    return torch.where(positives > 0, negatives / positives.clamp_min(1), torch.ones_like(positives, dtype=torch.float64)).float()
