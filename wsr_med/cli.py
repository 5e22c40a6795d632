"""``wsr-med``: the bundle's workflows for people who do not write MONAI configs.

    wsr-med demo                                   # the main job on generated data: train, evaluate, predict, MLflow
    wsr-med synth data/hospital --n-per-class 200  # write a synthetic hospital folder
    wsr-med synth data/findings --multilabel       # a multi-label set: NIH and CheXpert-style label files
    wsr-med train --dataset-dir data/hospital --output-dir runs/a --set image_size=512 max_epochs=50
    wsr-med train --output-dir runs/a --set max_epochs=80          # continue a run with its own settings
    wsr-med evaluate --output-dir runs/a --dataset-dir data/other_hospital
    wsr-med predict --output-dir runs/a --dataset-dir data/unlabelled
    wsr-med predict --output-dir runs/a --dicomweb URL --query Modality=CR   # studies of a PACS -> DICOM SRs back in them
    wsr-med ablate --dataset-dir data/hospital --heads gap wise --sizes 224 512 --folds 5 --seeds 0 1 2
    wsr-med ablate ... --workers 4 | --shard 2/8  # cells at once (one GPU each), or this machine's share of the grid
    wsr-med ablate-paper                           # DenseNet121 at 224/512 px, gap vs wise: the study for a GPU
    wsr-med bench heads | io | batchnorm | serve | memory | train | workers | gpu | pacs   # benchmarks (docs/benchmarks.md)
    wsr-med export-bundle --output-dir runs/a --bundle-dir bundles/chest_v1   # a model-zoo bundle of a trained run
    wsr-med bundle-path                            # the installed MONAI bundle, for python -m monai.bundle run
    wsr-med serve -m models:/wsr_med-left-right/1  # the registered model over HTTP (bytes in; --path-root DIR for paths)

Every workflow command runs ``monai.bundle run`` on the bundle with the options as overrides, so
``wsr-med train ...`` and the equivalent ``python -m monai.bundle run`` command do the same thing.
Evaluate and predict take the network and preprocessing settings from the run folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import warnings
from pathlib import Path

from wsr_med.errors import find_user_error
from wsr_med.log_format import EscapingFormatter, escape_control
from wsr_med.pacs.archive import Bounds
from wsr_med.runs import RunFolder
from wsr_med.settings import PACS_SETTINGS, SETTINGS, check_known, default
from wsr_med.workflows.bundle import BUNDLE, parse_overrides, run_workflow

__all__ = ["main"]

# A short run that shows the whole pipeline in minutes on a laptop CPU.
DEMO_SETTINGS = {
    "image_size": 128,
    "backbone_kwargs": {"init_features": 16, "growth_rate": 8, "block_config": [2, 2, 2, 2]},
    "max_epochs": 8,
    "batch_size": 16,
    "learning_rate": 0.001,
    "synthetic": {"n_per_class": 150, "image_size": 256, "n_classes": 2, "seed": 1234},
}
RESULTS = [(RunFolder.MODEL, "best model weights"), (RunFolder.CLASSES, "class map"), (RunFolder.CONFIG, "resolved config"),
           (RunFolder.DATALIST, "patient-level split"), (RunFolder.BAD_FILES, "skipped files"),
           (f"{RunFolder.EVAL}/report.html", "evaluation report"), (f"{RunFolder.EVAL}/metrics.json", "evaluation metrics"),
           (RunFolder.PREDICTIONS, "predictions")]


def _overrides(args: argparse.Namespace) -> dict:
    """The settings a command's flags (``--dataset-dir``, ...) and ``--set KEY=VALUE`` give."""
    flags = {name: value for name, value in vars(args).items() if name in SETTINGS and value is not None}
    return {**flags, **parse_overrides(args.set)}


def _print_results(output_dir: str, tracking_uri: str | None = None) -> None:
    from wsr_med.tracking import default_tracking_uri, enabled

    out = Path(output_dir)
    print("\nResults:")
    for name, what in RESULTS:
        if (out / name).exists():
            print(f"  {what:22s} {out / name}")
    uri = tracking_uri or default_tracking_uri()
    if enabled(uri):
        print(f"\nMLflow: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")


