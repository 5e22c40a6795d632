"""The served model: an MLflow ``pyfunc`` that takes a scan's bytes (or, where the server allows it, a path under
its roots) and answers calibrated class probabilities, the decision at the run's operating point, and an error for
a bad row.

Registered with every trained run (:class:`wsr_med.handlers.MLflowTracker`); ``wsr-med serve -m models:/<name>/<v>``
(:func:`serve`) or ``mlflow models serve ... --env-manager local`` answers ``/invocations`` with
``{"dataframe_records": [{"bytes": "<base64 of a DICOM/PNG/JPEG/TIFF>"}, ...]}`` (and MLflow's other shapes:
``dataframe_split``, ``inputs``, ``instances``). The network and preprocessing are what the bundle's
``inference.json`` builds on the run folder (as for ``wsr-med predict``), the decision the run's
(:meth:`wsr_med.metrics.Decision.of_run`).

Threat model (docs/data.md, "The served model"): whoever reaches the port may send anything.

* Bytes are decoded in memory; nothing a client sends is written to disk.
* Paths are off unless the server names roots (:data:`PATH_ROOTS_ENV`, ``wsr-med serve --path-root``); a path is
  resolved (symlinks, ``..``) and must lie inside a root, and a path outside the roots, missing, or unreadable
  gets one and the same answer, so that the answers tell nothing about the server's files.
* Bounds (:class:`ServeLimits`): rows per request, bytes per request (over all rows), a deadline after which the
  remaining rows answer ``timeout``; ``wsr-med serve`` also refuses an oversized body before it is parsed. One
  scan is decoded at a time per server process, and ``wsr-med serve`` reads request bodies within one byte budget
  (``serving_app.RequestGuard``), so concurrent requests do not multiply the peak memory.
* One answer row per input row, errors in wsr_med's own words (never a header value or a path), ``null`` for a
  probability that was not computed: strict JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from wsr_med.data.readers import ScanReadError
from wsr_med.metrics import Decision
from wsr_med.runs import RunFolder, settings_without_paths

__all__ = ["PATH_ROOTS_ENV", "ScanClassifier", "ServeLimits", "log_served_model", "serve", "served_model_signature"]

logger = logging.getLogger(__name__)

PATH_ROOTS_ENV = "WSR_MED_SERVE_PATH_ROOTS"  # folders whose scans clients may name by path (os.pathsep-separated)
MAX_ROWS_ENV = "WSR_MED_SERVE_MAX_ROWS"
MAX_REQUEST_MIB_ENV = "WSR_MED_SERVE_MAX_REQUEST_MIB"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's own request timeout (seconds)
BODY_LIMIT_ENV = "WSR_MED_SERVE_MAX_BODY_BYTES"  # read by serving_app.RequestGuard
PATH_UNAVAILABLE = "path not available on this server"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask, read from the server's environment when the model loads.

    Attributes:
        path_roots: resolved folders whose files clients may name by path; empty: bytes only (the default).
        max_rows: rows per request; rows past it answer an error without being read.
        max_request_mib: MiB of scans per request, all rows together; rows past it answer an error.
        timeout_s: MLflow's request timeout; at 0.8 of it (:attr:`deadline_s`) the rows not yet computed answer
            ``timeout``, so that the work stops about when the client is told 504.
    """

    path_roots: tuple[Path, ...] = ()
    max_rows: int = 64
    max_request_mib: float = 64  # at the limit the server peaks at ~1.3 GiB, whatever the concurrency (docs/data.md)
    timeout_s: int = 60  # MLflow's default request timeout (whole seconds, as MLflow reads it)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mib * 2**20)

    @property
    def deadline_s(self) -> float:
        return 0.8 * self.timeout_s

    @classmethod
    def from_environment(cls) -> "ServeLimits":
        roots = tuple(Path(os.path.realpath(r)) for r in os.environ.get(PATH_ROOTS_ENV, "").split(os.pathsep) if r)
        return cls(path_roots=roots, max_rows=int(os.environ.get(MAX_ROWS_ENV) or cls.max_rows),
                   max_request_mib=float(os.environ.get(MAX_REQUEST_MIB_ENV) or cls.max_request_mib),
                   timeout_s=int(os.environ.get(TIMEOUT_ENV) or cls.timeout_s))


class RowError(Exception):
    """A row that gets an error answer; the message is what the client reads (no path, no header value)."""


