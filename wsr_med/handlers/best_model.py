"""Keep the weights of the best validation epoch, safely across interruptions."""

from __future__ import annotations

import json
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wsr_med.files import atomic_write
from wsr_med.runs import RunFolder

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["BestModelSaver", "atomic_save"]

logger = logging.getLogger(__name__)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`wsr_med.files.atomic_write`: a crash or a full disk never leaves a half-written
    file. Serialised in memory first: ``torch.save`` into a file reports a full disk as "unexpected pos"."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


class BestModelSaver:
    """On an evaluator: save the network's weights to ``<save_dir>/model.pt`` whenever ``metric`` improves.

    The best value so far lives in ``best.json`` beside it, so a resumed run keeps comparing with
    the best epoch before the interruption instead of overwriting it with a worse one.

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        save_dir: the run's folder.
        metric: the evaluator metric to maximise (e.g. ``val_auc``).
        selection: how that metric was chosen (:meth:`wsr_med.workflows.ModelSelection.to_dict`), kept in ``best.json``.
    """

    def __init__(self, network: torch.nn.Module, save_dir: str | Path, metric: str = "val_auc",
                 selection: dict | None = None) -> None:
        self.network = network
        self.save_dir = Path(save_dir)
        self.metric = metric
        self.selection = selection
        self.best_file = self.save_dir / RunFolder.BEST
        self.best = json.loads(self.best_file.read_text()) if self.best_file.is_file() else None  # NaN is read as NaN

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric])
        best = None if self.best is None else self.best["value"]
        # an undefined metric (NaN: e.g. one class in a tiny validation set) keeps a first model, never replaces one
        if best is not None and not (value == value and (best != best or value > best)):
            return
        if value != value:
            logger.warning("epoch %d: %s is undefined (NaN); model.pt keeps this epoch until one is measured",
                           engine.state.epoch, self.metric)
        network = getattr(self.network, "module", self.network)
        state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            logger.warning("epoch %d: the weights hold NaN or infinity; model.pt not updated", engine.state.epoch)
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.save_dir / RunFolder.MODEL)
        self.best = {"metric": self.metric, "value": value, "epoch": int(engine.state.epoch),
                     **({"selection": self.selection} if self.selection else {})}
        atomic_write(self.best_file, json.dumps(self.best))
        logger.info("epoch %d: best %s %.4f, saved %s", self.best["epoch"], self.metric, value, self.save_dir / RunFolder.MODEL)
