"""What evaluator handlers build on: the probabilities, labels and file names of every case an evaluator sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from wsr_med.handlers.mlflow_tracker import fold_in_monai_tracking

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["Collector"]


class Collector:
    """Gathers probabilities (and labels, paths) of every case an evaluator sees; under torchrun, of every rank's
    cases (each rank validates its share), and only rank 0 then acts on them (:meth:`finish`)."""

    keep_thumbnails = False

    def __init__(self) -> None:
        self._reset()

    def _reset(self, engine: Engine | None = None) -> None:
        self.probs: list[np.ndarray] = []
        self.labels: list[int] = []  # the class index of each case (single-label tasks)
        self.targets: list[np.ndarray] = []  # each case's label vector: one-hot, or per finding 1/0/NaN (multi-label)
        self.paths: list[str] = []
        self.unlike_training: list[str] = []  # why each case looks unlike the training data ("" if it does not)
        self.thumbnails: list[np.ndarray | None] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        if not engine.has_event_handler(fold_in_monai_tracking, Events.STARTED):
            engine.add_event_handler(Events.STARTED, fold_in_monai_tracking)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _complete(self, engine: Engine) -> None:
        """Every rank sends its cases to every other (a collective: every rank must attach the collector); rank 0
        finishes on all of them."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mine = (self.probs, self.labels, self.targets, self.paths, self.unlike_training, self.thumbnails)
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            self._reset()
            for probs, labels, targets, paths, unlike, thumbnails in everyone:
                self.probs += probs
                self.labels += labels
                self.targets += targets
                self.paths += paths
                self.unlike_training += unlike
                self.thumbnails += thumbnails
            if dist.get_rank() != 0:
                return
        self.finish(engine)

    def _collect(self, engine: Engine) -> None:
        # MONAI evaluators decollate: the batch and the output are lists with one dict per case.
        for out, item in zip(engine.state.output, engine.state.batch):
            self._add(out, item)

    def _add(self, out: dict, item: dict) -> None:
        self.probs.append(torch.as_tensor(out["pred"]).float().cpu().numpy())
        label = out.get("label")
        if label is not None:
            label = torch.as_tensor(label)
            self.targets.append(label.float().cpu().numpy().reshape(-1))
            self.labels.append(int(label.argmax()) if label.numel() > 1 else int(label))
        self.paths.append(str(item.get("relative_path", item.get("image", ""))))
        self.unlike_training.append(str(item.get("unlike_training", "")))
        if self.keep_thumbnails:
            self.thumbnails.append(_thumbnail(item.get("image")))

    def finish(self, engine: Engine) -> None:
        raise NotImplementedError


def _thumbnail(image, size: int = 64) -> np.ndarray | None:
    """A small uint8 picture of a preprocessed 2D input ``(C, H, W)`` in [0, 1] (first channel), or None."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        return None
    small = torch.nn.functional.adaptive_avg_pool2d(image[:1].float().cpu()[None], size)[0, 0]
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
