"""Cells run N at a time, a process each (a GPU each where there are GPUs)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import queue
from pathlib import Path

import torch

from wsr_med.pipelines.ablation.cells import CELL_RESULT, run_cell
from wsr_med.pipelines.ablation.grid import Cell

__all__ = ["run_in_workers"]

logger = logging.getLogger("wsr_med.ablation")


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
        if (Path(args.output_dir) / cell.name / CELL_RESULT).is_file():
            continue
        kind, info = outcome.get(cell.name, ("not run", None))
        failed[cell.name] = (info if kind == "failed" else
                             f"its worker process ended (exit code {exit_codes.get(info)}) during the cell" if kind == "started"
                             else "not run: every worker process ended before it")
    return failed
