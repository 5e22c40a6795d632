"""Ablation study: heads x backbones x image sizes x patient-level folds, each cell a run of the bundle.

    wsr-med ablate --dataset-dir ../shared/data/chest_xray_pneumonia/labels_3class.csv \\
        --output-dir runs/ablation_chest3 --heads gap wise wise_unconstrained depthwise gem flatten \\
        --sizes 128 256 --folds 5 --set "backbone_kwargs={'init_features':16,'growth_rate':8,'block_config':[2,2,2,2]}" max_epochs=15

All cells are child runs of one MLflow parent run. Each cell trains on k-1 folds, is evaluated on
its validation fold (``eval/metrics.json``, per-case ``eval/cases.csv``) and probed with the
spatial-shuffle diagnostic. The study writes ``summary.csv`` / ``summary.md`` (mean and spread of AUC
and accuracy, parameters, median seconds per epoch, shuffle drop, and each head's AUC difference to
``gap``, fold by fold on the same cases, with a paired bootstrap CI), ``auc_by_head.png`` and ``val_curves.png``, and logs
them to the parent run. Run the same command again after an interruption: finished cells are
skipped, an interrupted cell resumes from its last epoch.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from wsr_med.cli import parse_value
from wsr_med import tracking
from wsr_med.data.csv_files import unneutralise
from wsr_med.metrics import bootstrap_ci, figure, plain, roc_auc
from wsr_med.runs import RunFolder, latest_checkpoint
from wsr_med.workflows import load_model, parse_bundle, run_workflow

logger = logging.getLogger("wsr_med.ablation")


@dataclass(frozen=True)
class Cell:
    backbone: str
    image_size: int
    head: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.image_size}-{self.head}-fold{self.fold}"


def _parent_run(client, experiment_name: str, output: Path, grid: dict) -> str:
    path = output / "parent_run_id"
    if path.is_file():
        return path.read_text().strip()
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=f"ablation-{output.name}")
    for key, value in grid.items():
        client.log_param(run.info.run_id, key, json.dumps(value) if not isinstance(value, str) else value)
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(run.info.run_id)
    return run.info.run_id


def _cases_file(output: Path, cell: Cell, head: str) -> Path:
    """The per-case predictions of ``cell``'s backbone, size and fold with ``head``."""
    return output / Cell(cell.backbone, cell.image_size, head, cell.fold).name / RunFolder.EVAL / "cases.csv"


