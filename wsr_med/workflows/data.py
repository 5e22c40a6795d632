"""Turn a dataset location into the split items of a run; ``write()`` saves the datalist and the bad-file report.

Scanning only reads: building a workflow (MONAI apps do it to check a bundle's properties) writes
nothing. The workflow's ``run`` calls ``write()`` once its checks have passed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsr_med.data import DatasetScan, read_datalist, scan_folder, scan_manifest, split_items, synthetic_dataset, write_datalist
from wsr_med.data.findings import is_label_file, read_label_file
from wsr_med.data.profile import training_profile, unlike_training
from wsr_med.data.readers import MAX_PIXELS
from wsr_med.data.scan import DEFAULT_PATIENT_PATTERN, NoValidScans
from wsr_med.data.synthetic import SIDES
from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write
from wsr_med.runs import RunFolder, check_writable
from wsr_med.workflows.model import TrainedModel
from wsr_med.settings import CLASS_BALANCE, TASKS, default

__all__ = ["SYNTHETIC", "PreparedData", "check_trainable", "imbalance_warning", "class_names", "prepare_data", "prepare_evaluation",
           "prepare_unlabelled"]

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"  # dataset_dir value for the embedded synthetic hospital folder


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def class_names(dataset_dir: str, synthetic_classes: int = 2, findings: list[str] | dict[str, str] | None = None,
                task: str = default("task")) -> list[str]:
    """The class names of a dataset without decoding anything: folder names, manifest labels or the synthetic sides;
    for a multi-label file, its findings (as ``findings`` picks or renames them)."""
    if task not in TASKS:
        raise WsrMedError(f"task={task!r} is not one of: {', '.join(TASKS)}")
    if dataset_dir == SYNTHETIC:
        return list(SIDES[:synthetic_classes])
    path = Path(dataset_dir)
    if is_label_file(path, task):  # multi-label: the findings
        return read_label_file(path, findings).findings
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="") as f:
            return sorted({row["label"].strip() for row in csv.DictReader(f)})
    if not path.is_dir():
        raise WsrMedError(f"dataset_dir not found: {path} (a class-per-folder directory, a CSV manifest, or 'synthetic')")
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class PreparedData:
    """The scanned, split dataset of a run; items carry absolute image paths. ``multilabel``: ``classes`` are findings
    and each label has one value per finding (:mod:`wsr_med.data.findings`)."""

    classes: list[str]
    training: list[dict]
    validation: list[dict]
    test: list[dict]
    datalist: Path | None = None
    bad_files_report: Path | None = None
    n_bad_files: int = 0
    multilabel: bool = False
    _writer: Callable[[], None] | None = field(default=None, repr=False)

    def write(self) -> None:
        """Save what the scan found (datalist, bad-file report, training profile) on rank 0; once."""
        if self._writer is not None and _rank() == 0:
            self._writer()
        self._writer = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loss(self, class_balance: str = "none", device: torch.device | str = "cpu") -> torch.nn.Module:
        """The training loss: cross-entropy (class weights with ``weighted_loss``); multi-label, a binary cross-entropy
        per finding with masked labels left out (a per-finding ``pos_weight`` with ``weighted_loss``)."""
        if not self.multilabel:
            return torch.nn.CrossEntropyLoss(weight=self.class_weights(class_balance, device))
        from wsr_med.workflows.losses import MaskedBCEWithLogitsLoss, finding_pos_weight

        weight = finding_pos_weight([i["label"] for i in self.training]) if class_balance == "weighted_loss" else None
        return MaskedBCEWithLogitsLoss(weight).to(device)

    def class_weights(self, class_balance: str = "none", device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Inverse-frequency loss weights (mean 1) for ``class_balance="weighted_loss"``, else None."""
        if class_balance != "weighted_loss":
            return None
        counts = np.bincount([i["label"] for i in self.training], minlength=self.num_classes).astype(float)
        weights = counts.sum() / np.maximum(counts, 1) / self.num_classes
        return torch.tensor(weights, dtype=torch.float32, device=device)

    def sampler(self, class_balance: str = "none", seed: int = 0) -> torch.utils.data.Sampler | None:
        """A class-balanced ``WeightedRandomSampler`` for ``class_balance="sampler"``, else None."""
        if class_balance not in CLASS_BALANCE:
            raise WsrMedError(f"class_balance must be one of {', '.join(CLASS_BALANCE)}, got '{class_balance}'")
        if class_balance != "sampler":
            return None
        if self.multilabel:
            raise WsrMedError(MULTILABEL_SAMPLER)
        labels = np.array([i["label"] for i in self.training])
        per_item = 1.0 / np.bincount(labels, minlength=self.num_classes)[labels]
        return torch.utils.data.WeightedRandomSampler(per_item.tolist(), len(labels), generator=torch.Generator().manual_seed(seed))


