"""The run folder: a trained run *is* its folder, and everything after training reads it.

Its layout is the table in the bundle docs (``docs/README.md``, "Outputs in output_dir"); each file name is a
:class:`RunFolder` attribute and nothing else spells it (``tests/test_settings.py`` checks the table against them).

Evaluate and predict build the network and the preprocessing from ``config.json``
(:meth:`RunFolder.trained_settings`), and refuse a setting that contradicts it
(:meth:`RunFolder.check_trained`). Training takes the folder's lock, refuses a finished run and a
contradictory continuation *before* writing anything (:meth:`RunFolder.begin_training`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import zipfile
from pathlib import Path

from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write
from wsr_med.settings import CLASS_BALANCE, CONTINUABLE_SETTINGS, MACHINE_SETTINGS, PATH_SETTINGS, TRAINED_SETTINGS, default

__all__ = ["RunFolder", "check_settings", "check_writable", "latest_checkpoint", "path_id", "refuse_finished",
           "settings_without_paths"]

logger = logging.getLogger(__name__)

# Network settings that runs of earlier versions did not record, with the values those runs used.
_UNRECORDED = {"head_kwargs": {}, "bn_momentum": None, "intensity_percentiles": default("intensity_percentiles")}
MULTILABEL, MULTICLASS = "multilabel", "multiclass"  # config.json's "task"
_EPOCH = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def _normal(value):
    """A value as it reads back from JSON (tuples are lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def _resolved(key: str, value):
    if key in PATH_SETTINGS and value not in (None, "", "synthetic"):
        return str(Path(str(value)).expanduser().resolve())
    return _normal(value)


def path_id(value: str | Path | None) -> str:
    """A short stable id for a path (12 hex digits, keyed like patient pseudonyms: :func:`wsr_med.data.scan.hash_id`):
    what may stand for it in MLflow and reports. Without the installation's key, a guessed path (a home folder, a
    hospital share) cannot be checked against it. ``none`` for no path, ``synthetic`` for the generated data set."""
    from wsr_med.data.scan import hash_id

    if value in (None, ""):
        return "none"
    if str(value) == "synthetic":
        return "synthetic"
    return hash_id(f"path:{Path(str(value)).expanduser().resolve()}")[:12]


def settings_without_paths(settings: dict) -> dict:
    """``settings`` with every path setting replaced by its :func:`path_id`, other values as they are: what may
    travel with a model (a served model, an exported bundle) without naming a folder."""
    return {k: (path_id(v) if k in PATH_SETTINGS and v not in (None, "") else v) for k, v in settings.items()}


def check_settings(settings: dict) -> None:
    """Refuse, before any data is read, a setting that names nothing known (a backbone, a head, a balance mode)."""
    from wsr_med.networks import BACKBONES, HEADS, ImageTooSmall, feature_size

    choices = {"backbone": list(BACKBONES), "head": list(HEADS), "class_balance": list(CLASS_BALANCE)}
    for key, allowed in choices.items():
        if key in settings and settings[key] not in allowed:
            raise WsrMedError(f"{key}={settings[key]!r} is not one of: {', '.join(allowed)}")
    if "backbone" in settings and "image_size" in settings:  # the size the backbone takes, before any data is read
        dims = settings.get("spatial_dims", default("spatial_dims"))
        network = (settings["backbone"], dims, settings.get("in_channels", default("in_channels")),
                   [settings["image_size"]] * dims if isinstance(settings["image_size"], int) else list(settings["image_size"]),
                   settings.get("backbone_kwargs"))
        if feature_size(*network) is None:
            raise ImageTooSmall(*network)


def check_writable(*folders: str | Path | None) -> None:
    """Refuse, before any expensive step, an output location that is not a writable folder (``None``/empty: skipped)."""
    import tempfile

    for folder in folders:
        if folder in (None, ""):
            continue
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise WsrMedError(f"{path} is not a folder (it is where outputs go); remove it or choose another location")
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise WsrMedError(f"cannot write to {path} ({e.strerror or type(e).__name__}); choose a writable location") from None


def refuse_finished(ckpt_dir: str | Path, max_epochs: int) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its epoch (see :func:`latest_checkpoint`); a run that already reached
    ``max_epochs`` is refused, so running it again never starts over and overwrites its results."""
    checkpoint, epoch = latest_checkpoint(ckpt_dir)
    if epoch >= int(max_epochs):
        raise WsrMedError(f"{Path(ckpt_dir).parent} holds a finished run ({epoch} of max_epochs={max_epochs}); "
                          "use another output_dir, or raise max_epochs to continue training it.")
    return checkpoint, epoch


def latest_checkpoint(ckpt_dir: str | Path) -> tuple[Path | None, int]:
    """The last complete ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` and its epoch N, or ``(None, 0)``.

    A truncated file (a save cut short: ``torch.save`` writes a zip, a truncated one is not) is ignored.
    """
    found = []
    for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt"):
        match = _EPOCH.search(p.name)
        if not match:
            continue
        if zipfile.is_zipfile(p):
            found.append((int(match.group(1)), p))
        else:
            logger.warning("ignoring incomplete checkpoint %s", p)
    if not found:
        return None, 0
    epoch, path = max(found)
    return path, epoch


class RunFolder:
    """One training run's folder; see the module docstring for its layout.

    Args:
        path: the run's ``output_dir``.
    """

    MODEL = "model.pt"
    BEST = "best.json"
    CLASSES = "classes.json"
    CONFIG = "config.json"
    DATALIST = "datalist.json"
    BAD_FILES = "bad_files.csv"
    CHECKPOINTS = "checkpoints"
    EVAL = "eval"
    PREDICTIONS = "predictions.csv"
    PACS_PREDICTIONS = "pacs_predictions.csv"  # predict from or to a PACS: its own file, a folder's predictions kept
    CACHE = "cache"
    MLFLOW_RUN_ID = "mlflow_run_id"
    MLFLOW_MODEL_URI = "mlflow_model_uri"
    REGISTERED_MODEL = "registered_model.json"
    PROFILE = "profile.json"
    CALIBRATION = "calibration.json"
    LOCK = ".lock"
    # in an evaluation folder (eval/, or another eval_dir)
    METRICS = "metrics.json"
    CASES = "cases.csv"
    REPORT = "report.html"
    EVAL_PREFIX = "eval_"  # datalist and bad-file report of an evaluation, beside its other files
    SUPERSEDED = ".superseded-"  # eval/ of the model before a continuation: eval.superseded-1/, ...

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = None

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def model(self) -> Path:
        return self.path / self.MODEL

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def pacs_predictions(self) -> Path:
        return self.path / self.PACS_PREDICTIONS

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run this folder logs to, or None before its first tracked epoch."""
        path = self.path / self.MLFLOW_RUN_ID
        return path.read_text().strip() if path.is_file() else None

    def registered_model(self) -> dict | None:
        """``{"name": ..., "version": ...}`` of the Model Registry version of this folder's model, or None."""
        path = self.path / self.REGISTERED_MODEL
        return json.loads(path.read_text()) if path.is_file() else None

    # --- what was trained -------------------------------------------------------------------------------
    def _require(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise WsrMedError(f"{path} not found: is {self.path} the output folder of a training run? "
                              "Pass the --output-dir you trained with.")
        return path

    def classes(self) -> list[str]:
        """The class names in the model's output order."""
        return json.loads(self._require(self.CLASSES).read_text())

    def task(self) -> str:
        """``multiclass`` (one class per scan, a softmax) or ``multilabel`` (several findings, one sigmoid each); runs from
        before multi-label models, and folders without ``config.json``, are multi-class."""
        path = self.path / self.CONFIG
        return json.loads(path.read_text()).get("task", MULTICLASS) if path.is_file() else MULTICLASS

    def multilabel(self) -> bool:
        return self.task() == MULTILABEL

    def settings(self) -> dict:
        """Every setting of the run as resolved when it was (last) trained."""
        return json.loads(self._require(self.CONFIG).read_text())["settings"]

    def trained_settings(self) -> dict:
        """The network and preprocessing settings the model was trained with (:data:`TRAINED_SETTINGS`)."""
        self._require(self.MODEL)
        settings = {**_UNRECORDED, **self.settings()}
        return {k: settings[k] for k in TRAINED_SETTINGS if k in settings}

    def check_trained(self, requested: dict) -> None:
        """Refuse network/preprocessing settings that contradict the trained model, naming both values; warn when
        the run is still training (its ``model.pt`` is the best epoch so far, and may change)."""
        if self.is_training():
            logger.warning("%s is still training (another process holds it): model.pt is its best epoch so far and "
                           "will change; evaluate or predict again when the training has finished", self.path)
        trained = self.trained_settings()
        wrong = [f"{k}={_normal(requested[k])!r} (trained: {trained[k]!r})"
                 for k in TRAINED_SETTINGS if k in requested and k in trained and _normal(requested[k]) != trained[k]]
        if wrong:
            raise WsrMedError(f"the model in {self.path} was trained with other settings: {', '.join(wrong)}. "
                              "Leave these settings out: evaluation and prediction use the trained ones.")

    def calibration(self) -> dict | None:
        """``calibration.json`` (temperature and operating point fitted on the validation split at the best epoch,
        see :class:`wsr_med.handlers.CalibrationFitter`), or None: none fitted, or fitted for other weights."""
        path = self.path / self.CALIBRATION
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        best = self.best()
        if doc.get("epoch") != best.get("epoch"):
            logger.warning("%s belongs to epoch %s, model.pt to epoch %s: not used", path, doc.get("epoch"), best.get("epoch"))
            return None
        return doc

    def best(self) -> dict:
        """``best.json`` (metric, value and epoch of ``model.pt``), ``{}`` before the first validation."""
        path = self.path / self.BEST
        return json.loads(path.read_text()) if path.is_file() else {}

    def evaluation(self, eval_dir: str | Path | None = None) -> dict | None:
        """The ``metrics.json`` of an evaluation (default: the run's ``eval/``), or None when there is none."""
        path = Path(eval_dir or self.eval_dir) / self.METRICS
        return json.loads(path.read_text()) if path.is_file() else None

    def training_profile(self) -> dict | None:
        """The training set's profile (:func:`wsr_med.data.profile.training_profile`), None for runs without one."""
        path = self.path / self.PROFILE
        return json.loads(path.read_text()) if path.is_file() else None

    # --- training -----------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock for this process (released at exit or by :meth:`release`); refuse if held."""
        from filelock import FileLock, Timeout

        if self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / self.LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise WsrMedError(f"{self.path} is in use by another training process; wait for it to finish, "
                              "or use another output_dir.") from None
        self._lock = lock

    def is_training(self) -> bool:
        """Whether another process holds this folder's training lock."""
        from filelock import FileLock, Timeout

        if self._lock is not None or not (self.path / self.LOCK).exists():
            return False
        probe = FileLock(str(self.path / self.LOCK), timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return True
        probe.release()
        return False

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def continuation_settings(self) -> dict:
        """What resuming or continuing this run reuses: every setting but the machine's (:data:`MACHINE_SETTINGS`)."""
        return {k: v for k, v in self.settings().items() if k not in MACHINE_SETTINGS}

    def begin_training(self, settings: dict) -> Path | None:
        """Lock the folder and check that ``settings`` may train in it; returns the checkpoint to resume, if any.

        Nothing is written before these checks pass: a refused command leaves the run as it was.

        Raises:
            WsrMedError: the folder or the cache is not writable; another process trains here; the run is finished (``max_epochs`` reached); or a
                continuation changes a setting other than :data:`CONTINUABLE_SETTINGS`.
        """
        check_settings(settings)
        check_writable(self.path, settings.get("cache_dir"))
        self.lock()
        checkpoint, _ = refuse_finished(self.checkpoints, settings["max_epochs"])
        if (self.path / self.CONFIG).is_file():
            saved = self.settings()
            changed = [f"{k}={_resolved(k, settings[k])!r} (run: {saved[k]!r})" for k in settings
                       if k in saved and k not in CONTINUABLE_SETTINGS and _resolved(k, settings[k]) != saved[k]]
            if changed:
                raise WsrMedError(f"{self.path} holds a run trained with other settings: {', '.join(changed)}. "
                                  "Continue it with its own settings (only max_epochs, the machine's settings and names may change), "
                                  "or use another output_dir.")
        return checkpoint

    def _retire_evaluation(self) -> None:
        """Move ``eval/`` aside when training continues: it evaluated a model that this training may replace."""
        if not self.eval_dir.is_dir():
            return
        n = 1
        while (self.path / f"{self.EVAL}{self.SUPERSEDED}{n}").exists():
            n += 1
        target = self.path / f"{self.EVAL}{self.SUPERSEDED}{n}"
        self.eval_dir.rename(target)
        logger.warning("%s evaluated the model before this continuation: moved to %s; evaluate again when it ends",
                       self.eval_dir, target)

    def save_run_info(self, classes: list[str], settings: dict, config_files: list[str] | None = None,
                      multilabel: bool = False, selection: dict | None = None) -> Path:
        """Write ``classes.json`` and ``config.json`` (settings with paths resolved, the config files as run, the task:
        ``multilabel`` when ``classes`` are findings, several per scan; multi-label, ``model_selection``: the findings
        that choose the best epoch, :meth:`wsr_med.workflows.ModelSelection.to_dict`).

        A continued run keeps its class map (a different one is refused) and records the continuation
        (date, new ``max_epochs``) in ``config.json``.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        classes = list(classes)
        resolved = {k: _resolved(k, v) for k, v in settings.items()}
        doc = {"settings": resolved, "task": MULTILABEL if multilabel else MULTICLASS,
               "config_files": {str(f): json.loads(Path(f).read_text()) for f in config_files or [] if Path(f).is_file()},
               "continued": [], **({"model_selection": selection} if selection else {})}
        config = self.path / self.CONFIG
        if config.is_file():
            if self.classes() != classes:
                raise WsrMedError(f"{self.path} was trained for classes {self.classes()}, the data now has {classes}; "
                                  "use another output_dir for another dataset.")
            previous = json.loads(config.read_text())
            doc["continued"] = previous.get("continued", [])
            if previous["settings"].get("max_epochs") != resolved.get("max_epochs"):  # a resume is not a continuation
                doc["continued"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "max_epochs": resolved.get("max_epochs")})
                self._retire_evaluation()
        else:
            atomic_write(self.path / self.CLASSES, json.dumps(classes))
        import torch

        doc["torch"] = torch.__version__
        atomic_write(config, json.dumps(doc, indent=1, default=str))
        return config