class ScanClassifier(mlflow.pyfunc.PythonModel):
    """Rows ``{"bytes": base64}`` (or ``{"path": ...}`` under the server's roots) -> ``prob_<class>``...,
    ``predicted_class``, ``error``; a multi-label model: ``prob_<finding>``..., ``findings`` (those called present,
    ``|``-joined, ``none``), ``error``."""

    batch_size = 16

    def load_context(self, context) -> None:
        from wsr_med.workflows.model import TrainedModel

        # the network, preprocessing and decision wsr-med predict takes from the run folder (inference.json builds the same)
        model = TrainedModel(context.artifacts["run"])
        self.model = model
        self.classes = model.classes
        self.network = model.network("cpu")
        self.transform = model.preprocessing()
        self.decision = model.decision
        self.multilabel = model.multilabel
        self.limits = ServeLimits.from_environment()
        # one scan decoded at a time in this process, whatever the number of concurrent requests (MLflow runs each in
        # a thread): the peak memory is one full-resolution scan's (up to max_pixels), not one per request
        self._decoding = threading.Lock()

    # --- one row ------------------------------------------------------------------------------------------
    def _row_bytes(self, row: dict, budget: int) -> bytes:
        """The scan's bytes of ``row`` (at most ``budget``), or a :class:`RowError`."""
        data, path = row.get("bytes"), row.get("path")
        if isinstance(data, str) and data:
            if len(data) * 3 // 4 > budget:
                raise RowError(f"over the {self.limits.max_request_bytes // 2**20} MiB of scans a request may hold")
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RowError("'bytes' is not base64") from None
        if isinstance(path, str) and path:
            if not self.limits.path_roots:
                raise RowError("paths are not accepted by this server: send the scan's bytes")
            return self._read_under_roots(path, budget)
        raise RowError("give 'bytes' (base64 of the scan file)" + (" or 'path'" if self.limits.path_roots else ""))

    def _read_under_roots(self, path: str, budget: int) -> bytes:
        """The file at ``path`` if it resolves inside a root and is a readable regular file; every other case (outside,
        missing, a folder, unreadable, a relative path) answers the same :data:`PATH_UNAVAILABLE`."""
        resolved = Path(os.path.realpath(path)) if os.path.isabs(path) else None
        if resolved is None or not any(resolved.is_relative_to(root) for root in self.limits.path_roots):
            raise RowError(PATH_UNAVAILABLE)
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise RowError(PATH_UNAVAILABLE) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise RowError(PATH_UNAVAILABLE)
        with os.fdopen(fd, "rb") as f:
            if info.st_size > budget:
                raise RowError(f"over the {self.limits.max_request_bytes // 2**20} MiB of scans a request may hold")
            return f.read(budget + 1)

    def _image(self, raw: bytes) -> torch.Tensor:
        try:
            with self._decoding:
                image = torch.as_tensor(self.transform({"image": raw})["image"], dtype=torch.float32)
        except Exception as e:  # one bad file answers an error in its row, never fails the request
            while e.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
                e = e.__cause__
            if isinstance(e, ScanReadError):
                raise RowError(e.summary) from None
            logger.warning("a row could not be read (%s)", type(e).__name__)  # the type only: messages quote headers
            raise RowError("the scan could not be read") from None
        if not torch.isfinite(image).all():
            raise RowError("the scan holds non-finite values")
        return image

    # --- a request ----------------------------------------------------------------------------------------
    def predict(self, context, model_input, params=None):
        import pandas as pd

        start = time.monotonic()
        rows = _records(model_input)
        probs = np.full((len(rows), len(self.classes)), np.nan)
        errors = [""] * len(rows)
        budget = self.limits.max_request_bytes
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if time.monotonic() - start > self.limits.deadline_s:
                for n, _ in pending:
                    errors[n] = f"row {n}: timeout"
            elif pending:
                with torch.no_grad():
                    out = self.network(torch.stack([image for _, image in pending]))
                probs[[n for n, _ in pending]] = self.model.probabilities(out)
            pending.clear()

        for n, row in enumerate(rows):
            try:
                if n >= self.limits.max_rows:
                    raise RowError(f"over the {self.limits.max_rows} rows a request may hold")
                if time.monotonic() - start > self.limits.deadline_s:
                    raise RowError("timeout")
                raw = self._row_bytes(row if isinstance(row, dict) else {}, budget)
                budget -= len(raw)
                pending.append((n, self._image(raw)))
            except RowError as e:
                errors[n] = f"row {n}: {e}"
            except Exception as e:  # never a traceback to the client: MLflow's error answer quotes the server's paths
                logger.warning("row %d could not be read (%s)", n, type(e).__name__)
                errors[n] = f"row {n}: the scan could not be read"
            if len(pending) == self.batch_size:
                flush()
        flush()
        good = np.array([n for n, e in enumerate(errors) if not e], dtype=int)
        decided = [None] * len(rows)
        if len(good):
            probs[good] = self.decision.probabilities(probs[good])
            for n, called in zip(good, self.decision.classes(probs[good])):
                decided[n] = ("|".join(c for c, v in zip(self.classes, called) if v) or "none") if self.multilabel \
                    else self.classes[called]
        columns = {f"prob_{c}": pd.Series([None if np.isnan(p) else float(p) for p in probs[:, k]], dtype=object)
                   for k, c in enumerate(self.classes)}  # None -> JSON null (NaN is not JSON)
        out = pd.DataFrame(columns)
        out["findings" if self.multilabel else "predicted_class"] = pd.Series([d or "" for d in decided], dtype=object)
        out["error"] = errors
        return out