def _absolute(scan: DatasetScan, items: list[dict]) -> list[dict]:
    return [{**i, "image": str(scan.root / i["image"]), "relative_path": i["image"]} for i in items]


def _scan(dataset_dir: str, classes: list[str] | None, report: Path, labelled: bool = True, fail_on_run: bool = False,
          **options) -> DatasetScan | PreparedData:
    """Scan a folder or manifest, writing nothing. When every file is rejected the bad-file report (the user's
    list of what to fix) is written to ``report`` before the error.

    ``fail_on_run``: for evaluation and inference, whose workflows MONAI apps (and the model zoo's checks)
    build without data: a missing folder, or one without a valid scan, returns data that writes the report
    and raises the error when the workflow runs (in ``write()``), not when it is built.
    """
    labels = {key: options.pop(key, default(key)) for key in ("findings", "uncertain", "task")}
    try:
        if labelled and Path(dataset_dir).suffix.lower() == ".csv":
            return scan_manifest(dataset_dir, classes=classes, **options, **labels)
        return scan_folder(dataset_dir, classes=classes, labelled=labelled, **options)
    except NoValidScans as e:
        scan, error = e.scan, WsrMedError(f"{str(e).rstrip('.')}; the list is in {report}).")
    except WsrMedError as e:
        if not fail_on_run:
            raise
        scan, error = None, e

    def fail() -> None:
        if scan is not None:
            scan.write_report(report)
        raise error

    if not fail_on_run:
        if _rank() == 0:
            fail()
        raise error
    return PreparedData(classes=list(classes or []), training=[], validation=[], test=[], bad_files_report=report,
                        _writer=fail)


IMBALANCE_RATIO = 2.0  # largest class / smallest class above which class_balance=none is warned about


def imbalance_warning(counts: dict[str, int], class_balance: str = "none") -> str | None:
    """A warning when the largest class has more than :data:`IMBALANCE_RATIO` times the scans of the smallest
    and nothing balances them, else None."""
    smallest, largest = min(counts.values()), max(counts.values())
    if class_balance != "none" or largest <= IMBALANCE_RATIO * max(smallest, 1):
        return None
    return (f"the classes are imbalanced ({', '.join(f'{c}: {n}' for c, n in counts.items())}; the largest has "
            f"{largest / max(smallest, 1):.1f}x the scans of the smallest) and class_balance=none: the small classes "
            "may never be predicted. Set class_balance=weighted_loss (or sampler), and read the per-class "
            "sensitivity in the evaluation report.")


def _same_split(datalist: Path, splits: dict[str, list[dict]]) -> bool:
    """Whether ``datalist`` holds the same items (content hash, label, patient) in the same splits."""
    def key(items: list[dict]) -> list:
        return sorted((i["image"], i.get("sha1"), i["label"], i["patient"]) for i in items)

    saved = json.loads(datalist.read_text())
    return all(key(saved.get(k, [])) == key(v) for k, v in splits.items())


