"""Wall time of one ablation grid run cell after cell and run by several workers at once, as a ratio in one run.

    wsr-med bench workers                 # a 4-cell small grid (gap, wise x 2 folds), --workers 1 then --workers 2
    wsr-med bench workers --workers 4 --heads gap wise flatten gem --epochs 2

Each variant runs ``wsr-med ablate`` in a fresh process, into its own temporary study folder and MLflow
store, on the same generated data; the variants alternate when ``--repeats`` > 1 and the median is kept.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["backbone_kwargs={'init_features':8,'growth_rate':4,'block_config':[1,1,1,1]}",
         "batch_size=8", "num_workers=0", "progress_bar=False", "learning_rate=0.01"]


def study_seconds(home: Path, name: str, workers: int, heads: list[str], folds: int, epochs: int) -> float:
    """Wall time of ``wsr-med ablate --workers N`` on ``home/data``, from process start to exit."""
    argv = [sys.executable, "-m", "wsr_med.cli", "ablate", "--dataset-dir", "data", "--output-dir", name,
            "--tracking-uri", f"sqlite:///{name}.db", "--heads", *heads, "--sizes", "96", "--folds", str(folds),
            "--workers", str(workers), "--set", *SMALL, f"max_epochs={epochs}"]
    start = time.perf_counter()
    with open(home / f"{name}.log", "w") as log:
        result = subprocess.run(argv, cwd=home, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"wsr-med ablate --workers {workers} failed; see {home / f'{name}.log'}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--heads", nargs="+", default=["gap", "wise"])
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per cell")
    parser.add_argument("--n-per-class", type=int, default=40, help="generated scans per class")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    from wsr_med.data import make_synthetic_folder

    cells = len(args.heads) * args.folds
    with tempfile.TemporaryDirectory(prefix="wsr_med_bench_workers_") as tmp:
        home = Path(tmp)
        make_synthetic_folder(home / "data", n_per_class=args.n_per_class, image_size=96, n_classes=2)
        times: dict[int, list[float]] = {1: [], args.workers: []}
        for r in range(args.repeats):
            for workers in ((1, args.workers) if r % 2 == 0 else (args.workers, 1)):
                times[workers].append(study_seconds(home, f"w{workers}_r{r}", workers, args.heads, args.folds, args.epochs))
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    print(f"{os.cpu_count()} CPU cores; a {cells}-cell grid ({args.n_per_class} scans per class at 96 px, a reduced "
          f"DenseNet, {args.epochs} epochs per cell), median of {args.repeats}\n")
    print("| workers | wall s | vs 1 worker |\n|---|---|---|")
    print(f"| 1 | {one:.1f} | 1.000 |\n| {args.workers} | {many:.1f} | {many / one:.3f} |")


if __name__ == "__main__":
    main()
