"""Fine-tuning a pretrained backbone: train the new head alone for the first epochs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["FreezeBackbone"]

logger = logging.getLogger(__name__)


class FreezeBackbone:
    """On the trainer: the backbone's weights get no gradient during the first ``epochs`` epochs, so a new head
    settles before it moves pretrained features (its BatchNorm statistics still follow the data).

    Args:
        network: the trained :class:`wsr_med.networks.WiseSrNet` (a DDP wrapper is unwrapped; under torchrun use
            ``finetune.backbone_lr_scale`` instead, as DDP expects the same trainable weights every step).
        epochs: how many epochs the backbone stays frozen (0: never).
    """

    def __init__(self, network: torch.nn.Module, epochs: int = 0) -> None:
        self.backbone = getattr(network, "module", network).backbone
        self.epochs = int(epochs)

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self.epochs > 0:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frozen = engine.state.epoch <= self.epochs
        if frozen == (not next(self.backbone.parameters()).requires_grad):
            return
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not frozen)
        logger.info("epoch %d: backbone %s", engine.state.epoch, "frozen (head only)" if frozen else "trained again")