def prepare_data(
    dataset_dir: str,
    output_dir: str,
    spatial_dims: int = 2,
    val_fraction: float = default("val_fraction"),
    test_fraction: float = default("test_fraction"),
    n_folds: int = 0,
    fold: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    classes: list[str] | None = None,
    split: str = "train",
    synthetic: dict | None = None,
    patient_pattern: str = DEFAULT_PATIENT_PATTERN,
    reject_degenerate: bool = True,
    class_balance: str = "none",
    max_pixels: int = MAX_PIXELS,
    intensity_percentiles: list[float] = default("intensity_percentiles"),
    findings: list[str] | dict[str, str] | None = default("findings"),
    uncertain: str = default("uncertain"),
    task: str = default("task"),
    compare_with: str | None = None,
    inner_validation: bool = False,
) -> PreparedData:
    """Scan ``dataset_dir`` and split it at the patient level; :meth:`PreparedData.write` then saves
    ``datalist.json``, ``bad_files.csv`` and ``profile.json`` in ``output_dir``.

    A run that continues in ``output_dir`` keeps its ``datalist.json``: the new scan must give the same
    split, or ``write()`` refuses the run (the data changed under it).

    Args:
        dataset_dir: a class-per-folder directory, a CSV manifest, or ``synthetic``.
        output_dir: the run's folder (``split="all"``: the evaluation's folder).
        spatial_dims: 2 for images, 3 for volumes (NIfTI files or DICOM series folders).
        val_fraction, test_fraction, n_folds, fold, seed, inner_validation: the split, see :func:`wsr_med.data.split_items`.
        num_workers: processes that decode files during the scan.
        classes: fix the class names (evaluation on another folder with a trained model's classes).
        split: ``train`` splits the data; ``all`` puts every scan in ``test`` (evaluation of a whole folder).
        synthetic: options of :func:`wsr_med.data.synthetic_dataset` for ``dataset_dir=synthetic``.
        patient_pattern: regular expression whose first group is the patient id in a file name, used when
            neither the manifest nor the DICOM header gives one (see :data:`wsr_med.data.scan.DEFAULT_PATIENT_PATTERN`).
        reject_degenerate: report constant and tiny images as bad files.
        class_balance: the run's setting; an imbalanced training set with ``none`` is warned about.
        max_pixels: scans declaring more pixels are bad files.
        intensity_percentiles: the run's intensity scaling (the scans' profiles are taken under it).
        findings, uncertain: for a multi-label file, the finding columns to read and how uncertain labels count
            (:func:`wsr_med.data.findings.read_label_file`).
        task: ``auto`` (multi-label for the layouts :func:`wsr_med.data.findings.is_label_file` recognises),
            ``multilabel`` (also a ``path,label`` manifest with ``|``-joined findings) or ``multiclass``.
        compare_with: a trained run folder: every item gets ``unlike_training``, why it looks unlike that
            run's training data ("" when it does not), see :mod:`wsr_med.data.profile`.
    """
    output = Path(output_dir)
    if str(dataset_dir) == SYNTHETIC:
        dataset_dir = str(synthetic_dataset(**dict(synthetic or {})))
    prefix = "" if split == "train" else RunFolder.EVAL_PREFIX
    datalist = output / f"{prefix}{RunFolder.DATALIST}"
    report = output / f"{prefix}{RunFolder.BAD_FILES}"
    options = {"spatial_dims": spatial_dims, "num_workers": num_workers, "patient_pattern": patient_pattern,
               "reject_degenerate": reject_degenerate, "max_pixels": max_pixels,
               "intensity_percentiles": intensity_percentiles, "findings": findings, "uncertain": uncertain, "task": task}
    scan = _scan(dataset_dir, classes, report, fail_on_run=split == "all", **options)
    if isinstance(scan, PreparedData):
        return scan
    if split == "all":
        splits = {"training": [], "validation": [], "test": scan.items}
    elif split == "train":
        splits = split_items(scan.items, val_fraction, test_fraction, seed, n_folds, fold, inner_validation)
        if scan.multilabel:
            check_findings(dataset_dir, scan.classes, splits, class_balance)
        else:
            check_trainable(dataset_dir, scan.classes, splits)
        imbalance = None if scan.multilabel else imbalance_warning(scan.class_counts, class_balance)
        if imbalance and _rank() == 0:
            logger.warning("%s", imbalance)
    else:
        raise ValueError(f"split must be 'train' or 'all', got '{split}'")
    settings = {"dataset_dir": str(dataset_dir), "seed": seed, "val_fraction": val_fraction,
                "test_fraction": test_fraction, "n_folds": n_folds, "fold": fold, "inner_validation": inner_validation,
                "split": split}

    def write() -> None:
        if split == "train" and datalist.is_file():  # a continued run keeps its files, and its data
            if not _same_split(datalist, splits):
                raise WsrMedError(f"{dataset_dir} no longer gives the split this run in {output} was trained on "
                                  f"(files added, removed or changed); use another output_dir for the new data.")
            return
        scan.write_report(report)
        write_datalist(datalist, scan, splits, **settings)
        if split == "train":
            profile = training_profile([scan.profiles[i["image"]] for i in splits["training"]])
            atomic_write(output / RunFolder.PROFILE, json.dumps(profile, indent=1))

    if compare_with is not None:
        _flag_unlike_training(scan, compare_with)
        if scan.bad_files:
            logger.warning("%d files skipped; see %s", len(scan.bad_files), report)
    return PreparedData(
        classes=scan.classes,
        training=_absolute(scan, splits["training"]),
        validation=_absolute(scan, splits["validation"]),
        test=_absolute(scan, splits["test"]),
        datalist=datalist,
        bad_files_report=report,
        n_bad_files=len(scan.bad_files),
        multilabel=scan.multilabel,
        _writer=write,
    )


