"""Save the training state every epoch and resume from it: kill a run, run the same command, it continues."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from wsr_med.files import atomic_write
from wsr_med.runs import latest_checkpoint, refuse_finished

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingCheckpoint"]

logger = logging.getLogger(__name__)


class TrainingCheckpoint:
    """Save and resume a trainer's whole state: ignite ``Checkpoint`` to save, MONAI ``CheckpointLoader`` to load.

    Every epoch ``<save_dir>/checkpoint_epoch=N.pt`` is written atomically (ignite ``DiskSaver``
    with ``atomic=True``: a temporary file, then a rename; MONAI's ``CheckpointSaver`` writes in
    place, so a kill during the save would leave a truncated file) with ``objects`` and the
    trainer; the previous one is removed after. The save comes after every other end-of-epoch handler
    (validation, learning-rate step, MLflow), so a checkpointed epoch is a fully recorded one. The
    last checkpoint, if any, is loaded when the trainer starts, so the run continues after the last
    completed epoch. A finished run is refused rather than restarted. Attach it first among the
    trainer's handlers, so that everything after it sees the restored state.

    Continuing with a larger ``max_epochs``: the trainer runs to the new count, and a cosine schedule
    (``CosineAnnealingLR``) is rebuilt for the new length: from the next epoch on, the learning rate is
    what a run started with the new ``max_epochs`` would have there, falling to its minimum at the new
    last epoch (the old schedule, restored as saved, would climb again after its end).

    Args:
        save_dir: checkpoint folder.
        objects: ``{"model": network, "optimizer": ..., "lr_scheduler": ...}``.
        max_epochs: the run's ``max_epochs``.
        map_location: device for loading.

    Under torchrun every rank must attach it (ignite's saver synchronises the ranks and writes on rank 0 only).
    """

    def __init__(self, save_dir: str | Path, objects: dict, max_epochs: int,
                 map_location: torch.device | str | None = None) -> None:
        self.save_dir = Path(save_dir)
        self.objects = dict(objects)
        self.max_epochs = int(max_epochs)
        self.resume_from, self.epochs_done = latest_checkpoint(self.save_dir)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        objects = {**self.objects, "trainer": engine}
        # refused when training starts, not when the trainer is built (MONAI apps build it to inspect a bundle)
        engine.add_event_handler(Events.STARTED, self._refuse_finished)
        if self.resume_from is not None and self.epochs_done < self.max_epochs:
            logger.info("resuming from %s", self.resume_from)
            CheckpointLoader(str(self.resume_from), objects, map_location=self.map_location).attach(engine)
            engine.add_event_handler(Events.STARTED, self._fit_schedule)  # after the loader: it sees the restored state
        self._objects = objects
        # Built when the first epoch starts (the saver makes its folder; MONAI apps build the trainer to inspect it),
        # after every handler, those attached at STARTED (the MLflow tracker) too: the save is the epoch's last act.
        engine.add_event_handler(Events.EPOCH_STARTED, self._attach_saver)

    def _attach_saver(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self._objects is None:
            return
        saver = Checkpoint(
            self._objects,
            _WholeFileSaver(str(self.save_dir), atomic=True, require_empty=False),
            n_saved=1,
            filename_pattern="checkpoint_epoch={global_step}.{ext}",
            global_step_transform=lambda e, _: e.state.epoch,
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED, saver)
        self._objects = None

    def _refuse_finished(self, engine: Engine) -> None:
        refuse_finished(self.save_dir, self.max_epochs)

    def _fit_schedule(self, engine: Engine) -> None:
        """Give a restored cosine schedule the run's (new) length, continuing from the epochs done."""
        scheduler = self.objects.get("lr_scheduler")
        if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == self.max_epochs:
            return
        logger.info("learning-rate schedule rebuilt for max_epochs=%d (was %d)", self.max_epochs, scheduler.T_max)
        scheduler.T_max = self.max_epochs
        done = scheduler.last_epoch
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * done / self.max_epochs)) / 2
        # PyTorch's recursive cosine step continues from these values exactly as the closed form would
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class _WholeFileSaver(DiskSaver):
    """ignite's ``DiskSaver`` writing through :func:`wsr_med.files.atomic_write`: the checkpoint is serialised in
    memory first, so that a full disk is the ``OSError`` it is (``torch.save`` into a file reports it as "unexpected
    pos"), naming the file, and no temporary file is left behind."""

    def _save_func(self, checkpoint, path, func) -> None:
        buffer = io.BytesIO()
        func(checkpoint, buffer, **self.kwargs)
        atomic_write(path, buffer.getvalue())
