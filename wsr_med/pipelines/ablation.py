"""Ablation study: heads x backbones x image sizes x patient-level folds x seeds, each cell a run of the bundle.

    wsr-med ablate --dataset-dir ../shared/data/chest_xray_pneumonia/labels_3class.csv \\
        --output-dir runs/ablation_chest3 --heads gap wise wise_unconstrained depthwise gem flatten \\
        --sizes 128 --folds 5 --seeds 0 1 2 --set "backbone_kwargs={'init_features':16,'growth_rate':8,'block_config':[2,2,2,2]}" max_epochs=15

Protocol. For each seed the patients are split into k folds (stratified; the seed draws the folds). A cell
holds one fold out as its test fold; of the other folds' patients, ``val_fraction`` (stratified) is an
inner validation split, which alone picks the checkpoint (best inner-validation AUC). The held-out fold
chooses nothing: it is evaluated after training, with the selected model (``eval/``) and with the last
epoch's (``eval_last/``), on uncalibrated probabilities.

All cells are child runs of one MLflow parent run, named after the network (``densenet-16-8-2222-128-wise-fold0-seed1``).
The study writes ``summary.csv`` / ``summary.md``: per head the mean and spread of the outer-fold AUC and
accuracy over folds x seeds, the last epoch's AUC, parameters, seconds per epoch, the shuffle diagnostic,
and the AUC difference to ``gap`` (paired, same cases) with the corrected resampled t-test over folds x
seeds (Nadeau & Bengio 2003) and, as a secondary column, a case bootstrap with each model fixed; the
differences of every fold and seed are listed under the table. Plus ``auc_by_head.png`` (t intervals)
and ``val_curves.png``, logged to the parent run. A study folder holds one set of overrides
(``grid.json``): a rerun with other ``--set`` values is refused, naming the keys. Run the same command
again after an interruption: finished cells are skipped, an interrupted cell resumes from its last epoch.

Spreading a study. ``--workers N`` runs N cells at once, one process each: on a machine with GPUs, worker
k sees GPU k mod (number of GPUs) alone (``CUDA_VISIBLE_DEVICES``); on the CPU the cores are shared out.
``--shard i/N`` runs every N-th cell starting with the i-th, so N machines (a Slurm array, or N shells)
that see the same study folder and MLflow server share one grid, one experiment and one parent run. Every
process writes the summary of the cells finished so far when it ends: the last one to finish writes the
whole study's. A worker that dies leaves its cell to the next run of the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import queue
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from wsr_med import tracking
from wsr_med.data.csv_files import unneutralise
from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write
from wsr_med.metrics import bootstrap_ci, corrected_resampled_ttest, figure, plain, roc_auc
from wsr_med.networks import backbone_label
from wsr_med.runs import RunFolder, latest_checkpoint
from wsr_med.settings import default
from wsr_med.workflows.bundle import check_overrides, parse_overrides
from wsr_med.workflows import load_model, parse_bundle, run_workflow

logger = logging.getLogger("wsr_med.ablation")


@dataclass(frozen=True)
class Cell:
    """One training of the grid; ``network`` says what the backbone is (``densenet-16-8-2222``)."""

    backbone: str
    image_size: int
    head: str
    fold: int
    seed: int = 0
    network: str = ""

    @property
    def name(self) -> str:
        return f"{self.network or self.backbone}-{self.image_size}-{self.head}-fold{self.fold}-seed{self.seed}"


def overrides_id(overrides: dict) -> str:
    """A short hash of a study's ``--set`` overrides: part of every cell's identity."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_study_overrides(output: Path, overrides: dict) -> None:
    """Refuse to add cells trained with other overrides to a study folder (they would mix into its summary)."""
    grid_file = output / "grid.json"
    if not grid_file.is_file():
        return
    before = json.loads(grid_file.read_text()).get("overrides", {})
    unset = "<unset>"
    changed = [f"{k}: {before.get(k, unset)!r} -> {overrides.get(k, unset)!r}" for k in sorted(set(before) | set(overrides))
               if before.get(k, unset) != overrides.get(k, unset)]
    if changed:
        raise WsrMedError(f"{output} holds a study run with other overrides ({'; '.join(changed)}); use another --output-dir")