def _records(model_input) -> list:
    """The request's rows as a list, whatever shape MLflow parsed it into (a DataFrame from ``dataframe_*`` and
    ``inputs``/``instances`` with this signature, a dict of columns, a list of rows)."""
    if hasattr(model_input, "to_dict"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):  # {"bytes": [...], "path": [...]}
        n = max((len(v) for v in model_input.values() if isinstance(v, (list, tuple, np.ndarray))), default=1)
        rows = [{k: (v[i] if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in model_input.items()} for i in range(n)]
    else:
        rows = list(model_input)
    # pandas fills a column a row lacks with NaN or None: only strings count
    return [{k: v for k, v in row.items() if isinstance(v, str)} if isinstance(row, dict) else row for row in rows]


def body_limit(max_request_mib: float) -> int:
    """The largest request body for ``max_request_mib`` of scans: base64 adds a third, JSON a little more."""
    return int(max_request_mib * 2**20 * 4 / 3) + 2**20


def served_model_signature(classes: list[str], multilabel: bool = False):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("string", "bytes", required=False)])
    outputs = Schema([*[ColSpec("double", f"prob_{c}", required=False) for c in classes],
                      ColSpec("string", "findings" if multilabel else "predicted_class"), ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_served_model(run_dir: str | Path, registered_model_name: str | None, pip_requirements: list[str]):
    """Log the served model of ``run_dir`` to the active MLflow run (registered when a name is given).

    Its artifact is a minimal run folder: weights, classes, calibration, best epoch, and the settings with
    paths hashed; no datalist, no file name. The folder is first logged to the run (``served_model_files/``), and
    the model takes it from there: the model's MLmodel then names ``runs:/<run id>/...``, not a local folder.
    """
    from wsr_med.tracking import MODEL_CONTEXT_TAGS

    run = RunFolder(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        for name in (RunFolder.MODEL, RunFolder.CLASSES, RunFolder.CALIBRATION, RunFolder.BEST):
            if (run / name).is_file():
                (folder / name).write_bytes((run / name).read_bytes())
        (folder / RunFolder.CONFIG).write_text(json.dumps({"settings": settings_without_paths(run.settings()),
                                                           "task": run.task()}))
        mlflow.log_artifacts(str(folder), "served_model_files")
    run_id = mlflow.active_run().info.run_id
    return mlflow.pyfunc.log_model(name="model", python_model=ScanClassifier(),
                                   artifacts={"run": f"runs:/{run_id}/served_model_files"},
                                   signature=served_model_signature(run.classes(), run.multilabel()),
                                   registered_model_name=registered_model_name or None,
                                   pip_requirements=pip_requirements, tags=MODEL_CONTEXT_TAGS)


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1, path_roots: list[str] = (),
          max_rows: int | None = None, max_request_mib: float | None = None, timeout_s: int | None = None) -> None:
    """Serve a registered model with MLflow's scoring server (``/invocations``, ``/ping``) in this interpreter,
    behind a request-size limit: what ``mlflow models serve --env-manager local`` runs, without its need for an
    activated environment (it starts ``uvicorn`` from ``PATH``).

    Args:
        model_uri: ``models:/<name>/<version>`` (or ``runs:/...``), found with the current tracking URI.
        path_roots: folders whose scans clients may name by ``path``; none: bytes only.
        max_rows, max_request_mib, timeout_s: see :class:`ServeLimits` (None: its defaults); a body larger than
            ``max_request_mib`` plus the JSON and base64 overhead is refused (413) before it is read.
    """
    limits = ServeLimits(max_rows=max_rows or ServeLimits.max_rows,
                         max_request_mib=max_request_mib or ServeLimits.max_request_mib,
                         timeout_s=timeout_s or ServeLimits.timeout_s)
    import uvicorn
    from mlflow.artifacts import download_artifacts
    from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH  # where MLflow's own app.py finds the model

    from wsr_med.errors import WsrMedError

    missing = [r for r in path_roots if not Path(r).is_dir()]
    if missing:
        raise WsrMedError(f"--path-root {missing[0]} is not a folder")
    try:
        local = download_artifacts(artifact_uri=model_uri)
    except Exception as e:
        raise WsrMedError(f"cannot load {model_uri} ({type(e).__name__}: {str(e)[:200]}); is MLFLOW_TRACKING_URI (or "
                          "--tracking-uri) the store it was registered in?") from None
    os.environ.update({  # what each uvicorn worker reads (ServeLimits.from_environment, serving_app)
        _SERVER_MODEL_PATH: local,
        PATH_ROOTS_ENV: os.pathsep.join(str(Path(r).resolve()) for r in path_roots),
        MAX_ROWS_ENV: str(limits.max_rows),
        MAX_REQUEST_MIB_ENV: str(limits.max_request_mib),
        TIMEOUT_ENV: str(limits.timeout_s),
        BODY_LIMIT_ENV: str(body_limit(limits.max_request_mib)),
    })
    print(f"serving {model_uri} on http://{host}:{port}/invocations: "
          + (f"bytes, or paths under {len(path_roots)} root(s)" if path_roots else "bytes only (no --path-root)")
          + f"; at most {limits.max_rows} rows and {limits.max_request_mib:g} MiB of scans per request, "
          f"{limits.timeout_s:g} s per request", flush=True)
    uvicorn.run("wsr_med.workflows.serving_app:app", host=host, port=port, workers=workers, log_level="warning")

