"""MLflow for wsr_med: the one place that creates clients, checks the store, applies the error policy and
decides what may leave the machine.

Error policy: a store that cannot be reached *before* training is an error (:func:`check_reachable`);
a store that fails *during* a run is a warning, once, and that run stops sending (:class:`Tolerant`),
because hours of training must not be lost to a tracking server. Every MLflow call of the package runs
with short HTTP retries (:func:`http_limits`), scoped to that call, so a lost server costs seconds, not
minutes, and the process environment is left as it was.

Privacy: MLflow receives no file or folder path (exports name folders after patients) and no patient
identifier: :func:`sanitised_params` and :func:`sanitised_config` replace paths by keyed hashes of the path
(:func:`path_id`), :func:`sanitised_datalist` keeps items by their content hash and hashed patient, and
:func:`sanitised_report` hashes file names (keyed) and blanks path-like text in reasons. Logged models carry
:data:`MODEL_CONTEXT_TAGS` instead of the user and the script's path.
"""

from __future__ import annotations

import atexit
import csv
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsr_med.data.scan import hash_id
from wsr_med.errors import WsrMedError
from wsr_med.runs import path_id
from wsr_med.settings import PATH_SETTINGS

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "Tolerant",
    "check_reachable",
    "client",
    "default_tracking_uri",
    "enabled",
    "fail_open_runs",
    "http_limits",
    "MODEL_CONTEXT_TAGS",
    "metric_name",
    "model_name",
    "path_id",
    "sanitised_config",
    "sanitised_datalist",
    "sanitised_params",
    "sanitised_report",
    "sqlite_uri",
    "tolerant",
    "tracking_uri_context",
]

logger = logging.getLogger(__name__)

# MLflow tags every logged model with where it was logged from: the user, the main script's path, the git remote
# and branch. A model travels (registry, export, serving): these values, the same keys, say nothing instead.
MODEL_CONTEXT_TAGS = {"mlflow.user": "", "mlflow.source.name": "wsr_med", "mlflow.source.git.repoURL": "",
                      "mlflow.source.git.branch": ""}
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def sqlite_uri(path: str | Path) -> str:
    """``sqlite:///<absolute path>``: MLflow's local tracking store, no server needed."""
    return f"sqlite:///{Path(path).resolve()}"


def enabled(tracking_uri: str | None) -> bool:
    """Whether ``tracking_uri`` asks for tracking: ``none`` (or empty) turns MLflow off for a run."""
    return bool(tracking_uri) and str(tracking_uri).lower() != "none"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri("mlflow.db")


