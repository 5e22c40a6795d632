"""``wsr-med ablate``: the grid's cells in this process, in workers or in a shard, then the summary."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from wsr_med import tracking
from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write
from wsr_med.networks import backbone_label
from wsr_med.pipelines.ablation.cells import finished_results, run_cell
from wsr_med.pipelines.ablation.grid import Cell, check_study_overrides, overrides_id, parent_run, parse_shard, study_lock
from wsr_med.pipelines.ablation.summary import summarise
from wsr_med.pipelines.ablation.workers import run_in_workers
from wsr_med.workflows.bundle import check_overrides, parse_overrides

__all__ = ["main"]

logger = logging.getLogger("wsr_med.ablation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=sys.modules['wsr_med.pipelines.ablation'].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        parent = parent_run(client, args.experiment_name, output, grid)
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