def study_lock(output: Path):
    """The lock that makes the study's shared files (parent run, grid, summary) one process's at a time."""
    from filelock import FileLock

    output.mkdir(parents=True, exist_ok=True)
    return FileLock(str(output / ".study.lock"))


def _parent_run(client, experiment_name: str, output: Path, grid: dict) -> str:
    """The study's MLflow parent run: made by the first process of a study, found by the others."""
    path = output / "parent_run_id"
    if path.is_file():
        return path.read_text().strip()
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=f"ablation-{output.name}")
    for key, value in grid.items():
        client.log_param(run.info.run_id, key, json.dumps(value) if not isinstance(value, str) else value)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(path, run.info.run_id)
    return run.info.run_id


def _cases_file(output: Path, cell: Cell, head: str) -> Path:
    """The per-case predictions of ``cell``'s backbone, size and fold with ``head``."""
    return output / replace(cell, head=head).name / RunFolder.EVAL / RunFolder.CASES


def _read_cases(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    paths = [r["path"] for r in rows]
    labels = np.array([classes.index(unneutralise(r["label"])) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return paths, labels, probs, classes


def load_cell(cell_dir: Path, cache_dir: str) -> tuple[torch.nn.Module, torch.Tensor, np.ndarray, list[str]]:
    """A finished cell's selected model (eval mode), its held-out fold's images ``(N, C, *S)``, labels and class names."""
    from monai.data import DataLoader

    from wsr_med.data import read_datalist, scan_dataset

    folder = RunFolder(cell_dir)
    config = parse_bundle("evaluate", output_dir=str(cell_dir))  # the network and preprocessing the cell was trained with
    net = load_model(config.get_parsed_content("network_def"), folder.model, "cpu")
    split = "test" if read_datalist(folder / RunFolder.DATALIST, "test") else "validation"  # studies before inner validation
    items = read_datalist(folder / RunFolder.DATALIST, split)
    dataset = scan_dataset(items, config.get_parsed_content("validate#preprocessing"), cache_dir)
    batches = list(DataLoader(dataset, batch_size=64, num_workers=0))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches]).numpy()
    return net, images, labels, folder.classes()


def shuffle_auc(net: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, repeats: int = 3, seed: int = 0) -> float:
    """Validation AUC when the final feature map's positions are randomly permuted (mean over ``repeats``)."""
    from wsr_med.networks import logits_with_shuffled_positions

    generator = torch.Generator().manual_seed(seed)
    aucs = []
    for _ in range(repeats):
        logits = torch.cat([logits_with_shuffled_positions(net, x, generator) for x in images.split(64)])
        aucs.append(roc_auc(labels, torch.softmax(logits, 1).numpy()))
    return float(np.mean(aucs))


def cell_figure(net: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, classes: list[str], path: Path,
                per_class: int = 2) -> Path:
    """Mean validation image, the learned Wise-SrNet spatial weights (if any) and MONAI Grad-CAM of a few cases per class."""
    from wsr_med.networks import WiseCompression, gradcam

    cases = [i for c in range(len(classes)) for i in np.flatnonzero(labels == c)[:per_class]]
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
    for ax, i, h in zip(axes[k:], cases, heat):
        ax.imshow(images[i, 0], cmap="gray")
        ax.imshow(h[0], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(f"Grad-CAM, {plain(classes[labels[i]])}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def run_cell(cell: Cell, args: argparse.Namespace, parent_run_id: str, extra: dict) -> dict:
    cell_dir = Path(args.output_dir) / cell.name
    done = cell_dir / "cell.json"
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
    result = {**asdict(cell), "overrides_id": overrides_id(extra), "auc": metrics["auc"], "accuracy": metrics["accuracy"],
              "auc_last_epoch": last["auc"], "auc_shuffled": shuffled, "n_train": counts["training"] + counts["validation"],
              "n_test": counts["test"], "params": sum(p.numel() for p in net.parameters()),
              "head_params": sum(p.numel() for p in net.head.parameters()),
              "seconds_per_epoch": seconds_per_epoch, "val_auc_curve": curve,
              "train_seconds": float(timing.read_text()) if timing.is_file() else float("nan")}
    run_id = RunFolder(cell_dir).mlflow_run_id
    client = tracking.client(args.tracking_uri)
    client.log_metric(run_id, "eval_test_auc_shuffled", shuffled)
    client.log_metric(run_id, "eval_test_auc_last_epoch", last["auc"])
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
        if (cell_dir / "cell.json").is_file():
            result = json.loads((cell_dir / "cell.json").read_text())
            result["val_auc_curve"], result["seconds_per_epoch"] = _validation_history(cell_dir, args)
            done.append(cell)
            results.append(result)
    return done, results


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (1 <= i <= N) -> ``(i, N)``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/N, e.g. 1/4; got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"--shard {text}: i must be between 1 and N")
    return i, n


def _work(tasks, events, args: argparse.Namespace, parent: str, extra: dict) -> None:
    """Run the cells taken from ``tasks`` until ``None``, saying on ``events`` what became of each."""
    while (cell := tasks.get()) is not None:
        logger.info("worker pid %d runs cell %s", os.getpid(), cell.name)
        events.put(("started", cell.name, os.getpid()))
        try:
            run_cell(cell, args, parent, extra)
            events.put(("finished", cell.name, os.getpid()))
        except Exception as e:  # reported with the study's result; the other cells go on
            logger.exception("cell %s failed", cell.name)
            events.put(("failed", cell.name, f"{type(e).__name__}: {e}"))


def _worker(k: int, gpus: int, threads: int, tasks, events, args: argparse.Namespace, parent: str, extra: dict) -> None:
    """Worker process ``k``: GPU k mod ``gpus`` alone (as cuda:0), ``threads`` CPU threads."""
    if gpus:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker {k}: %(name)s: %(message)s")
    _work(tasks, events, args, parent, extra)


def _take_events(events, outcome: dict, timeout: float = 1.0) -> None:
    """Move the events waiting on ``events`` into ``outcome`` (cell -> its last event)."""
    with contextlib.suppress(queue.Empty, EOFError, OSError):  # a killed worker may have left a message half written
        while True:
            kind, name, info = events.get(timeout=timeout)
            outcome[name] = (kind, info)


def run_in_workers(cells: list[Cell], args: argparse.Namespace, parent: str, extra: dict) -> dict[str, str]:
    """Run ``cells`` ``args.workers`` at a time; returns ``{cell name: why}`` for the cells that did not finish.

    This process is worker 0 (on GPU 0) and starts the others, so that their start-up (importing torch, MONAI
    and MLflow: ~6 s each on a small machine) overlaps its first cell instead of delaying every cell.
    """
    gpus = torch.cuda.device_count()
    threads = 1 if gpus else max(1, len(os.sched_getaffinity(0)) // args.workers)
    context = multiprocessing.get_context("spawn")  # fresh processes: CUDA and threads are set before first use
    tasks, events = context.Queue(), context.Queue()
    for cell in cells:
        tasks.put(cell)
    for _ in range(args.workers):
        tasks.put(None)
    workers = [context.Process(target=_worker, args=(k, gpus, threads, tasks, events, args, parent, extra))
               for k in range(1, args.workers)]
    for w in workers:
        w.start()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    outcome: dict[str, tuple[str, object]] = {}  # cell -> its last event
    try:
        _work(tasks, events, args, parent, extra)
    finally:
        torch.set_num_threads(previous)
        # read events while waiting: a worker cannot exit before what it put on the queue has been taken
        while any(w.is_alive() for w in workers):
            _take_events(events, outcome)
        _take_events(events, outcome)
    exit_codes = {w.pid: w.exitcode for w in workers}
    failed = {}
    for cell in cells:
        if (Path(args.output_dir) / cell.name / "cell.json").is_file():
            continue
        kind, info = outcome.get(cell.name, ("not run", None))
        failed[cell.name] = (info if kind == "failed" else
                             f"its worker process ended (exit code {exit_codes.get(info)}) during the cell" if kind == "started"
                             else "not run: every worker process ended before it")
    return failed


def fold_differences(output: Path, cells: list[Cell], head: str) -> list[tuple[Cell, float, np.ndarray, np.ndarray, np.ndarray]]:
    """Per cell (fold x seed): AUC(head) - AUC(gap) on the same held-out cases, with those cases' labels and
    both heads' probabilities."""
    out = []
    for c in cells:
        paths, labels, probs_h, _ = _read_cases(_cases_file(output, c, head))
        paths_g, labels_g, probs_g, _ = _read_cases(_cases_file(output, c, "gap"))
        if paths != paths_g or not np.array_equal(labels, labels_g):
            raise ValueError(f"{head} and gap were evaluated on different cases in {c.name}")
        out.append((c, roc_auc(labels, probs_h) - roc_auc(labels, probs_g), labels, probs_h, probs_g))
    return out


def paired_difference(output: Path, cells: list[Cell], head: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over cells of AUC(head) - AUC(gap) on the same held-out cases, with a paired case-bootstrap 95% CI.

    Each cell is a different trained model, so AUC is taken within a cell, then averaged: pooling the cells'
    predictions would rank one model's scores against another's. The bootstrap resamples cases within each
    cell, the same cases for both heads: it covers case sampling with every model fixed, not retraining
    (:func:`wsr_med.metrics.corrected_resampled_ttest` over the cells covers that).
    """
    folds = [(y, ph, pg) for _, _, y, ph, pg in fold_differences(output, cells, head)]

    def mean_difference(indices: list[np.ndarray]) -> float:
        return float(np.mean([roc_auc(y[i], ph[i]) - roc_auc(y[i], pg[i]) for (y, ph, pg), i in zip(folds, indices)]))

    low, high = bootstrap_ci([y for y, _, _ in folds], mean_difference, n_boot, seed=seed)
    return mean_difference([np.arange(len(y)) for y, _, _ in folds]), low, high


def _t_half_width(values: list[float]) -> float:
    """Half width of the 95% t interval of the mean of ``values``."""
    from scipy import stats

    k = len(values)
    return float(stats.t.ppf(0.975, k - 1) * statistics.stdev(values) / k ** 0.5) if k > 1 else float("nan")


def summarise(output: Path, results: list[dict], cells: list[Cell], missing: list[Cell] = ()) -> list[Path]:
    """Write summary.csv / summary.md and the plots of the finished ``cells`` and their ``results``; returns the files.
    ``missing``: the grid's cells not finished yet, listed at the top of summary.md (a partial summary says so)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("network") or r["backbone"], r["image_size"], r["head"]), []).append(r)
    rows, listed = [], []
    for (network, size, head), rs in groups.items():
        aucs, accs = [r["auc"] for r in rs], [r["accuracy"] for r in rs]
        row = {"network": network, "image_size": size, "head": head, "cells": len(rs),
               "auc_mean": statistics.mean(aucs), "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
               "auc_last_epoch_mean": statistics.mean(r.get("auc_last_epoch", float("nan")) for r in rs),
               "accuracy_mean": statistics.mean(accs), "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "auc_shuffled_mean": statistics.mean(r["auc_shuffled"] for r in rs),
               "params": rs[0]["params"], "head_params": rs[0]["head_params"],
               # a median: a cell that shared the machine with another job must not move the row
               "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in rs)}
        finished = set(cells)
        same = [c for c in cells if ((c.network or c.backbone), c.image_size, c.head) == (network, size, head)
                and replace(c, head="gap") in finished]  # compared where the gap cell has finished too
        if head != "gap" and same:
            differences = fold_differences(output, same, head)
            n_train = statistics.mean(r.get("n_train", 0) for r in rs) or 1.0
            n_test = statistics.mean(r.get("n_test", 0) for r in rs)
            test = corrected_resampled_ttest([d for _, d, *_ in differences], n_train, n_test)
            row.update({"auc_vs_gap": test["mean"], "auc_vs_gap_ci_low": test["ci"][0], "auc_vs_gap_ci_high": test["ci"][1],
                        "auc_vs_gap_p": test["p"]})
            _, row["auc_vs_gap_bootstrap_low"], row["auc_vs_gap_bootstrap_high"] = paired_difference(output, same, head)
            listed.append(f"- {network}, {size} px, {head} - gap, per fold x seed: " + ", ".join(
                f"f{c.fold}s{c.seed} {d:+.3f}" for c, d, *_ in differences))
        rows.append(row)
    fields = ["network", "image_size", "head", "cells", "auc_mean", "auc_sd", "auc_last_epoch_mean", "accuracy_mean",
              "accuracy_sd", "auc_vs_gap", "auc_vs_gap_ci_low", "auc_vs_gap_ci_high", "auc_vs_gap_p",
              "auc_vs_gap_bootstrap_low", "auc_vs_gap_bootstrap_high", "auc_shuffled_mean", "params", "head_params",
              "seconds_per_epoch"]
    with open(output / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    partial = [f"**Partial: {len(missing)} of the grid's {len(cells) + len(missing)} cells have not finished** "
               f"(run the same command again to finish them): {', '.join(c.name for c in missing)}.", ""] if missing else []
    lines = [*partial, "| network | size | head | folds x seeds | AUC mean ± sd | AUC, last epoch | accuracy mean ± sd | "
             "ΔAUC vs gap [95% CI, corrected t] | p | case-bootstrap CI (models fixed) | AUC, positions shuffled | params | "
             "head params | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        has = "auc_vs_gap" in r
        delta = f"{r['auc_vs_gap']:+.3f} [{r['auc_vs_gap_ci_low']:+.3f}, {r['auc_vs_gap_ci_high']:+.3f}]" if has else "—"
        boot = f"[{r['auc_vs_gap_bootstrap_low']:+.3f}, {r['auc_vs_gap_bootstrap_high']:+.3f}]" if has else "—"
        p_value = ("<0.001" if r["auc_vs_gap_p"] < 0.001 else f"{r['auc_vs_gap_p']:.3f}") if has else "—"
        lines.append(f"| {r['network']} | {r['image_size']} | {r['head']} | {r['cells']} | {r['auc_mean']:.3f} ± {r['auc_sd']:.3f} | "
                     f"{r['auc_last_epoch_mean']:.3f} | {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f} | {delta} | {p_value} | "
                     f"{boot} | {r['auc_shuffled_mean']:.3f} | {r['params']:,} | {r['head_params']:,} | {r['seconds_per_epoch']:.1f} |")
    lines += ["", "AUC on each cell's held-out fold, with the checkpoint its inner validation split chose. The CI and p "
              "of ΔAUC are the corrected resampled t-test over folds x seeds (Nadeau & Bengio 2003); the case "
              "bootstrap keeps every trained model fixed and covers case sampling only.", "", *listed]
    atomic_write(output / "summary.md", "\n".join(lines) + "\n")

    configs = sorted({(r["network"], r["image_size"]) for r in rows})
    fig, axes = figure(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (network, size) in zip(axes[0], configs):
        sub = [r for r in rows if (r["network"], r["image_size"]) == (network, size)]
        spreads = [_t_half_width([x["auc"] for x in groups[(network, size, r["head"])]]) for r in sub]
        ax.errorbar(range(len(sub)), [r["auc_mean"] for r in sub], yerr=spreads, fmt="o", capsize=4)
        ax.set_xticks(range(len(sub)), [r["head"] for r in sub], rotation=45, ha="right")
        ax.set(title=f"{network}, {size} px", ylabel="held-out AUC (mean, 95% t CI)")
    fig.tight_layout()
    fig.savefig(output / "auc_by_head.png", dpi=110)
    fig, axes = figure(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (network, size) in zip(axes[0], configs):
        for head in sorted({r["head"] for r in results}):
            curves = [r["val_auc_curve"] for r in results
                      if ((r.get("network") or r["backbone"]), r["image_size"], r["head"]) == (network, size, head)]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], 0), label=head)
        ax.set(title=f"{network}, {size} px", xlabel="epoch", ylabel="inner-validation AUC (mean over cells)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "val_curves.png", dpi=110)
    return [output / n for n in ("summary.csv", "summary.md", "auc_by_head.png", "val_curves.png")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default="synthetic", help="folder, CSV manifest or 'synthetic'")
    parser.add_argument("--output-dir", default="runs/ablation")
    parser.add_argument("--heads", nargs="+", default=["gap", "wise", "wise_unconstrained", "depthwise", "gem", "flatten"])
    parser.add_argument("--backbones", nargs="+", default=["densenet121"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="each seed redraws the folds and the training")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment-name", default="wsr_med_ablation")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="bundle overrides for every cell")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at once, one process each (one GPU each where there are GPUs)")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), metavar="i/N",
                        help="run the i-th of N shares of the grid (N machines or shells, one study folder)")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: write the summary of the cells finished so far (e.g. while shards run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
    extra = parse_overrides(args.set)
    check_overrides("train", extra)  # before any cell: a typo must not train a whole grid with the default
    output = Path(args.output_dir)
    if args.dataset_dir == "synthetic":  # one generated folder for the whole study, not one per cell
        from wsr_med.data import synthetic_dataset

        args.dataset_dir = str(synthetic_dataset(**extra.get("synthetic", {})))
    heads = ["gap"] + [h for h in args.heads if h != "gap"]  # the reference first
    # Fold x seed outside the heads: an interrupted study has finished whole comparisons, not one head's cells.
    cells = [Cell(b, s, h, f, seed, backbone_label(b, extra.get("backbone_kwargs")))
             for b, s, seed, f, h in itertools.product(args.backbones, args.sizes, args.seeds, range(args.folds), heads)]
    shard, shards = args.shard
    mine = [] if args.summary_only else cells[shard - 1::shards]
    grid = {"dataset_dir": args.dataset_dir, "heads": heads, "backbones": args.backbones, "sizes": args.sizes,
            "folds": args.folds, "seeds": args.seeds, "overrides": extra, "overrides_id": overrides_id(extra),
            "protocol": "inner validation selects the checkpoint; the held-out fold is evaluated after training"}
    with study_lock(output):  # one process at a time also creates a new SQLite store's tables
        check_study_overrides(output, extra)
        client = tracking.client(args.tracking_uri)
        parent = _parent_run(client, args.experiment_name, output, grid)
        if mine and client.get_run(parent).info.status != "RUNNING":  # cells to train: the study runs (again)
            client.update_run(parent, status="RUNNING")
        atomic_write(output / "grid.json", json.dumps(grid, indent=1))  # the parent's params keep the first invocation's grid
    start = time.perf_counter()
    logger.info("%d of the grid's %d cells in this process (shard %d/%d), %d at a time",
                len(mine), len(cells), shard, shards, args.workers)
    if args.workers > 1:
        failed = run_in_workers(mine, args, parent, extra)
    else:
        failed = {}
        for cell in mine:
            run_cell(cell, args, parent, extra)
    with study_lock(output):  # the summary of every cell finished so far, by any process
        done, results = finished_results(cells, args)
        missing = [c for c in cells if c not in done]
        files = [output / "grid.json", *(summarise(output, results, done, missing) if done else [])]
        with tracking.tracking_uri_context(args.tracking_uri):
            for path in files:
                client.log_artifact(parent, str(path), "summary")
            if not missing:  # the grid is done: its parent run is too (a grid extended later reopens it)
                client.set_terminated(parent, "FINISHED")
    if done:
        print((output / "summary.md").read_text())
    print(f"study wall time this invocation: {time.perf_counter() - start:.0f} s; results in {output}")
    if failed:
        raise WsrMedError(f"{len(failed)} cell(s) did not finish: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
                          + ". Run the same command again to finish them (interrupted cells resume).")


if __name__ == "__main__":
    main()