def _read_cases(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    paths = [r["path"] for r in rows]
    labels = np.array([classes.index(unneutralise(r["label"])) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return paths, labels, probs, classes


def load_cell(cell_dir: Path, cache_dir: str) -> tuple[torch.nn.Module, torch.Tensor, np.ndarray, list[str]]:
    """A finished cell's best model (eval mode), its validation images ``(N, C, *S)``, labels and class names."""
    from monai.data import DataLoader

    from wsr_med.data import read_datalist, scan_dataset

    folder = RunFolder(cell_dir)
    config = parse_bundle("evaluate", output_dir=str(cell_dir))  # the network and preprocessing the cell was trained with
    net = load_model(config.get_parsed_content("network_def"), folder.model, "cpu")
    items = read_datalist(folder / RunFolder.DATALIST, "validation")
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
    from monai.visualize import GradCAM

    from wsr_med.networks import WiseCompression, gradcam_layer

    cases = [i for c in range(len(classes)) for i in np.flatnonzero(labels == c)[:per_class]]
    cam = GradCAM(nn_module=net, target_layers=gradcam_layer(net))
    with torch.enable_grad():
        heat = cam(images[cases].clone().requires_grad_(False))
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
        ax.imshow(h[0].detach(), cmap="jet", alpha=0.35)
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
        result = json.loads(done.read_text())
        result["val_auc_curve"], result["seconds_per_epoch"] = _validation_history(cell_dir, args)  # as new cells do
        return result
    settings = {**extra, "backbone": cell.backbone, "image_size": cell.image_size, "head": cell.head}
    common = {"cache_dir": str(Path(args.output_dir) / "cache"),  # shared: keys hold the preprocessing
              **settings, "dataset_dir": args.dataset_dir, "output_dir": str(cell_dir), "tracking_uri": args.tracking_uri,
              "experiment_name": args.experiment_name, "run_name": cell.name, "registered_model_name": "",
              "parent_run_id": parent_run_id, "n_folds": args.folds, "fold": cell.fold, "seed": args.seed}
    logger.info("cell %s", cell.name)
    timing = cell_dir / "train_seconds.txt"
    if latest_checkpoint(RunFolder(cell_dir).checkpoints)[1] < common.get("max_epochs", 30):
        start = time.perf_counter()
        run_workflow("train", **common)
        timing.write_text(str(time.perf_counter() - start))  # a resumed cell counts its last sitting only
    run_workflow("evaluate", **common, eval_split="validation")
    metrics = json.loads((cell_dir / RunFolder.EVAL / "metrics.json").read_text())
    net, images, labels, classes = load_cell(cell_dir, common["cache_dir"])
    shuffled = shuffle_auc(net, images, labels)
    diagnostics = cell_figure(net, images, labels, classes, cell_dir / RunFolder.EVAL / "diagnostics.png")
    curve, seconds_per_epoch = _validation_history(cell_dir, args)
    result = {**asdict(cell), "auc": metrics["auc"], "accuracy": metrics["accuracy"], "auc_shuffled": shuffled,
              "params": sum(p.numel() for p in net.parameters()), "head_params": sum(p.numel() for p in net.head.parameters()),
              "seconds_per_epoch": seconds_per_epoch, "val_auc_curve": curve,
              "train_seconds": float(timing.read_text()) if timing.is_file() else float("nan")}
    run_id = RunFolder(cell_dir).mlflow_run_id
    client = tracking.client(args.tracking_uri)
    client.log_metric(run_id, "eval_validation_auc_shuffled", shuffled)
    client.log_metric(run_id, "seconds_per_epoch", result["seconds_per_epoch"])
    client.log_artifact(run_id, str(diagnostics), "plots")
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(done)
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


def paired_difference(output: Path, cells: list[Cell], head: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over folds of AUC(head) - AUC(gap) on the same validation cases, with a paired bootstrap 95% CI.

    Each fold is a different trained model, so AUC is taken within a fold, then averaged: pooling the folds'
    predictions would rank one model's scores against another's, and a fold whose scores are merely shifted
    (ranked perfectly, badly calibrated) would lower the pooled AUC. The bootstrap resamples cases within each
    fold, the same cases for both heads; it covers case sampling, not retraining.
    """
    folds = []
    for c in cells:
        paths, labels, probs_h, _ = _read_cases(_cases_file(output, c, head))
        paths_g, labels_g, probs_g, _ = _read_cases(_cases_file(output, c, "gap"))
        if paths != paths_g or not np.array_equal(labels, labels_g):
            raise ValueError(f"{head} and gap were evaluated on different cases in fold {c.fold}")
        folds.append((labels, probs_h, probs_g))

    def mean_difference(indices: list[np.ndarray]) -> float:
        return float(np.mean([roc_auc(y[i], ph[i]) - roc_auc(y[i], pg[i]) for (y, ph, pg), i in zip(folds, indices)]))

    low, high = bootstrap_ci([y for y, _, _ in folds], mean_difference, n_boot, seed=seed)
    return mean_difference([np.arange(len(y)) for y, _, _ in folds]), low, high


def summarise(output: Path, results: list[dict], cells: list[Cell]) -> list[Path]:
    """Write summary.csv / summary.md and the plots; returns the files written."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["backbone"], r["image_size"], r["head"]), []).append(r)
    rows = []
    for (backbone, size, head), rs in groups.items():
        aucs, accs = [r["auc"] for r in rs], [r["accuracy"] for r in rs]
        row = {"backbone": backbone, "image_size": size, "head": head, "folds": len(rs),
               "auc_mean": statistics.mean(aucs), "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
               "accuracy_mean": statistics.mean(accs), "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "auc_shuffled_mean": statistics.mean(r["auc_shuffled"] for r in rs),
               "params": rs[0]["params"], "head_params": rs[0]["head_params"],
               "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in rs)}
        same = [c for c in cells if (c.backbone, c.image_size, c.head) == (backbone, size, head)]
        has_gap = all(_cases_file(output, c, "gap").is_file() for c in same)
        if head != "gap" and has_gap:
            row["auc_vs_gap"], row["auc_vs_gap_ci_low"], row["auc_vs_gap_ci_high"] = paired_difference(output, same, head)
        rows.append(row)
    fields = ["backbone", "image_size", "head", "folds", "auc_mean", "auc_sd", "accuracy_mean", "accuracy_sd",
              "auc_vs_gap", "auc_vs_gap_ci_low", "auc_vs_gap_ci_high", "auc_shuffled_mean", "params", "head_params",
              "seconds_per_epoch"]
    with open(output / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| backbone | size | head | folds | AUC mean ± sd | accuracy mean ± sd | ΔAUC vs gap [95% CI] | AUC, positions shuffled | params | head params | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = (f"{r['auc_vs_gap']:+.3f} [{r['auc_vs_gap_ci_low']:+.3f}, {r['auc_vs_gap_ci_high']:+.3f}]"
                 if "auc_vs_gap" in r else "—")
        lines.append(f"| {r['backbone']} | {r['image_size']} | {r['head']} | {r['folds']} | {r['auc_mean']:.3f} ± {r['auc_sd']:.3f} | "
                     f"{r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f} | {delta} | {r['auc_shuffled_mean']:.3f} | "
                     f"{r['params']:,} | {r['head_params']:,} | {r['seconds_per_epoch']:.1f} |")
    (output / "summary.md").write_text("\n".join(lines) + "\n")

    configs = sorted({(r["backbone"], r["image_size"]) for r in rows})
    fig, axes = figure(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (backbone, size) in zip(axes[0], configs):
        sub = [r for r in rows if (r["backbone"], r["image_size"]) == (backbone, size)]
        ax.errorbar(range(len(sub)), [r["auc_mean"] for r in sub], yerr=[1.96 * r["auc_sd"] / max(r["folds"], 1) ** 0.5 for r in sub],
                    fmt="o", capsize=4)
        ax.set_xticks(range(len(sub)), [r["head"] for r in sub], rotation=45, ha="right")
        ax.set(title=f"{backbone}, {size} px", ylabel="validation AUC (mean, 95% CI over folds)")
    fig.tight_layout()
    fig.savefig(output / "auc_by_head.png", dpi=110)
    fig, axes = figure(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (backbone, size) in zip(axes[0], configs):
        for head in sorted({r["head"] for r in results}):
            curves = [r["val_auc_curve"] for r in results if (r["backbone"], r["image_size"], r["head"]) == (backbone, size, head)]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], 0), label=head)
        ax.set(title=f"{backbone}, {size} px", xlabel="epoch", ylabel="validation AUC (mean over folds)")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment-name", default="wsr_med_ablation")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="bundle overrides for every cell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
    extra = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.dataset_dir == "synthetic":  # one generated folder for the whole study, not one per cell
        from wsr_med.data import synthetic_dataset

        args.dataset_dir = str(synthetic_dataset(**extra.pop("synthetic", {})))
    output = Path(args.output_dir)
    heads = ["gap"] + [h for h in args.heads if h != "gap"]  # the reference first
    cells = [Cell(b, s, h, f) for b, s, h, f in itertools.product(args.backbones, args.sizes, heads, range(args.folds))]
    client = tracking.client(args.tracking_uri)
    grid = {"dataset_dir": args.dataset_dir, "heads": heads, "backbones": args.backbones, "sizes": args.sizes,
            "folds": args.folds, "seed": args.seed, "overrides": extra}
    parent = _parent_run(client, args.experiment_name, output, grid)
    (output / "grid.json").write_text(json.dumps(grid, indent=1))  # the parent's params keep the first invocation's grid
    start = time.perf_counter()
    results = [run_cell(c, args, parent, extra) for c in cells]
    files = [output / "grid.json", *summarise(output, results, cells)]
    with tracking.tracking_uri_context(args.tracking_uri):
        for path in files:
            client.log_artifact(parent, str(path), "summary")
    print((output / "summary.md").read_text())
    print(f"study wall time this invocation: {time.perf_counter() - start:.0f} s; results in {output}")


if __name__ == "__main__":
    main()