MULTILABEL_SAMPLER = ("class_balance=sampler balances classes, and a multi-label scan has several findings: use "
                      "class_balance=weighted_loss (a positive weight per finding)")
FEW_POSITIVES = 5  # positives of a finding in a split below which its AUC and operating point there mean little


def check_findings(dataset_dir: str, findings: list[str], splits: dict[str, list[dict]], class_balance: str = "none") -> None:
    """Multi-label splits: refuse an empty training or validation split, a finding with no positive in training and the
    class-balancing sampler; warn, naming them, about findings with fewer than :data:`FEW_POSITIVES` positives in any
    split."""
    if class_balance == "sampler":
        raise WsrMedError(MULTILABEL_SAMPLER)
    for name in ("training", "validation"):
        if not splits[name]:
            raise WsrMedError(f"{dataset_dir}: the {name} split has no scans: add patients, or change val_fraction / "
                              "test_fraction / n_folds")
    few = []
    for name, items in splits.items():
        if not items:
            continue
        positives = [sum(i["label"][k] == 1.0 for i in items) for k in range(len(findings))]
        absent = [f for f, n in zip(findings, positives) if n == 0]
        if name == "training" and absent:
            raise WsrMedError(f"{dataset_dir}: no training scan has {', '.join(absent)}; a model cannot learn a finding it "
                              "never sees: add scans with it, or leave it out with the findings setting")
        few += [f"{f} ({n} in {name})" for f, n in zip(findings, positives) if n < FEW_POSITIVES]
    if few and _rank() == 0:
        logger.warning("%s: fewer than %d positives of %s: their AUC and operating point there rest on very few scans",
                       dataset_dir, FEW_POSITIVES, ", ".join(few))


def check_trainable(dataset_dir: str, classes: list[str], splits: dict[str, list[dict]]) -> None:
    """Refuse, at scan time (before the run folder holds anything and before an MLflow run exists), data that cannot
    train: fewer than two classes with scans, an empty training or validation split, a class without a training scan;
    one line each, saying what to do. A class missing from the validation or
    test split (small data) is a warning: its AUC there is undefined, and calibration is skipped."""
    present = sorted({classes[i["label"]] for items in splits.values() for i in items})
    if len(present) < 2:
        raise WsrMedError(f"{dataset_dir}: scans of {len(present)} class(es) ({', '.join(present) or 'none'}); training "
                          "needs two or more: a class-per-folder directory has one folder of scans per class, a manifest "
                          "a label column with two values or more")
    for name, items in splits.items():
        if not items and name == "test":
            continue
        absent = [c for k, c in enumerate(classes) if not any(i["label"] == k for i in items)]
        what = "no scans" if not items else f"no scan of {', '.join(repr(c) for c in absent)}"
        message = f"{dataset_dir}: the {name} split has {what} ({len(items)} scans)"
        if not items or (absent and name == "training"):
            raise WsrMedError(f"{message}: add scans (patients) of that class, or change val_fraction / test_fraction / n_folds")
        if absent and _rank() == 0:
            logger.warning("%s: its AUC there is undefined for that class; more patients would help", message)


