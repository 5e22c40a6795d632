"""Save the training state every epoch and resume from it: kill a run, run the same command, it continues."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from wsr_med.workflows.runs import resume_checkpoint

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
    completed epoch. A finished run is refused rather than restarted (see
    :func:`wsr_med.workflows.resume_checkpoint`). Attach it first among the trainer's handlers, so
    that everything after it sees the restored state.

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
        self.resume_from = resume_checkpoint(self.save_dir, max_epochs)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        objects = {**self.objects, "trainer": engine}
        if self.resume_from is not None:
            logger.info("resuming from %s", self.resume_from)
            CheckpointLoader(self.resume_from, objects, map_location=self.map_location).attach(engine)
        self._saver = Checkpoint(
            objects,
            DiskSaver(str(self.save_dir), atomic=True, require_empty=False),
            n_saved=1,
            filename_pattern="checkpoint_epoch={global_step}.{ext}",
            global_step_transform=lambda e, _: e.state.epoch,
        )
        # Registered at start, hence after the handlers attached later: the save is the epoch's last act.
        engine.add_event_handler(Events.STARTED, self._attach_saver)

    def _attach_saver(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self._saver is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._saver)
            self._saver = None
