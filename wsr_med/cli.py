"""``wsr-med``: the bundle's workflows for people who do not write MONAI configs.

    wsr-med demo                                   # the main job on generated data: train, evaluate, predict, MLflow
    wsr-med synth data/hospital --n-per-class 200  # write a synthetic hospital folder
    wsr-med train --dataset-dir data/hospital --output-dir runs/a --set image_size=512 max_epochs=50
    wsr-med evaluate --output-dir runs/a --dataset-dir data/other_hospital
    wsr-med predict --output-dir runs/a --dataset-dir data/unlabelled

Every command runs ``monai.bundle run`` on ``bundles/wise_srnet_classification`` with the
options as overrides, so ``wsr-med train ...`` and the equivalent ``python -m monai.bundle run``
command do the same thing.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path

from wsr_med.workflows.bundle import BUNDLE, run_workflow

__all__ = ["main"]

# A short run that shows the whole pipeline in minutes on a laptop CPU.
DEMO_SETTINGS = {
    "image_size": 128,
    "backbone_kwargs": {"init_features": 16, "growth_rate": 8, "block_config": [2, 2, 2, 2]},
    "max_epochs": 8,
    "batch_size": 16,
    "learning_rate": 0.001,
    "test_fraction": 0.2,
    "synthetic": {"n_per_class": 150, "image_size": 256, "n_classes": 2, "seed": 1234},
}


def parse_value(text: str):
    """Parse an override value as JSON / a Python literal, else keep the string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    for name in ("dataset_dir", "output_dir", "tracking_uri", "eval_split", "predictions_file"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key] = parse_value(value)
    return out


def _print_results(output_dir: str, tracking_uri: str | None = None) -> None:
    out = Path(output_dir)
    print("\nResults:")
    for name, what in [("model.pt", "best model weights"), ("classes.json", "class map"), ("config.json", "resolved config"),
                       ("datalist.json", "patient-level split"), ("bad_files.csv", "skipped files"),
                       ("eval/report.html", "evaluation report"), ("eval/metrics.json", "evaluation metrics"),
                       ("predictions.csv", "predictions")]:
        if (out / name).exists():
            print(f"  {what:22s} {out / name}")
    uri = tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    print(f"\nMLflow: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")


def demo(args: argparse.Namespace) -> None:
    """Train on the embedded synthetic hospital folder, evaluate on its held-out patients, predict on a new folder."""
    from wsr_med.data import make_synthetic_folder

    output = args.output_dir or "runs/demo"
    common = {"output_dir": output, **({"tracking_uri": args.tracking_uri} if args.tracking_uri else {})}
    settings = {**DEMO_SETTINGS, **_overrides(args), **common}
    print(f"[1/3] training on the synthetic hospital folder -> {output}")
    run_workflow("train", dataset_dir="synthetic", **settings)
    print("[2/3] evaluating on the held-out test patients")
    run_workflow("evaluate", eval_split="test", **settings)
    unlabelled = Path(output) / "new_scans"
    if not unlabelled.exists():
        make_synthetic_folder(unlabelled, n_per_class=10, image_size=256, n_classes=2, seed=99)
    print(f"[3/3] predicting the scans in {unlabelled}")
    run_workflow("inference", **{**settings, "dataset_dir": str(unlabelled)})
    _print_results(output, args.tracking_uri)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wsr-med", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def workflow_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dataset-dir", help="class-per-folder directory, CSV manifest, or 'synthetic'")
        p.add_argument("--output-dir", help="run folder (checkpoints, model, reports)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the current folder)")
        p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="other config overrides, e.g. image_size=512 head=gap")
        p.add_argument("--bundle-root", type=Path, default=BUNDLE)
        return p

    workflow_parser("train", "train a model (resumes an interrupted run in the same output dir)")
    ev = workflow_parser("evaluate", "evaluate a trained model on labelled scans")
    ev.add_argument("--eval-split", choices=["all", "test", "validation"], help="'all' of --dataset-dir (default) or a split of the run")
    pr = workflow_parser("predict", "predict unlabelled scans: a CSV with one probability per class")
    pr.add_argument("--predictions-file", help="default: <output-dir>/predictions.csv")
    workflow_parser("demo", "the main job on generated data: train, evaluate, predict, log to MLflow")
    sy = sub.add_parser("synth", help="write a synthetic hospital folder (class = lesion position)")
    sy.add_argument("root")
    sy.add_argument("--n-per-class", type=int, default=100)
    sy.add_argument("--image-size", type=int, default=256)
    sy.add_argument("--classes", type=int, default=2)
    sy.add_argument("--formats", nargs="+", default=["dcm", "png"])
    sy.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "synth":
        from wsr_med.data import make_synthetic_folder

        root = make_synthetic_folder(args.root, args.n_per_class, args.image_size, args.classes, tuple(args.formats), args.seed)
        print(f"synthetic hospital folder written to {root}")
    elif args.command == "demo":
        demo(args)
    else:
        workflow = {"train": "train", "evaluate": "evaluate", "predict": "inference"}[args.command]
        overrides = _overrides(args)
        run_workflow(workflow, args.bundle_root, **overrides)
        _print_results(overrides.get("output_dir", "runs/wise_srnet"), args.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
