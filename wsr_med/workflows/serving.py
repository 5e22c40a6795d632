"""The served model: an MLflow ``pyfunc`` that takes what a hospital has (a scan's path or its bytes) and answers
calibrated class probabilities, the decision at the run's operating point, and an error for a bad file.

Registered with every trained run (:class:`wsr_med.handlers.MLflowTracker`), so
``mlflow models serve -m models:/<name>/<version> --env-manager local`` answers ``/invocations`` with
``{"dataframe_records": [{"path": "/data/scan.dcm"}, {"bytes": "<base64 of a DICOM/PNG/JPEG/TIFF>"}]}``.
The network and preprocessing are what the bundle's ``inference.json`` builds on the run folder (as for
``wsr-med predict``: the training's own :func:`wsr_med.data.scan_transforms`), the decision the run's
(:meth:`wsr_med.metrics.Decision.of_run`). An answer holds no path and no
patient identifier: a row is identified by its position, an error names the row, not the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from wsr_med.metrics import Decision
from wsr_med.runs import RunFolder, settings_without_paths

__all__ = ["ScanClassifier", "log_served_model", "served_model_signature"]

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024 * 1024  # one scan's bytes above this are refused before decoding


class ScanClassifier(mlflow.pyfunc.PythonModel):
    """Rows ``{"path": ...}`` or ``{"bytes": base64}`` -> ``prob_<class>``..., ``predicted_class``, ``error``."""

    batch_size = 16

    def load_context(self, context) -> None:
        from wsr_med.workflows.bundle import parse_bundle

        run = RunFolder(context.artifacts["run"])
        # the bundle's inference.json on this run folder: the network and preprocessing wsr-med predict builds
        config = parse_bundle("inference", output_dir=str(run.path), device="cpu")
        self.classes = config.get_parsed_content("classes")
        self.network = config.get_parsed_content("network")
        self.transform = config.get_parsed_content("preprocessing")
        self.decision = Decision.of_run(run)

    def _load(self, row: dict, tmp: Path, n: int) -> torch.Tensor:
        path, data = row.get("path"), row.get("bytes")
        if isinstance(data, str) and data:
            if len(data) > MAX_REQUEST_BYTES * 4 // 3:
                raise ValueError(f"more than {MAX_REQUEST_BYTES // 2**20} MiB")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("'bytes' is not base64") from None
            path = tmp / f"scan_{n}"  # no extension: the reader finds the format by content
            path.write_bytes(raw)
        elif not isinstance(path, str) or not path:
            raise ValueError("give 'path' or 'bytes'")
        image = self.transform({"image": str(path)})["image"]
        image = torch.as_tensor(image, dtype=torch.float32)
        if not torch.isfinite(image).all():
            raise ValueError("the scan holds non-finite values")
        return image

    def predict(self, context, model_input, params=None):
        import pandas as pd

        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        probs = np.full((len(rows), len(self.classes)), np.nan)
        errors = [""] * len(rows)
        images, index = [], []
        tmp = Path(tempfile.mkdtemp(prefix="wsr_med_serve_"))
        try:
            for n, row in enumerate(rows):
                try:
                    images.append(self._load(row, tmp, n))
                    index.append(n)
                except Exception as e:  # one bad file answers an error in its row, never fails the request
                    while e.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
                        e = e.__cause__
                    message = str(e).replace(str(tmp / f"scan_{n}"), "").replace(str(row.get("path") or "\0"), "")
                    errors[n] = f"row {n}: {type(e).__name__}: {message.strip(': ') or 'unreadable'}"
            with torch.no_grad():
                for start in range(0, len(images), self.batch_size):
                    batch = torch.stack(images[start:start + self.batch_size])
                    out = torch.softmax(self.network(batch).float(), dim=1).numpy()
                    probs[index[start:start + self.batch_size]] = out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        good = np.array(index, dtype=int)
        decided = np.full(len(rows), "", dtype=object)
        if len(good):
            probs[good] = self.decision.probabilities(probs[good])
            decided[good] = [self.classes[k] for k in self.decision.classes(probs[good])]
        out = pd.DataFrame({f"prob_{c}": probs[:, k] for k, c in enumerate(self.classes)})
        out["predicted_class"] = decided
        out["error"] = errors
        return out


def served_model_signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("string", "bytes", required=False)])
    outputs = Schema([*[ColSpec("double", f"prob_{c}") for c in classes], ColSpec("string", "predicted_class"),
                      ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_served_model(run_dir: str | Path, registered_model_name: str | None, pip_requirements: list[str]):
    """Log the served model of ``run_dir`` to the active MLflow run (registered when a name is given).

    Its artifact is a minimal run folder: weights, classes, calibration, best epoch, and the settings with
    paths hashed; no datalist, no file name.
    """
    run = RunFolder(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        for name in (RunFolder.MODEL, RunFolder.CLASSES, RunFolder.CALIBRATION, RunFolder.BEST):
            if (run / name).is_file():
                shutil.copy(run / name, folder / name)
        (folder / RunFolder.CONFIG).write_text(json.dumps({"settings": settings_without_paths(run.settings())}))
        return mlflow.pyfunc.log_model(name="model", python_model=ScanClassifier(), artifacts={"run": str(folder)},
                                       signature=served_model_signature(run.classes()),
                                       registered_model_name=registered_model_name or None,
                                       pip_requirements=pip_requirements)