def train(args: argparse.Namespace) -> None:
    """Train; in a folder that holds a run, continue it with the run's own settings (overrides on top)."""
    overrides = _overrides(args)
    output = overrides.setdefault("output_dir", default("output_dir"))
    folder = RunFolder(output)
    if (folder / RunFolder.CONFIG).is_file():
        saved = folder.continuation_settings()
        print(f"{output} holds a run: continuing it with its own settings")
        overrides = {**saved, **overrides}
    run_workflow("train", args.bundle, **overrides)
    _print_results(output, args.tracking_uri)


def _next_demo_folder(first: str = "runs/demo") -> str:
    """``runs/demo``, or, when an earlier demo is there, the first of ``runs/demo-2``, ``runs/demo-3``, ... that is free:
    the quick start can be run again (each run a folder of its own; the generated data is reused)."""
    folder, n = first, 1
    while (Path(folder) / RunFolder.CONFIG).exists():
        n += 1
        folder = f"{first}-{n}"
    if n > 1:
        print(f"{first} holds an earlier demo: this one goes to {folder}")
    return folder


def demo(args: argparse.Namespace) -> None:
    """Train on the embedded synthetic hospital folder (or --dataset-dir), evaluate on held-out patients, predict new scans."""
    from wsr_med.data import make_synthetic_folder

    settings = {**DEMO_SETTINGS, "dataset_dir": "synthetic", "output_dir": _next_demo_folder(), **_overrides(args)}
    output = settings["output_dir"]
    common = {k: settings[k] for k in ("output_dir", "tracking_uri") if k in settings}
    print(f"[1/3] training on {settings['dataset_dir']} -> {output}")
    run_workflow("train", args.bundle, **settings)
    print("[2/3] evaluating on the held-out test patients")
    run_workflow("evaluate", args.bundle, **common, dataset_dir=settings["dataset_dir"], eval_split="test")
    unlabelled = Path(output) / "new_scans"
    if not unlabelled.exists():  # one flat folder with neutral names: nothing in a path gives the class away
        labelled = make_synthetic_folder(Path(output) / ".new_scans_labelled", n_per_class=10, image_size=256, n_classes=2, seed=99)
        unlabelled.mkdir(parents=True)
        for n, scan in enumerate(sorted(p for p in labelled.rglob("*") if p.is_file())):
            scan.rename(unlabelled / f"scan_{n:03d}{scan.suffix}")
        shutil.rmtree(labelled)
    print(f"[3/3] predicting the scans in {unlabelled}")
    run_workflow("inference", args.bundle, **common, dataset_dir=str(unlabelled))
    _print_results(output, args.tracking_uri)


