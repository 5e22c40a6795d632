"""The prepared GPU check: large-scan memory and speed, and the bundle's loop against a bare loop, in one short call.

    wsr-med bench gpu --append docs/benchmarks.md     # on a GPU machine: ~6 minutes on one card
    wsr-med bench gpu --tiny                          # the same path on the CPU with a reduced network (a test)

1. ``wsr-med bench memory`` rows: DenseNet121 and EfficientNet-b0 at 512, 1024 and 2048 px, batch 4, with and
   without checkpointing, autocast on (bfloat16 where the card supports it), channels-last.
2. ``wsr-med bench train`` at 512 px, batch 16: the bundle's loop (disk cache, then memory cache with GPU
   augmentation) against a bare loop over tensors on the GPU.

The tables are printed and, with ``--append``, added to that Markdown file under a heading with the card's name
and the date, so that every number says which card gave it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import time
from pathlib import Path

import torch

from wsr_med.pipelines import bench_memory, bench_train

TINY_NET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--append", type=Path, help="a Markdown file to add the results to (e.g. docs/benchmarks.md)")
    parser.add_argument("--tiny", action="store_true", help="a reduced DenseNet at 64-128 px: checks the path on any machine")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    if args.tiny:
        memory_rows = [("densenet121", 128, TINY_NET)]
        train_args = ["--size", "64", "--images", "16", "--batch", "8", "--epochs", "2", "--num-workers", "0",
                      "--backbone-kwargs", json.dumps(TINY_NET), "--cache", "disk", "memory"]
    else:
        memory_rows = [(b, s, None) for b in ("densenet121", "efficientnet-b0") for s in (512, 1024, 2048)]
        train_args = ["--size", "512", "--images", "256", "--batch", "16", "--epochs", "3",
                      "--cache", "disk", "memory"]
    lines = [f"torch {torch.__version__}, {card}" + (f", autocast {bench_memory.amp_dtype()}" if device == "cuda" else ""),
             "", "Training memory and speed, batch 4, with and without checkpointing (`wsr-med bench memory`):", "",
             bench_memory.HEADER]
    print("\n".join(lines), flush=True)
    for backbone, size, kwargs in memory_rows:
        lines.append(bench_memory.row(bench_memory.bench(backbone, size, 4, 3, device, kwargs)))
        print(lines[-1], flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_train.main(train_args)
    table = [line for line in out.getvalue().splitlines() if line.startswith("|") or line.startswith("densenet")]
    lines += ["", "The bundle's training loop against a bare loop on the same model (`wsr-med bench train`):", "", *table]
    print("\n".join(table), flush=True)
    wall = time.perf_counter() - start
    lines += ["", f"Wall time of the check: {wall:.0f} s."]
    if args.append:
        heading = f"\n## GPU check: {card}, {datetime.date.today().isoformat()} (`wsr-med bench gpu`)\n\n"
        with open(args.append, "a") as f:
            f.write(heading + "\n".join(lines) + "\n")
        print(f"appended to {args.append}")
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