def _flag_unlike_training(scan: DatasetScan, run_dir: str) -> None:
    """Give each item ``unlike_training`` (why it looks unlike the run's training data, or ""); log a summary."""
    trained = RunFolder(run_dir).training_profile()
    for item in scan.items:
        item["unlike_training"] = unlike_training(scan.profiles[item["image"]], trained) if trained else ""
    unusual = [i for i in scan.items if i["unlike_training"]]
    if unusual:
        logger.warning("%d of %d scans look unlike the training data (e.g. %s: %s); the model's answers on them are "
                       "not to be trusted. See the unlike_training column.", len(unusual), len(scan.items),
                       unusual[0]["image"], unusual[0]["unlike_training"])


def prepare_unlabelled(dataset_dir: str, model: TrainedModel, predictions_file: str | Path | None = None,
                       num_workers: int = 2, reject_degenerate: bool = True, max_pixels: int = MAX_PIXELS) -> PreparedData:
    """Every readable scan under ``dataset_dir`` (recursively, no labels) for inference by ``model``.

    Unreadable files are reported in ``<predictions_file stem>_bad_files.csv`` beside the predictions (default: the
    run folder's ``predictions.csv``; written even when no readable scan remains); each item says whether it looks
    unlike the run's training data (``unlike_training``).
    """
    predictions_file = Path(predictions_file or model.run.predictions)
    check_writable(predictions_file.parent)
    report = predictions_file.with_name(predictions_file.stem + "_bad_files.csv")
    scan = _scan(dataset_dir, model.classes, report, labelled=False, fail_on_run=True,
                 spatial_dims=model.settings["spatial_dims"], num_workers=num_workers, reject_degenerate=reject_degenerate,
                 max_pixels=max_pixels, intensity_percentiles=model.settings["intensity_percentiles"])
    if isinstance(scan, PreparedData):
        return scan
    _flag_unlike_training(scan, model.run.path)
    items = [{"image": str(scan.root / i["image"]), "relative_path": i["image"],
              "unlike_training": i.get("unlike_training", "")} for i in scan.items]
    return PreparedData(classes=list(model.classes), training=[], validation=[], test=items, bad_files_report=report,
                        multilabel=model.multilabel,
                        n_bad_files=len(scan.bad_files), _writer=lambda: scan.write_report(report))


def prepare_evaluation(dataset_dir: str, model: TrainedModel, eval_dir: str | Path | None = None, eval_split: str = "all",
                       **kwargs) -> PreparedData:
    """The labelled cases to evaluate ``model`` on, in ``test``.

    Args:
        dataset_dir: a labelled folder or manifest (``eval_split="all"``: every readable scan in it).
        model: the trained model; its run folder's ``datalist.json`` gives ``eval_split="test"`` or ``"validation"``,
            its classes must match the folder names or labels.
        eval_dir: where the evaluation writes its datalist and bad-file report (default: the run's ``eval/``).
        kwargs: scan options of :func:`prepare_data` (``num_workers``, ``patient_pattern``, ``reject_degenerate``,
            ``max_pixels``).
    """
    eval_dir = eval_dir or model.run.eval_dir
    check_writable(eval_dir)
    if model.multilabel:  # a multi-label model reads its labels as findings, whatever the layout, picked as in training
        kwargs["task"] = "multilabel"
        if kwargs.get("findings") is None:
            kwargs["findings"] = model.run.settings().get("findings")
    run_dir, classes = model.run.path, model.classes
    if eval_split == "all":
        return prepare_data(dataset_dir, eval_dir, classes=classes, split="all", compare_with=run_dir,
                            spatial_dims=model.settings["spatial_dims"],
                            intensity_percentiles=model.settings["intensity_percentiles"], **kwargs)
    key = {"test": "test", "validation": "validation"}.get(eval_split)
    if key is None:
        raise WsrMedError(f"eval_split must be all, test or validation, got '{eval_split}'")
    datalist = RunFolder(run_dir) / RunFolder.DATALIST
    items = read_datalist(datalist, key)
    if not items:
        raise WsrMedError(f"the run in {run_dir} has no '{key}' split (it was trained with test_fraction=0); evaluate a "
                          "labelled folder instead: --dataset-dir DIR --eval-split all")
    return PreparedData(classes=list(classes), training=[], validation=[], test=items, datalist=datalist,
                        multilabel=model.multilabel)
