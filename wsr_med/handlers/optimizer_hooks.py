"""Ignite/MONAI handlers hooked on the trainer's optimizer: Wise-SrNet's non-negativity, BatchNorm warm start."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsr_med.networks.batchnorm import warm_start_batchnorm
from wsr_med.networks.constraints import attach_constraints

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["BatchNormWarmStart", "ConstraintHandler"]


class _OptimizerHook:
    """Call ``self.hook(optimizer, network)`` once, when the trainer starts (MONAI attaches handlers before the
    trainer's optimizer attribute exists; a resumed trainer starts after its state is restored)."""

    def __init__(self) -> None:
        self._hooked: set[int] = set()

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._hook_optimizer)

    def _hook_optimizer(self, engine: Engine) -> None:
        if id(engine.optimizer) not in self._hooked:
            self.hook(engine.optimizer, engine.network)
            self._hooked.add(id(engine.optimizer))


class BatchNormWarmStart(_OptimizerHook):
    """Bias-corrected BatchNorm running statistics for a MONAI ``SupervisedTrainer``, see
    :func:`wsr_med.networks.warm_start_batchnorm`. Bundle config: ``{"_target_": "wsr_med.handlers.BatchNormWarmStart"}``."""

    hook = staticmethod(warm_start_batchnorm)


class ConstraintHandler(_OptimizerHook):
    """Project constrained weights after every optimizer step of a MONAI ``SupervisedTrainer``.

    Registers :func:`wsr_med.networks.attach_constraints` on ``engine.optimizer`` for
    ``engine.network``, so the projection follows each real update (a step that AMP skips
    is not projected either, as nothing changed).

    Bundle config::

        {"_target_": "wsr_med.handlers.ConstraintHandler"}
    """

    hook = staticmethod(attach_constraints)