@contextmanager
def http_limits() -> Iterator[None]:
    """MLflow's HTTP retries and timeout kept short for a block (unless the user set them), then put back."""
    saved = {k: os.environ.get(k) for k in _HTTP_LIMITS}
    for key, value in _HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def client(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` for ``tracking_uri`` (the configured one, never a global default)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


class TrackingStoreUnreachable(WsrMedError, ConnectionError):
    """The MLflow tracking store did not answer before the run started."""


@contextmanager
def _store_creation_lock(tracking_uri: str) -> Iterator[None]:
    """For a local SQLite store: one process at a time creates and migrates it (two trainings starting together
    in one folder raced on the tables, and the loser was told the store "cannot be reached")."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import tempfile

    from filelock import FileLock

    database = Path(tracking_uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"wsr_med-mlflow-{name}.lock"), timeout=300):
        yield


def check_reachable(tracking_uri: str) -> str:
    """Fail at once, before any training, if the MLflow tracking store cannot be reached (nothing to check when off)."""
    if not enabled(tracking_uri):
        return tracking_uri
    try:
        with _store_creation_lock(tracking_uri), http_limits():
            client(tracking_uri).search_experiments(max_results=1)
    except Exception as e:
        raise TrackingStoreUnreachable(
            f"MLflow tracking store {tracking_uri} cannot be reached ({type(e).__name__}: {str(e)[:200]}); "
            "start the server or pass another tracking_uri (the default is a local SQLite file). Nothing was trained."
        ) from None
    return tracking_uri


@contextmanager
def tracking_uri_context(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for a block (for the fluent API), then put back.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI``, which would otherwise redirect every
    later run of the same process (a study, a test session).
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        with http_limits():
            yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets the variable again


class Tolerant:
    """The run-time error policy: wrap MLflow calls of one tracked run; the first failure is a warning
    naming what stays local, and later calls are skipped.

    Args:
        tracking_uri: the store, for the message.
        keeps: what the user still has when tracking stops (e.g. the run folder).
    """

    def __init__(self, tracking_uri: str, keeps: str) -> None:
        self.tracking_uri = tracking_uri
        self.keeps = keeps
        self.disabled = False

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        if self.disabled:
            return None
        try:
            with http_limits():
                return fn(*args, **kwargs)
        except Exception as e:
            self.disabled = True
            logger.warning("MLflow tracking at %s failed (%s: %s); the run goes on, its results stay in %s, "
                           "and nothing more is sent to MLflow in this run.", self.tracking_uri, type(e).__name__,
                           str(e)[:200], self.keeps)
            return None


# Runs this process is training, until they end (run id -> tracking URI); a workflow that fails marks them FAILED.
_OPEN_RUNS: dict[str, str] = {}


def run_opened(run_id: str, tracking_uri: str) -> None:
    if not _OPEN_RUNS:  # also for `python -m monai.bundle run`, whose failure ends the process
        atexit.unregister(fail_open_runs)
        atexit.register(fail_open_runs)
    _OPEN_RUNS[run_id] = tracking_uri


def run_closed(run_id: str) -> None:
    _OPEN_RUNS.pop(run_id, None)


def fail_open_runs() -> None:
    """Mark FAILED every run this process opened and did not end (a workflow raised: a full disk, a crash), so that
    no run is left RUNNING; a store that cannot be reached any more is left as it is."""
    while _OPEN_RUNS:
        run_id, uri = _OPEN_RUNS.popitem()
        try:
            with http_limits():
                client(uri).set_terminated(run_id, "FAILED")
        except Exception as e:
            logger.warning("MLflow run %s could not be marked FAILED (%s)", run_id, type(e).__name__)


def tolerant(method: Callable) -> Callable:
    """Decorate a method of an object whose ``policy`` attribute is a :class:`Tolerant`."""

    @functools.wraps(method)
    def wrapper(obj, *args, **kwargs):
        return obj.policy.call(method, obj, *args, **kwargs)

    return wrapper


def sanitised_params(settings: dict) -> dict[str, str]:
    """Run settings as MLflow params: paths become ``<key>_id`` hashes, values are strings (MLflow's 6000-char limit)."""
    out = {}
    for key, value in settings.items():
        if key in PATH_SETTINGS:
            out[f"{key}_id"] = path_id(value)
        else:
            out[key] = (json.dumps(value) if isinstance(value, (dict, list)) else str(value))[:6000]
    return out


def sanitised_config(path: Path) -> dict:
    """``config.json`` without paths: path settings hashed, config files named by their file name only."""
    doc = json.loads(Path(path).read_text())
    doc["settings"] = sanitised_params(doc.get("settings", {}))
    doc["config_files"] = {Path(k).name: v for k, v in doc.get("config_files", {}).items()}
    return doc


def sanitised_datalist(path: Path) -> dict:
    """The datalist with each image path dropped (items keep their content hash, label and hashed patient):
    the split stays reproducible (files are found again by content) while names, which often carry patient
    ids, stay local."""
    doc = json.loads(Path(path).read_text())
    doc.pop("base_dir", None)
    settings = doc.get("settings", {})
    for key in PATH_SETTINGS:
        if key in settings:
            settings[key] = path_id(settings[key])
    for key in ("training", "validation", "test"):
        doc[key] = [{k: v for k, v in item.items() if k != "image"} for item in doc.get(key, [])]
    return doc


_PATH_LIKE = re.compile(r"(?:[A-Za-z]:)?[\\/](?:[^\s'\"\\/]+[\\/])+[^\s'\"]*")


def sanitised_report(path: Path) -> list[dict]:
    """The bad-file report with file names replaced by a hash and anything path-like in the reasons by ``<path>``
    (the local CSV keeps both)."""
    with open(path, newline="", encoding="utf-8", errors="backslashreplace") as f:
        return [{"file_hash": hash_id(f"file:{r['file']}"),
                 "reason": _PATH_LIKE.sub("<path>", r["reason"])} for r in csv.DictReader(f)]


def model_name(experiment: str, classes: list[str]) -> str:
    """The default Model Registry name of a run: its experiment and its classes, so that unrelated models
    (another task, another experiment) do not become versions of one registered model."""
    return metric_name(f"{experiment}-{'-'.join(classes)}")[:200]


def metric_name(text: str) -> str:
    """``text`` made a valid MLflow metric/param key (class names come from folder names)."""
    return re.sub(r"[^0-9A-Za-z_.\-/ ]", "_", text)[:250]
