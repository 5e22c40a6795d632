"""The study's grid: its cells, its overrides, its lock and its MLflow parent run."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write

__all__ = ["Cell", "check_study_overrides", "overrides_id", "parent_run", "parse_shard", "study_lock"]


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


def parent_run(client, experiment_name: str, output: Path, grid: dict) -> str:
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


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (1 <= i <= N) -> ``(i, N)``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/N, e.g. 1/4; got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"--shard {text}: i must be between 1 and N")
    return i, n
