"""MONAI's MLFlowHandler made resumable, continuable, privacy-safe and tolerant of a tracking server that goes away."""

from __future__ import annotations

import copy
import json
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import torch
from monai.handlers import MLFlowHandler

from wsr_med import tracking
from wsr_med.files import atomic_write
from wsr_med.log_format import quiet_stop
from wsr_med.runs import RunFolder
from wsr_med.tracking import tolerant

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["MLflowTracker", "fold_in_monai_tracking"]

logger = logging.getLogger(__name__)


def _requirements() -> list[str]:
    """The model's pip requirements, given rather than inferred (inference takes seconds and reads the whole environment)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("wsr_med", "torch", "monai", "numpy")]


@contextmanager
def _exported_without_stack_traces() -> Iterator[None]:
    """``torch.export.save`` drops each graph node's ``stack_trace`` for a block.

    ``mlflow.pytorch.log_model(serialization_format="pt2")`` exports and saves the program in one call; the stack
    traces torch.export records quote the absolute path of every source file (the checkout's, the environment's, a
    user's home). The program runs the same without them. Scoped to the block, then torch's own function is back.
    """
    save = torch.export.save

    def save_without_stack_traces(program, f, *args, **kwargs):
        for module in program.graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    node.meta.pop("stack_trace", None)
        return save(program, f, *args, **kwargs)

    torch.export.save = save_without_stack_traces
    try:
        yield
    finally:
        torch.export.save = save


def fold_in_monai_tracking(engine: Engine) -> None:
    """Remove the events of MONAI's own MLFlowHandler (``monai.bundle run --tracking mlflow`` adds one to each engine).

    It would log to the same MLflow run again (every metric twice, ``lr_group_0``) or open a second run, and
    it logs the executed config, folder paths included. wsr_med's handlers already log each metric once per
    epoch and the run's config as a file (``run/config.json``, paths hashed). Called when an engine starts.
    """
    def owner(func):
        parent = getattr(func, "_parent", None)  # ignite wraps filtered handlers
        return getattr(parent() if parent is not None else func, "__self__", None)

    def monai_own(func) -> bool:
        other = owner(func)
        return isinstance(other, MLFlowHandler) and not isinstance(other, MLflowTracker)

    folded = False
    for handlers in engine._event_handlers.values():
        kept = [h for h in handlers if not monai_own(h[0])]
        if len(kept) < len(handlers):
            # in place: the engine is iterating this very list (STARTED), and must see what is attached to it now
            handlers[:] = kept
            folded = True
    if folded:
        logger.info("MONAI's MLflow tracking (--tracking mlflow) is folded into wsr_med's: one MLflow run, each metric "
                    "once per epoch, no folder paths; the executed config stays on this machine")


class MLflowTracker(MLFlowHandler):
    """Track a wsr_med run in MLflow.

    On top of :class:`monai.handlers.MLFlowHandler` (parameters, per-epoch metrics, learning rate):

    * the MLflow run id is kept in ``<output_dir>/mlflow_run_id``: a resumed or continued training, and
      later evaluations of the same ``output_dir``, log to the same run. A continuation (larger
      ``max_epochs``) logs the params the run did not have yet and records changed ones as tags
      ``continued.<name>`` (MLflow params cannot change);
    * at start: the resolved run configuration, the class map, the data split and the bad-file
      report, with paths and file names replaced by hashes (see :mod:`wsr_med.tracking`);
    * with ``log_model``, at the end: the best model via ``mlflow.pytorch.log_model`` with signature
      and input example, registered as ``registered_model_name``, and a picture of the learned
      Wise-SrNet spatial weights;
    * any MLflow failure after the start is a warning, not a crash.

    Args:
        tracking_uri: MLflow tracking URI.
        output_dir: the run folder (holds ``model.pt``, ``config.json``, ``classes.json``, ``datalist.json``).
        params: the run settings to log as params (paths are replaced by hashes).
        log_model: log and register the best model when the engine completes (put on the trainer).
        registered_model_name: Model Registry name; empty to log without registering.
        input_shape: ``(C, *spatial)`` of the network input, for the signature and example.
        parent_run_id: nest this run under another (a study's parent run); empty for none.
        kwargs: other :class:`monai.handlers.MLFlowHandler` arguments (``experiment_name``, ``run_name``,
            ``iteration_log``, ``epoch_log``, ``output_transform``, ``state_attributes``...).
    """

    def __init__(self, tracking_uri: str, output_dir: str | Path, params: dict | None = None, log_model: bool = False,
                 registered_model_name: str = "", input_shape: Sequence[int] = (1, 224, 224), parent_run_id: str = "",
                 **kwargs) -> None:
        # MONAI's handler opens the tracking store when it is built, and MONAI apps build a workflow to inspect
        # it: it is built (and the store opened) when the engine starts, in _open.
        self._monai_kwargs = {"tracking_uri": tracking_uri, "experiment_param": tracking.sanitised_params(params or {}),
                              **kwargs}
        self._opened = False
        self.tracking_uri = tracking_uri
        self.output_dir = Path(output_dir)
        self.policy = tracking.Tolerant(tracking_uri, keeps=str(output_dir))
        self.log_model = log_model
        self.registered_model_name = registered_model_name
        self.input_shape = tuple(input_shape)
        self.parent_run_id = parent_run_id

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.EPOCH_STARTED, self._read_lr)  # before the scheduler steps
        if self.log_model:
            engine.add_event_handler(Events.COMPLETED, self.log_best_model)
            engine.add_event_handler(Events.COMPLETED, self._training_ended)

    def _open(self, engine: Engine) -> None:
        """Build MONAI's handler and attach it (its ``start`` runs in this same STARTED event), once."""
        if self._opened:
            return
        self._opened = True
        super().__init__(**self._monai_kwargs)
        # The configured URI, not MONAI's preference for $MLFLOW_TRACKING_URI: the config already defaults to it.
        self.client = tracking.client(self.tracking_uri)
        fold_in_monai_tracking(engine)
        super().attach(engine)

    def _read_lr(self, engine: Engine) -> None:
        optimizer = getattr(engine, "optimizer", None)  # trainers only
        # the last group is the head (the backbone may run at finetune.backbone_lr_scale x learning_rate)
        self._epoch_lr = float(optimizer.param_groups[-1]["lr"]) if optimizer is not None else None

    def _default_epoch_log(self, engine: Engine) -> None:
        super()._default_epoch_log(engine)
        if getattr(self, "_epoch_lr", None) is not None:
            self._log_metrics({"learning_rate": self._epoch_lr}, step=self.global_epoch_transform(engine.state.epoch))

    @property
    def run_id_file(self) -> Path:
        return self.output_dir / RunFolder.MLFLOW_RUN_ID

    @tolerant
    def start(self, engine: Engine) -> None:
        new = not self.run_id_file.is_file()
        if self.cur_run is None:
            self._set_experiment()
            if new:
                # One output_dir, one run. MONAI's start() would instead attach to any unfinished run of the
                # same name in the experiment: two studies' cells (same names) merged into one run that way.
                run_name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
                self.cur_run = self.client.create_run(self.experiment.experiment_id, run_name=run_name)
            else:
                self.cur_run = self.client.get_run(self.run_id_file.read_text().strip())
                if self.experiment_param:
                    self._continue_params()
        if self.log_model:  # the trainer's tracker: a run killed by a signal is KILLED, one that crashes FAILED
            self._mark_killed_on_signals()
            tracking.run_opened(self.cur_run.info.run_id, self.tracking_uri)
        super().start(engine)
        if new:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_id_file, self.cur_run.info.run_id)
            if self.parent_run_id:
                self.client.set_tag(self.cur_run.info.run_id, "mlflow.parentRunId", self.parent_run_id)
            self._log_run_files()

    def _mark_killed_on_signals(self) -> None:
        """On SIGTERM / SIGINT: set the MLflow run's status to KILLED, then let the signal do what it did before."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_signals = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = self._previous_signals[sig] = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                quiet_stop()
                self.policy.call(self.client.set_terminated, self.cur_run.info.run_id, "KILLED")
                tracking.run_closed(self.cur_run.info.run_id)
                signal.signal(signum, previous)
                if callable(previous):
                    previous(signum, frame)  # SIGINT: KeyboardInterrupt
                else:
                    raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def _training_ended(self, engine: Engine | None = None) -> None:
        """The training completed (its run FINISHED by ``log_best_model``): signals as they were, nothing to fail."""
        for sig, previous in getattr(self, "_previous_signals", {}).items():
            signal.signal(sig, previous)
        self._previous_signals = {}
        if self.cur_run is not None:
            tracking.run_closed(self.cur_run.info.run_id)

    def _continue_params(self) -> None:
        """A run continued in the same MLflow run: log only params it lacks; changed ones become tags."""
        run_id = self.cur_run.info.run_id
        logged = self.cur_run.data.params
        for key, value in self.experiment_param.items():
            if key in logged and logged[key] != value:
                self.client.set_tag(run_id, f"continued.{key}", value)
                logger.info("continuing MLflow run %s with %s=%s (was %s)", run_id, key, value, logged[key])
        self.experiment_param = {k: v for k, v in self.experiment_param.items() if k not in logged}
        if self.cur_run.info.status != "FINISHED":
            logger.warning("MLflow run %s was left %s by an interrupted training; it continues now", run_id,
                           self.cur_run.info.status)
        if self.cur_run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _log_run_files(self) -> None:
        run_id = self.cur_run.info.run_id
        folder = RunFolder(self.output_dir)
        if (folder / RunFolder.CONFIG).is_file():
            self.client.log_dict(run_id, tracking.sanitised_config(folder / RunFolder.CONFIG), f"run/{RunFolder.CONFIG}")
        if (folder / RunFolder.CLASSES).is_file():
            self.client.log_artifact(run_id, str(folder / RunFolder.CLASSES), "run")
        if (folder / RunFolder.DATALIST).is_file():
            self.client.log_dict(run_id, tracking.sanitised_datalist(folder / RunFolder.DATALIST), f"run/{RunFolder.DATALIST}")
        if (folder / RunFolder.BAD_FILES).is_file():
            rows = tracking.sanitised_report(folder / RunFolder.BAD_FILES)
            self.client.log_dict(run_id, {"n_bad_files": len(rows), "files": rows}, "run/bad_files.json")

    iteration_completed = tolerant(MLFlowHandler.iteration_completed)
    epoch_completed = tolerant(MLFlowHandler.epoch_completed)
    complete = tolerant(MLFlowHandler.complete)

    @tolerant
    def close(self) -> None:
        run = self.cur_run
        MLFlowHandler.close(self)
        if run is not None:
            tracking.run_closed(run.info.run_id)

    @tolerant
    def log_best_model(self, engine: Engine) -> None:
        """Log ``model.pt`` (the best epoch) twice: the served model (:mod:`wsr_med.workflows.serving`: scan in,
        calibrated probabilities and decision out), registered; and the bare network (torch.export) as
        ``network`` for those who embed it. Plus the spatial-weight picture."""
        from wsr_med.workflows.serving import log_served_model

        weights = self.output_dir / RunFolder.MODEL
        if not weights.is_file():
            logger.warning("no %s to log: no validation epoch completed", weights)
            return
        model = copy.deepcopy(getattr(engine.network, "module", engine.network)).cpu().eval()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        selection = RunFolder(self.output_dir).best().get("selection")
        if selection:  # how the kept epoch was chosen: the findings that chose it, and those that did not
            self.client.set_tag(self.cur_run.info.run_id, "model_selection", selection["rule"][:5000])
        with tracking.tracking_uri_context(self.tracking_uri), mlflow.start_run(run_id=self.cur_run.info.run_id):
            with tempfile.TemporaryDirectory() as tmp:
                self._log_network(model, Path(tmp))
            info = log_served_model(self.output_dir, self.registered_model_name, _requirements())
        atomic_write(self.output_dir / RunFolder.MLFLOW_MODEL_URI, info.model_uri)
        if self.registered_model_name and info.registered_model_version is not None:
            self._describe_version(str(info.registered_model_version))
            atomic_write(self.output_dir / RunFolder.REGISTERED_MODEL,  # what a DICOM result names as its author
                         json.dumps({"name": self.registered_model_name, "version": str(info.registered_model_version)}))
        self._log_spatial_weights(model)
        logger.info("logged model %s%s", info.model_uri,
                    f", registered as '{self.registered_model_name}'" if self.registered_model_name else "")

    def _describe_version(self, version: str) -> None:
        """Tags and a description that tell this registered version from the others of its name at a glance:
        its best validation AUC and epoch, whether its validation predictions collapsed, its network."""
        run = RunFolder(self.output_dir)
        best, calibration = run.best(), run.calibration() or {}
        collapsed = calibration.get("collapsed") or ""
        metric = best.get("metric", "val_auc")
        tags = {f"best_{metric}": f"{best.get('value', float('nan')):.4f}", "best_epoch": str(best.get("epoch", "")),
                "collapsed": "yes" if collapsed else "no", "network": self.run_name or ""}
        if best.get("selection"):
            tags["selected_on"] = best["selection"]["selected_on"][:5000]
        for key, value in tags.items():
            self.client.set_model_version_tag(self.registered_model_name, version, key, value)
        what = "validation AUC" if metric == "val_auc" else "validation loss (negated)"
        self.client.update_model_version(
            self.registered_model_name, version,
            description=f"{tags['network']}: best {what} {tags[f'best_{metric}']} at epoch {tags['best_epoch']}"
                        + (f" ({tags['selected_on']})" if "selected_on" in tags else "")
                        + (f"; COLLAPSED: the model's {collapsed}" if collapsed else ""))

    def _log_network(self, model: torch.nn.Module, tmp: Path):
        """The bare network as ``network`` (torch.export program: loads without unpickling code), not registered."""
        from mlflow.models import infer_signature

        # batch of 2: torch.export would fix a batch of 1 into the saved program
        example = np.random.default_rng(0).random((2, *self.input_shape), dtype=np.float32)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        (tmp / RunFolder.CONFIG).write_text(json.dumps(tracking.sanitised_config(self.output_dir / RunFolder.CONFIG), indent=1))
        extra = [str(tmp / RunFolder.CONFIG), str(self.output_dir / RunFolder.CLASSES)]
        with _exported_without_stack_traces():
            return mlflow.pytorch.log_model(model, name="network", signature=infer_signature(example, output),
                                            input_example=example, extra_files=extra, pip_requirements=_requirements(),
                                            serialization_format="pt2", tags=tracking.MODEL_CONTEXT_TAGS)

    def _log_spatial_weights(self, model: torch.nn.Module) -> None:
        from wsr_med.metrics import plot_spatial_weights
        from wsr_med.networks import WiseCompression

        compression = getattr(getattr(model, "head", None), "compression", None)
        if not isinstance(compression, WiseCompression) or compression.depthwise.weight.dim() != 4:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_spatial_weights(compression.depthwise.weight.detach().numpy(), Path(tmp) / "spatial_weights.png")
            self.client.log_artifact(self.cur_run.info.run_id, str(path), "plots")
