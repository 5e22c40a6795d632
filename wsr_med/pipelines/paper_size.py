"""The paper-size study, prepared for one short GPU call: DenseNet121 at 224 and 512 px on the 3-class chest task,
GAP against Wise-SrNet, 5 patient-level folds x 3 seeds, the ablation's protocol (inner validation picks the checkpoint)
and the CPU studies' recipe (learning rate 1e-3), one cell per GPU at a time (``--workers``).

    wsr-med ablate-paper --warm-cache-only     # on any machine first: decode and cache every scan at both sizes
    wsr-med ablate-paper                       # then on the GPU machine (CUDA + mixed precision by themselves)
    wsr-med ablate-paper --tiny --dataset-dir data/hospital --output-dir runs/paper_tiny   # the same path on a CPU, small

The cache (``<output-dir>/cache``, keyed by file content and preprocessing) is filled before any cell trains, so
GPU time is spent training; the study resumes like every ablation. ``--max-epochs`` sizes it to the time lent.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from wsr_med.pipelines import ablation

CHEST_3CLASS = "../shared/data/chest_xray_pneumonia/labels_3class.csv"
LEARNING_RATE = 0.001  # the recipe of the CPU studies in docs/results.md, so that the two compare
TINY = {"sizes": [64], "folds": 2, "settings": ["backbone_kwargs={'init_features':8,'growth_rate':4,'block_config':[1,1,1,1]}",
                                                 "batch_size=8", "num_workers=0", "val_fraction=0.5"]}


def warm_cache(dataset_dir: str, output_dir: Path, sizes: list[int], settings: dict) -> float:
    """Decode and preprocess every scan once per size into the study's shared cache; returns the seconds it took."""
    from wsr_med.workflows import parse_bundle

    start = time.perf_counter()
    for size in sizes:
        parser = parse_bundle("train", **{**settings, "image_size": size, "dataset_dir": dataset_dir,
                                          "output_dir": str(output_dir / "warm_cache"), "cache_dir": str(output_dir / "cache"),
                                          "tracking_uri": "none", "n_folds": 2, "fold": 0})  # any split: every scan is cached
        data = parser.get_parsed_content("data")
        for key in ("train#dataset", "validate#dataset"):  # each caches the part of its transform before augmentation
            dataset = parser.get_parsed_content(key)
            dataset.data = data.training + data.validation
            for i in range(len(dataset)):
                dataset[i]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default=CHEST_3CLASS)
    parser.add_argument("--output-dir", default="runs/ablation_paper_size")
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="a small network at 64 px, 2 folds: the same path on a CPU")
    parser.add_argument("--warm-cache-only", action="store_true", help="fill the cache, train nothing")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="as the CPU studies: 3 seeds")
    parser.add_argument("--workers", type=int, default=max(1, torch.cuda.device_count()),
                        help="cells at once, a GPU each (default: one per GPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = TINY["sizes"] if args.tiny else [224, 512]
    folds = TINY["folds"] if args.tiny else 5
    settings = [*(TINY["settings"] if args.tiny else ["batch_size=16", "num_workers=8"]), f"max_epochs={args.max_epochs}",
                f"learning_rate={LEARNING_RATE}", "progress_bar=False"]
    from wsr_med.workflows.bundle import parse_overrides

    output = Path(args.output_dir)
    seconds = warm_cache(args.dataset_dir, output, sizes,
                         {k: v for k, v in parse_overrides(settings).items() if k != "max_epochs"})
    print(f"cache warm in {seconds:.0f} s ({output / 'cache'})")
    if args.warm_cache_only:
        return
    ablation.main(["--dataset-dir", args.dataset_dir, "--output-dir", str(output), "--heads", "gap", "wise",
                   "--backbones", "densenet121", "--sizes", *map(str, sizes), "--folds", str(folds),
                   "--seeds", *map(str, args.seeds), "--workers", str(args.workers),
                   *(["--tracking-uri", args.tracking_uri] if args.tracking_uri else []), "--set", *settings])


if __name__ == "__main__":
    main()
