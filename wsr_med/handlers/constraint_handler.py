"""Ignite/MONAI handler that keeps Wise-SrNet's depthwise weights non-negative during training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsr_med.networks.constraints import attach_constraints

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ConstraintHandler"]


class ConstraintHandler:
    """Project constrained weights after every optimizer step of a MONAI ``SupervisedTrainer``.

    Registers :func:`wsr_med.networks.attach_constraints` on ``engine.optimizer`` for
    ``engine.network``, so the projection follows each real update (a step that AMP skips
    is not projected either, as nothing changed).

    Bundle config::

        {"_target_": "wsr_med.handlers.ConstraintHandler"}
    """

    def __init__(self) -> None:
        self._hooked: set[int] = set()

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        # MONAI attaches handlers before the trainer's optimizer attribute exists: hook at start, once.
        engine.add_event_handler(Events.STARTED, self._hook_optimizer)

    def _hook_optimizer(self, engine: Engine) -> None:
        if id(engine.optimizer) not in self._hooked:
            attach_constraints(engine.optimizer, engine.network)
            self._hooked.add(id(engine.optimizer))
