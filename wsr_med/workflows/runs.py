"""Run bookkeeping for bundle configs: resume points, tracking-store checks, metric inputs."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["sqlite_uri", "check_tracking_uri", "resume_checkpoint", "metric_inputs", "per_class_auc_metrics", "save_run_info"]


def sqlite_uri(path: str | Path) -> str:
    """``sqlite:///<absolute path>``: MLflow's local tracking store, no server needed."""
    return f"sqlite:///{Path(path).resolve()}"


def check_tracking_uri(tracking_uri: str, timeout_s: float = 10.0) -> str:
    """Fail at once, before any training, if the MLflow tracking store cannot be reached.

    Sets MLflow's HTTP retries low so that a store that goes away later costs seconds per call,
    not minutes (the training then goes on, see :class:`wsr_med.handlers.MLflowTracker`).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except Exception as e:
        raise ConnectionError(
            f"MLflow tracking store {tracking_uri} cannot be reached ({type(e).__name__}: {str(e)[:200]}); "
            "start the server or pass another tracking_uri (the default is a local SQLite file). Nothing was trained."
        ) from None
    return tracking_uri


_EPOCH = re.compile(r"epoch=(\d+)")


def resume_checkpoint(ckpt_dir: str | Path, max_epochs: int) -> str | None:
    """The last epoch checkpoint to resume from, or None for a fresh run.

    Raises if that checkpoint already reached ``max_epochs``: the run is finished and running it
    again would start over and overwrite its results. Raise ``max_epochs`` to train further.
    """
    found = sorted(Path(ckpt_dir).glob("checkpoint_epoch=*.pt"), key=lambda p: int(_EPOCH.search(p.name).group(1)))
    complete = [p for p in found if zipfile.is_zipfile(p)]  # torch.save writes a zip; a truncated one is not
    for p in sorted(set(found) - set(complete)):
        logger.warning("ignoring incomplete checkpoint %s", p)
    found = complete
    if not found:
        return None
    epoch = int(_EPOCH.search(found[-1].name).group(1))
    if epoch >= max_epochs:
        raise RuntimeError(
            f"{ckpt_dir} holds a finished run ({epoch} of max_epochs={max_epochs}); use another output_dir, "
            "or raise max_epochs to continue training it."
        )
    return str(found[-1])


def metric_inputs(kind: str = "probs") -> Callable:
    """An ignite ``output_transform`` giving batched ``(y_pred, y)`` from a decollated MONAI evaluator output.

    ``probs``: (softmax probabilities, one-hot labels) for ROC AUC; ``index``: (probabilities,
    class indices) for accuracy; ``log_probs``: (log-probabilities, class indices) for an NLL loss,
    which equals the cross-entropy of the logits.
    """

    def transform(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        pred = torch.stack([o["pred"] for o in output])
        label = torch.stack([o["label"] for o in output])
        if kind == "probs":
            return pred, label
        index = label.argmax(1)
        return (pred.clamp_min(1e-12).log(), index) if kind == "log_probs" else (pred, index)

    return transform


def per_class_auc_metrics(classes: list[str]) -> dict:
    """``{"val_auc_<class>": ROCAUC}`` one-vs-rest per class for multi-class tasks (none for binary ones,
    where the single AUC says it all), to add to an evaluator's ``additional_metrics``."""
    from monai.handlers import ROCAUC

    if len(classes) <= 2:
        return {}

    def column(c: int) -> Callable:
        def transform(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
            pred, label = metric_inputs("probs")(output)
            return pred[:, c], label[:, c]

        return transform

    return {f"val_auc_{re.sub(r'[^0-9A-Za-z_.-]', '_', name)}": ROCAUC(output_transform=column(c)) for c, name in enumerate(classes)}


def save_run_info(output_dir: str | Path, classes: list[str], settings: dict, config_files: list[str] | None = None) -> Path:
    """Write ``classes.json`` (the class map used at inference) and ``config.json`` (the resolved run settings
    and the bundle config files as run) into ``output_dir``; returns ``config.json``."""
    import json

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "classes.json").write_text(json.dumps(list(classes)))
    files = {str(f): json.loads(Path(f).read_text()) for f in config_files or [] if Path(f).is_file()}
    doc = {"settings": settings, "config_files": files, "torch": torch.__version__}
    path = output / "config.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path
