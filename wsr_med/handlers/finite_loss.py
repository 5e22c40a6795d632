"""Stop training at the first non-finite loss, naming the cases of the batch, before anything is saved from it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from wsr_med.errors import WsrMedError

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["FiniteLossCheck"]


class FiniteLossCheck:
    """On a MONAI ``SupervisedTrainer``: raise a clear error when the loss is NaN or infinite.

    Scans are checked for finite pixels when they are read, so a non-finite loss means diverging
    training (learning rate) or a value no check foresaw; either way the weights of that step are
    lost, and going on would only write NaN checkpoints and predictions. The epoch in progress never
    completes, so no checkpoint and no best model is saved from it; the last completed epoch's
    checkpoint and ``model.pt`` stay as they were.

    Args:
        patience: consecutive non-finite losses tolerated (1 = none). Under fp16 AMP a few overflowing
            steps are normal (the gradient scaler skips them), so the bundle allows 10 there.
    """

    def __init__(self, patience: int = 1) -> None:
        self.patience = max(1, int(patience))
        self._bad = 0

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = float((output[0] if isinstance(output, list) else output)["loss"])
        if math.isfinite(loss):
            self._bad = 0
            return
        self._bad += 1
        if self._bad < self.patience:
            return
        batch = engine.state.batch if isinstance(engine.state.batch, list) else []
        files = [str(item.get("relative_path", item.get("image", "?"))) for item in batch if isinstance(item, dict)]
        raise WsrMedError(
            f"training stopped at epoch {engine.state.epoch}, iteration {engine.state.iteration}: the loss is {loss} "
            f"({self._bad} non-finite in a row). The batch held: {', '.join(files) or 'unknown files'}. Nothing from this "
            "epoch was saved; check these files, or lower learning_rate, then run the same command to resume.")