def _to_dicom(args: argparse.Namespace) -> bool:
    """Whether a predict writes DICOM results (from or to a PACS) rather than running the bundle's inference."""
    return args.command == "predict" and any((args.dicomweb, args.sr_dir, args.store_to, args.c_store))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def predict_pacs(args: argparse.Namespace) -> None:
    """``wsr-med predict --dicomweb URL ...`` / ``--dataset-dir DICOM_FOLDER --sr-dir DIR``: classify studies and store
    a DICOM SR per result (:func:`wsr_med.pacs.classify_studies`)."""
    from wsr_med.errors import WsrMedError
    from wsr_med.pacs import CStoreDestination, DicomFolder, DicomWebArchive, FolderDestination, classify_studies

    settings = _overrides(args)
    output = settings.get("output_dir") or default("output_dir")
    check_known(settings)
    unknown = sorted(set(settings) - set(PACS_SETTINGS))
    if unknown:
        raise WsrMedError(f"{', '.join(unknown)}: not a setting of predict from or to a PACS (it takes "
                          f"{', '.join(PACS_SETTINGS)})")
    if bool(args.dicomweb) == bool(args.dataset_dir):
        raise WsrMedError("give the images with either --dicomweb URL (an archive) or --dataset-dir DIR (a DICOM folder)")
    if args.dicomweb and not (args.study or args.query):
        raise WsrMedError("say which studies: --study UID (repeatable) or --query KEY=VALUE ...")
    if sum(map(bool, (args.sr_dir, args.store_to, args.c_store))) > 1:
        raise WsrMedError("give one destination: --sr-dir, --store-to or --c-store")
    query = {}
    for item in args.query:  # kept as text: QIDO-RS matches strings (StudyDate=20260101-20261231)
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise WsrMedError(f"--query expects KEY=VALUE, got {item!r}")
        query[key] = value
    if not args.archive_timeout > 0:
        raise WsrMedError("--archive-timeout must be a positive number of seconds")
    bounds = Bounds(deadline_s=args.archive_timeout)
    if args.dicomweb:
        source = DicomWebArchive(args.dicomweb, args.auth_file, bounds=bounds)
    else:
        source = DicomFolder(args.dataset_dir, bounds)
    destination = (FolderDestination(args.sr_dir) if args.sr_dir
                   else DicomWebArchive(args.store_to, args.auth_file, bounds=bounds, option="--store-to")
                   if args.store_to else CStoreDestination(args.c_store) if args.c_store else source
                   if args.dicomweb else None)
    if destination is None:
        raise WsrMedError("nowhere to store the SRs of a DICOM folder: give --sr-dir DIR, --store-to URL or --c-store")
    summary = classify_studies(output, source, destination, studies=args.study, query=query, select=args.select,
                               codes=args.codes, predictions_file=args.predictions_file, heatmaps=args.heatmaps,
                               batch_size=int(settings.get("batch_size") or default("batch_size")),
                               device=settings.get("device") or ("cuda" if _cuda() else "cpu"),
                               max_pixels=settings.get("max_pixels"),
                               store_unlike_training=args.store_unlike_training, bounds=bounds)
    predictions, skipped = summary.files
    unlike = f" ({summary.unlike} unlike the training data)" if summary.unlike else ""
    print(f"{len(summary.rows)} classified{unlike}, {summary.stored} results stored, {summary.already} already there, "
          f"{len(summary.skipped)} skipped -> {predictions}, {skipped}")
    if summary.failed:
        study, why, _ = summary.failed[0]
        again = "run the same command again to complete them" if any(t for _, _, t in summary.failed) \
            else f"listed in {skipped.name}"
        raise WsrMedError(f"{len(summary.failed)} of {summary.n_studies} studies not done ({why}): {again}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsr-med", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def workflow_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dataset-dir", help="class-per-folder directory, CSV manifest, or 'synthetic'")
        p.add_argument("--output-dir", help="run folder (checkpoints, model, reports)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the current folder)")
        p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="other config overrides, e.g. image_size=512 head=gap")
        p.add_argument("--bundle-root", dest="bundle", type=Path, default=BUNDLE, help="another bundle's folder")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
        return p

    workflow_parser("train", "train a model; in a folder that holds a run, resume or continue it (raise max_epochs)")
    ev = workflow_parser("evaluate", "evaluate a trained model on labelled scans")
    ev.add_argument("--eval-split", choices=["all", "test", "validation"], help="'all' of --dataset-dir (default) or a split of the run")
    pr = workflow_parser("predict", "predict unlabelled scans: a CSV with one probability per class")
    pr.add_argument("--predictions-file", help="default: <output-dir>/predictions.csv (from or to a PACS: "
                    "<output-dir>/pacs_predictions.csv)")
    pacs = pr.add_argument_group("from and to a PACS (README 'From and to a PACS')")
    pacs.add_argument("--dicomweb", metavar="URL", help="classify studies of this DICOMweb archive (QIDO-RS, WADO-RS); "
                      "results go back into each study with STOW-RS. Credentials: $WSR_MED_DICOMWEB_AUTH or --auth-file")
    pacs.add_argument("--study", action="append", default=[], metavar="UID", help="a StudyInstanceUID (repeatable)")
    pacs.add_argument("--query", nargs="+", default=[], metavar="KEY=VALUE",
                      help="QIDO-RS study filters, e.g. Modality=CR StudyDate=20260101-20261231")
    pacs.add_argument("--select", metavar="RULES.json", help="which instances to classify (default: the training "
                      "profile's modalities)")
    pacs.add_argument("--codes", metavar="CODES.json", help="class name -> code (e.g. SNOMED CT) for the SRs")
    pacs.add_argument("--sr-dir", metavar="DIR", help="write the SRs to this folder instead (also for a DICOM folder "
                      "given with --dataset-dir)")
    pacs.add_argument("--store-to", metavar="URL", help="store the SRs in this other DICOMweb archive (STOW-RS)")
    pacs.add_argument("--c-store", metavar="AE@HOST:PORT", help="send the SRs to this DICOM application entity")
    pacs.add_argument("--heatmaps", action="store_true", help="also store a Grad-CAM overlay per image (a Secondary "
                      "Capture marked NOT FOR DIAGNOSTIC USE)")
    pacs.add_argument("--auth-file", metavar="FILE", help="a file holding the archive's 'user:password' or "
                      "'Bearer <token>' (never on the command line)")
    pacs.add_argument("--store-unlike-training", action="store_true", help="also store results for images that look "
                      "unlike the training data (default: classified and listed, not stored; their SRs then say so)")
    pacs.add_argument("--archive-timeout", type=float, default=Bounds.deadline_s, metavar="SECONDS",
                      help=f"each archive request's whole answer within this time (default {Bounds.deadline_s:g})")
    workflow_parser("demo", "the main job on generated data: train, evaluate, predict, log to MLflow")
    sy = sub.add_parser("synth", help="write a synthetic hospital folder (class = lesion position)")
    sy.add_argument("root")
    sy.add_argument("--n-per-class", type=int, default=100)
    sy.add_argument("--image-size", type=int, default=256)
    sy.add_argument("--classes", type=int, default=2)
    sy.add_argument("--formats", nargs="+", default=["dcm", "png"])
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--multilabel", action="store_true",
                    help="four findings, each at its own place, 0 to 4 per image: images/ with NIH's Data_Entry_2017.csv "
                         "and a CheXpert-style chexpert.csv (1/0/-1 uncertain/blank); --n-per-class counts images")
    sub.add_parser("ablate", help="ablation study: heads x backbones x sizes x folds x seeds (wsr-med ablate --help)", add_help=False)
    sub.add_parser("ablate-paper", help="the paper-size study for a GPU: DenseNet121, 224/512 px, gap vs wise "
                   "(wsr-med ablate-paper --help)", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks: 'heads' (speed/memory per head), 'io' (reading scans), "
                           "'batchnorm' (eval-mode outputs after a short training), 'serve' (REST vs in-process), "
                           "'memory' (large scans with and without checkpointing), 'train' (bundle loop vs bare loop), "
                           "'workers' (an ablation grid in parallel), 'gpu' (the prepared GPU check), 'pacs' (archive -> SR vs predict on disk)",
                           add_help=False)
    bench.add_argument("which", choices=["heads", "io", "batchnorm", "serve", "memory", "train", "workers", "gpu", "pacs"])
    ex = sub.add_parser("export-bundle", help="turn a trained run folder into a self-contained MONAI model-zoo bundle")
    ex.add_argument("--output-dir", required=True, help="the trained run folder")
    ex.add_argument("--bundle-dir", required=True, help="the new bundle folder (must not exist)")
    ex.add_argument("--version", default="1.0.0", help="the bundle's version (default 1.0.0)")
    ex.add_argument("--data-license", help="a text file with the training data's licence (docs/data_license.txt)")
    ex.add_argument("--name", help="the bundle's name (default: from the run name)")
    sub.add_parser("bundle-path", help="print the folder of the installed MONAI bundle")
    sv = sub.add_parser("serve", help="serve a registered model over HTTP: MLflow's scoring server (/invocations), "
                        "with request limits and, only if asked, paths under --path-root")
    sv.add_argument("-m", "--model-uri", required=True, help="e.g. models:/wsr_med-left-right/1")
    sv.add_argument("--tracking-uri", help="the MLflow store the model is registered in (default: MLFLOW_TRACKING_URI, "
                    "else mlflow.db in the current folder)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=5001)
    sv.add_argument("--workers", type=int, default=1, help="server processes (each holds the model)")
    sv.add_argument("--path-root", action="append", default=[], metavar="DIR",
                    help="a folder whose scans clients may name by path (repeatable); without it, bytes only")
    sv.add_argument("--max-rows", type=int, help="rows per request (default 64)")
    sv.add_argument("--max-request-mib", type=float, help="MiB of scans per request, all rows together (default 64); "
                    "a larger body is refused before it is read")
    sv.add_argument("--timeout", type=int, help="seconds per request (default 60); rows still waiting at 0.8 of it "
                    "answer 'timeout'")
    return parser


def _run(args: argparse.Namespace, rest: list[str]) -> None:
    if args.command == "synth":
        from wsr_med.data import make_multilabel_folder, make_synthetic_folder

        if args.multilabel:
            root = make_multilabel_folder(args.root, args.n_per_class, args.image_size, seed=args.seed)
            print(f"synthetic multi-label set written to {root}: labels in {root / 'Data_Entry_2017.csv'} (NIH) and "
                  f"{root / 'chexpert.csv'} (CheXpert-style)")
        else:
            root = make_synthetic_folder(args.root, args.n_per_class, args.image_size, args.classes, tuple(args.formats),
                                         args.seed)
            print(f"synthetic hospital folder written to {root}")
    elif args.command == "ablate":
        from wsr_med.pipelines import ablation

        ablation.main(rest)
    elif args.command == "ablate-paper":
        from wsr_med.pipelines import paper_size

        paper_size.main(rest)
    elif args.command == "bench":
        import importlib

        importlib.import_module(f"wsr_med.pipelines.bench_{args.which}").main(rest)
    elif args.command == "bundle-path":
        print(BUNDLE)
    elif args.command == "serve":
        import mlflow

        from wsr_med.tracking import default_tracking_uri
        from wsr_med.workflows.serving import serve

        mlflow.set_tracking_uri(args.tracking_uri or default_tracking_uri())
        serve(args.model_uri, args.host, args.port, args.workers, args.path_root, args.max_rows, args.max_request_mib,
              args.timeout)
    elif args.command == "export-bundle":
        from wsr_med.workflows.export import export_bundle

        bundle = export_bundle(args.output_dir, args.bundle_dir, args.version, args.data_license, args.name)
        print(f"bundle written to {bundle}; run it from there: python -m monai.bundle run --config_file "
              "configs/inference.json --dataset_dir <scans>")
    elif args.command == "demo":
        demo(args)
    elif args.command == "train":
        train(args)
    elif _to_dicom(args):
        predict_pacs(args)
    else:
        workflow = {"evaluate": "evaluate", "predict": "inference"}[args.command]
        overrides = _overrides(args)
        # the run folder train wrote by default (inference.json on its own reads the bundle's models/)
        output = overrides.setdefault("output_dir", default("output_dir"))
        run_workflow(workflow, args.bundle, **overrides)
        _print_results(output, args.tracking_uri)


def _stop_quietly_on_signals() -> None:
    """Ctrl-C and SIGTERM stop any command the same way: no error records or tracebacks from ignite and MONAI on the way
    out (:func:`wsr_med.log_format.quiet_stop`), then the one line :func:`main` prints. A training's MLflow tracker
    marks its run KILLED first and then calls these."""
    import signal

    from wsr_med.log_format import quiet_stop

    def interrupt(signum, frame):
        quiet_stop()
        raise KeyboardInterrupt

    def terminate(signum, frame):
        quiet_stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, terminate)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("ablate", "ablate-paper", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # MONAI warns that bundle configs are evaluated: this command only runs its own (or --bundle-root's) configs
    warnings.filterwarnings("ignore", message=r"parsing config_file .*", category=UserWarning)
    if args.command in ("train", "evaluate", "predict", "demo") and not _to_dicom(args):
        from wsr_med.tracking import default_tracking_uri

        uri = getattr(args, "tracking_uri", None) or default_tracking_uri()
        print(f"MLflow tracking store: {uri} (--tracking-uri or MLFLOW_TRACKING_URI pin it; the default follows the "
              "current folder; --tracking-uri none turns tracking off)", file=sys.stderr)
    _stop_quietly_on_signals()
    try:
        _run(args, rest)
    except (KeyboardInterrupt, SystemExit) as e:
        code = 130 if isinstance(e, KeyboardInterrupt) else e.code
        if code not in (130, 143):  # not a stop by Ctrl-C / SIGTERM (see MLflowTracker): exit as asked
            raise
        resume = " (the run resumes from its last completed epoch: run the same command again)" if args.command == "train" else ""
        print(f"wsr-med {args.command}: stopped by {'Ctrl-C' if code == 130 else 'SIGTERM'}{resume}", file=sys.stderr)
        return code
    except Exception as e:
        error = find_user_error(e)
        if error is None or args.debug:
            raise
        logging.getLogger("wsr_med").debug("traceback", exc_info=True)
        print(f"wsr-med {args.command}: error: {escape_control(str(error))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
