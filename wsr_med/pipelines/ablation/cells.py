"""One cell of the grid: train it through the bundle, evaluate its held-out fold, and its diagnostics."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from wsr_med import tracking
from wsr_med.files import atomic_write
from wsr_med.metrics import figure, plain, roc_auc
from wsr_med.pipelines.ablation.grid import Cell, overrides_id
from wsr_med.runs import RunFolder, latest_checkpoint
from wsr_med.settings import default
from wsr_med.workflows import TrainedModel, run_workflow

__all__ = ["CELL_RESULT", "cell_figure", "finished_results", "load_cell", "run_cell", "shuffle_auc"]

logger = logging.getLogger("wsr_med.ablation")

CELL_RESULT = "cell.json"  # in a cell's folder: written last, so a cell that has it is finished


def load_cell(cell_dir: Path, cache_dir: str) -> tuple[torch.nn.Module, torch.Tensor, np.ndarray, list[str]]:
    """A finished cell's selected model (eval mode), its held-out fold's images ``(N, C, *S)``, labels and class names."""
    from monai.data import DataLoader

    from wsr_med.data import read_datalist, scan_dataset

    folder = RunFolder(cell_dir)
    model = TrainedModel(cell_dir)  # the network and preprocessing the cell was trained with
    net = model.network("cpu")
    split = "test" if read_datalist(folder / RunFolder.DATALIST, "test") else "validation"  # studies before inner validation
    items = read_datalist(folder / RunFolder.DATALIST, split)
    dataset = scan_dataset(items, model.preprocessing(), cache_dir)
    batches = list(DataLoader(dataset, batch_size=64, num_workers=0))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches]).numpy()
    return net, images, labels, folder.classes()


def shuffle_auc(net: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, repeats: int = 3, seed: int = 0) -> float:
    """Validation AUC when the final feature map's positions are randomly permuted (mean over ``repeats``); multi-label
    (``labels`` ``(N, F)``), the macro AUC over findings of the sigmoid outputs."""
    from wsr_med.metrics.multilabel import macro_auc
    from wsr_med.networks import logits_with_shuffled_positions

    generator = torch.Generator().manual_seed(seed)
    aucs = []
    for _ in range(repeats):
        logits = torch.cat([logits_with_shuffled_positions(net, x, generator) for x in images.split(64)])
        aucs.append(macro_auc(labels, torch.sigmoid(logits).numpy()) if labels.ndim == 2
                    else roc_auc(labels, torch.softmax(logits, 1).numpy()))
    return float(np.mean(aucs))


def cell_figure(net: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, classes: list[str], path: Path,
                per_class: int = 2) -> Path:
    """Mean validation image, the learned Wise-SrNet spatial weights (if any) and MONAI Grad-CAM of a few cases per class."""
    from wsr_med.networks import WiseCompression, gradcam

    positive = labels == 1 if labels.ndim == 2 else labels[:, None] == np.arange(len(classes))  # (N, classes or findings)
    cases = [i for c in range(len(classes)) for i in np.flatnonzero(positive[:, c])[:per_class]]
    shown = [c for c in range(len(classes)) for _ in np.flatnonzero(positive[:, c])[:per_class]]
    heat = gradcam(net, images[cases])
    compression = net.head.compression
    weights = compression.depthwise.weight.detach().mean(0)[0] if isinstance(compression, WiseCompression) else None
    panels = 1 + (weights is not None) + len(cases)
    fig, axes = figure(1, panels, figsize=(2.4 * panels, 2.8))
    axes[0].imshow(images[:, 0].mean(0), cmap="gray")
    axes[0].set_title("mean input", fontsize=8)
    k = 1
    if weights is not None:
        axes[1].imshow(weights, cmap="magma")
        axes[1].set_title("spatial weights (mean)", fontsize=8)
        k = 2
    for ax, i, c, h in zip(axes[k:], cases, shown, heat):
        ax.imshow(images[i, 0], cmap="gray")
        ax.imshow(h[0], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(f"Grad-CAM, {plain(classes[c])}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def run_cell(cell: Cell, args: argparse.Namespace, parent_run_id: str, extra: dict) -> dict:
    cell_dir = Path(args.output_dir) / cell.name
    done = cell_dir / CELL_RESULT
    if done.is_file():
        logger.info("skipping finished cell %s", cell.name)
        return json.loads(done.read_text())
    settings = {**extra, "backbone": cell.backbone, "image_size": cell.image_size, "head": cell.head}
    common = {"cache_dir": str(Path(args.output_dir) / "cache"),  # shared: keys hold the preprocessing
              **settings, "dataset_dir": args.dataset_dir, "output_dir": str(cell_dir), "tracking_uri": args.tracking_uri,
              "experiment_name": args.experiment_name, "run_name": cell.name, "registered_model_name": "",
              "parent_run_id": parent_run_id, "n_folds": args.folds, "fold": cell.fold, "seed": cell.seed,
              "inner_validation": True}
    logger.info("cell %s", cell.name)
    timing = cell_dir / "train_seconds.txt"
    if latest_checkpoint(RunFolder(cell_dir).checkpoints)[1] < common.get("max_epochs", default("max_epochs")):
        start = time.perf_counter()
        run_workflow("train", **common)
        timing.write_text(str(time.perf_counter() - start))  # a resumed cell counts its last sitting only
    # the held-out fold, after training: once with the model the inner validation chose, once with the last epoch's
    evaluate = {**common, "eval_split": "test", "calibrated": False}
    run_workflow("evaluate", **evaluate)
    last_checkpoint = latest_checkpoint(RunFolder(cell_dir).checkpoints)[0]
    run_workflow("evaluate", **{**evaluate, "tracking_uri": "none", "model_path": str(last_checkpoint),
                                "eval_dir": str(cell_dir / "eval_last")})
    metrics = RunFolder(cell_dir).evaluation()
    last = RunFolder(cell_dir).evaluation(cell_dir / "eval_last")
    counts = json.loads((cell_dir / RunFolder.DATALIST).read_text())["counts"]
    net, images, labels, classes = load_cell(cell_dir, common["cache_dir"])
    shuffled = shuffle_auc(net, images, labels)
    diagnostics = cell_figure(net, images, labels, classes, cell_dir / RunFolder.EVAL / "diagnostics.png")
    curve, seconds_per_epoch = _validation_history(cell_dir, args)
    auc_of = "macro_auc" if metrics.get("task") == "multilabel" else "auc"  # multi-label: macro AUC over findings
    result = {**asdict(cell), "overrides_id": overrides_id(extra), "auc": metrics[auc_of],
              "accuracy": metrics.get("accuracy", float("nan")), "auc_last_epoch": last[auc_of], "auc_shuffled": shuffled, "n_train": counts["training"] + counts["validation"],
              "n_test": counts["test"], "params": sum(p.numel() for p in net.parameters()),
              "head_params": sum(p.numel() for p in net.head.parameters()),
              "seconds_per_epoch": seconds_per_epoch, "val_auc_curve": curve,
              "train_seconds": float(timing.read_text()) if timing.is_file() else float("nan")}
    run_id = RunFolder(cell_dir).mlflow_run_id
    client = tracking.client(args.tracking_uri)
    client.log_metric(run_id, "eval_test_auc_shuffled", shuffled)
    client.log_metric(run_id, "eval_test_auc_last_epoch", last[auc_of])
    client.log_metric(run_id, "seconds_per_epoch", result["seconds_per_epoch"])
    client.log_artifact(run_id, str(diagnostics), "plots")
    atomic_write(done, json.dumps(result, indent=1))
    return result


def _validation_history(cell_dir: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    """The cell's validation AUC by epoch, and its seconds per epoch: the median interval between those results.

    The median, so that an epoch slowed by a pause, a resume or another job on the machine does not count.
    """
    run_id = RunFolder(cell_dir).mlflow_run_id
    by_step = {}  # the last value logged for each epoch: a resumed epoch is logged twice
    for m in sorted(tracking.client(args.tracking_uri).get_metric_history(run_id, "val_auc"), key=lambda m: m.timestamp):
        by_step[m.step] = m
    history = [by_step[k] for k in sorted(by_step)]
    intervals = np.diff([m.timestamp for m in history]) / 1000
    return [m.value for m in history], float(np.median(intervals)) if len(intervals) else float("nan")


def finished_results(cells: list[Cell], args: argparse.Namespace) -> tuple[list[Cell], list[dict]]:
    """The cells of ``cells`` that have finished (in any process), with their results."""
    done, results = [], []
    for cell in cells:
        cell_dir = Path(args.output_dir) / cell.name
        if (cell_dir / CELL_RESULT).is_file():
            result = json.loads((cell_dir / CELL_RESULT).read_text())
            result["val_auc_curve"], result["seconds_per_epoch"] = _validation_history(cell_dir, args)
            done.append(cell)
            results.append(result)
    return done, results
