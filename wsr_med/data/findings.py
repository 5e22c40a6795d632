"""Multi-label label files, as chest radiograph datasets ship them: several findings per image, some uncertain.

Two layouts are recognised from their header, with no setting:

* **NIH ChestX-ray14** (``Data_Entry_2017.csv`` as downloaded): ``Image Index,Finding Labels,Follow-up #,Patient
  ID,...``; findings joined by ``|``, ``No Finding`` = none; images in ``images/`` beside the CSV, or beside it.
* **CheXpert-style**: a path column (``Path`` or ``path``), optionally a patient column (``Patient``, ``Patient ID``
  or ``patient_id``) and a ``split`` column, and one column per finding holding ``1`` (present), ``0`` (absent),
  ``-1`` (uncertain) or blank (not mentioned, read as absent). Columns of other values (``Sex``, ``Age``,
  ``Frontal/Lateral``, ``AP/PA``) are metadata. Paths are relative to the CSV's folder, or to its parent (CheXpert
  as shipped: ``CheXpert-v1.0/train/patient00001/...`` beside ``CheXpert-v1.0/train.csv``).

A finding's label is 1.0, 0.0 or None (masked out of the loss and the metrics: ``uncertain=ignore``). Uncertain
labels follow ``uncertain``: ``ignore`` (U-Ignore), ``zeros`` (U-Zeros, the default) or ``ones`` (U-Ones).
Any other CSV with a ``path`` and a ``label`` column is multi-label when ``task=multilabel``: the findings of a scan
are its label's ``|``-joined names (blank or ``No Finding`` = none), as in NIH's file.

``findings`` picks and orders the finding columns (``["Edema", "Effusion"]``) or renames them
(``{"Pleural Effusion": "effusion"}``). A value that is none of these is an error naming its line and column.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from wsr_med.errors import WsrMedError

__all__ = ["UNCERTAIN", "LabelFile", "is_label_file", "read_label_file"]

UNCERTAIN = ("ignore", "zeros", "ones")  # the values of the ``uncertain`` setting (CheXpert's U-Ignore/U-Zeros/U-Ones)
NIH_COLUMNS = ("Image Index", "Finding Labels")
NO_FINDING = "No Finding"
PATH_COLUMNS = ("Path", "path")
PATIENT_COLUMNS = ("Patient", "Patient ID", "patient_id")
_CODES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": 0.0}
_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


@dataclass
class LabelFile:
    """The rows of a multi-label file: ``items`` as ``{"image": path relative to root, "label": [1.0 | 0.0 | None, ...],
    "patient_id"?: str, "split"?: str}``, one label per finding in ``findings`` order."""

    root: Path
    findings: list[str]
    layout: str  # "nih" or "chexpert"
    items: list[dict] = field(default_factory=list)
    n_uncertain: int = 0


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    from wsr_med.data.scan import _read_text

    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = list(reader)
    return [c for c in (reader.fieldnames or []) if c], rows


def is_label_file(path: str | Path, task: str = "auto") -> bool:
    """Whether ``path`` is a multi-label CSV: by its header alone (``task=auto``), or any CSV with ``task=multilabel``.

    Raises:
        WsrMedError: ``task=multiclass`` on a file whose header is a multi-label layout.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    if task == "multilabel":
        return True
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f), [])
    layout = set(NIH_COLUMNS) <= set(header) or (any(c in header for c in PATH_COLUMNS) and "label" not in header)
    if layout and task == "multiclass":
        raise WsrMedError(f"{path} is a multi-label file (several findings per scan), and task=multiclass asks for one "
                          "class per scan: leave task out, or give a path,label manifest")
    return layout


def _pick(findings: list[str], chosen: list[str] | dict[str, str] | None, where: Path) -> tuple[list[str], list[str]]:
    """(columns, names): the finding columns to read and what to call them."""
    if chosen is None:
        return findings, findings
    columns = list(chosen)
    missing = [c for c in columns if c not in findings]
    if missing:
        raise WsrMedError(f"{where}: findings {missing} are not among the file's findings {findings}")
    return columns, [chosen[c] for c in columns] if isinstance(chosen, dict) else columns


def _uncertain_value(uncertain: str) -> float | None:
    if uncertain not in UNCERTAIN:
        raise WsrMedError(f"uncertain={uncertain!r} is not one of: {', '.join(UNCERTAIN)}")
    return {"ignore": None, "zeros": 0.0, "ones": 1.0}[uncertain]


def read_label_file(path: str | Path, findings: list[str] | dict[str, str] | None = None,
                    uncertain: str = "zeros") -> LabelFile:
    """Read an NIH or CheXpert-style label file (see the module docstring).

    Raises:
        WsrMedError: not one of the layouts; a value that is no label (naming line and column); unknown findings.
    """
    path = Path(path)
    columns, rows = _rows(path)
    as_uncertain = _uncertain_value(uncertain)
    if set(NIH_COLUMNS) <= set(columns):
        return _read_nih(path, rows, findings)
    if {"path", "label"} <= set(columns):  # task=multilabel on a manifest: findings joined by "|" in the label
        return _read_joined(path, rows, findings)
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise WsrMedError(f"{path}: neither an NIH label file ('Image Index', 'Finding Labels') nor a CheXpert-style "
                          f"one (a 'Path' column and one column per finding)")
    patient_column = next((c for c in PATIENT_COLUMNS if c in columns), None)
    candidates = [c for c in columns if c not in (path_column, patient_column, "split")]
    found = [c for c in candidates if _is_finding_column(c, rows)]
    if findings is not None:  # a chosen column is read as a finding whatever its values, so a typo is an error
        found = [c for c in candidates if c in found or c in list(findings)]
    if not found:
        raise WsrMedError(f"{path}: no finding columns (columns of 1, 0, -1 or blank) besides {path_column!r}")
    columns, names = _pick(found, findings, path)
    out = LabelFile(_image_root(path, [r[path_column] for r in rows[:20]]), names, "chexpert")
    for n, row in enumerate(rows, start=2):
        label = []
        for column in columns:
            value = (row.get(column) or "").strip()
            if value not in _CODES:
                raise WsrMedError(f"{path}: line {n}, column {column!r}: {value[:40]!r} is not a label "
                                  "(1 present, 0 absent, -1 uncertain, blank not mentioned)")
            code = _CODES[value]
            if code < 0:
                out.n_uncertain += 1
                label.append(as_uncertain)
            else:
                label.append(code)
        item = {"image": row[path_column].strip(), "label": label}
        patient = (row.get(patient_column) or "").strip() if patient_column else ""
        patient = patient or _chexpert_patient(item["image"])
        if patient:
            item["patient_id"] = patient
        if (row.get("split") or "").strip():
            item["split"] = row["split"].strip().lower()
        out.items.append(item)
    return out


def _is_finding_column(column: str, rows: list[dict]) -> bool:
    """Mostly -1/0/1 codes (a stray value makes it an error later, not metadata), and at least one code set."""
    values = [(r.get(column) or "").strip() for r in rows]
    given = [v for v in values if v]
    return bool(given) and sum(v in _CODES for v in given) >= 0.95 * len(given)


def _chexpert_patient(image: str) -> str:
    match = _CHEXPERT_PATIENT.search(image)
    return match.group(1) if match else ""


def _image_root(path: Path, images: list[str]) -> Path:
    """The folder the image paths are relative to: the CSV's, or its parent's (CheXpert as shipped)."""
    for root in (path.parent, path.parent.parent):
        if images and all((root / i.strip()).exists() for i in images if i.strip()):
            return root
    return path.parent


def _joined(path: Path, rows: list[dict], column: str, blank_is_none: bool) -> list[list[str]]:
    """Each row's findings from ``|``-joined names in ``column`` (``No Finding`` = none)."""
    present = []
    for n, row in enumerate(rows, start=2):
        names = [f.strip() for f in (row[column] or "").split("|") if f.strip()]
        if not names and not blank_is_none:
            raise WsrMedError(f"{path}: line {n}, column {column!r}: empty (write '{NO_FINDING}' for none)")
        present.append([f for f in names if f != NO_FINDING])
    return present


def _read_joined(path: Path, rows: list[dict], findings: list[str] | dict[str, str] | None) -> LabelFile:
    present = _joined(path, rows, "label", blank_is_none=True)
    columns, names = _pick(sorted({f for found in present for f in found}), findings, path)
    out = LabelFile(path.parent, names, "joined")
    for row, found in zip(rows, present):
        item = {"image": row["path"].strip(), "label": [1.0 if c in found else 0.0 for c in columns]}
        for key in ("patient_id", "split"):
            if (row.get(key) or "").strip():
                item[key] = row[key].strip().lower() if key == "split" else row[key].strip()
        out.items.append(item)
    return out


def _read_nih(path: Path, rows: list[dict], findings: list[str] | dict[str, str] | None) -> LabelFile:
    present = _joined(path, rows, "Finding Labels", blank_is_none=False)
    all_findings = sorted({f for names in present for f in names})
    columns, names = _pick(all_findings, findings, path)
    root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    out = LabelFile(root, names, "nih")
    for row, found in zip(rows, present):
        item = {"image": row["Image Index"].strip(), "label": [1.0 if c in found else 0.0 for c in columns]}
        if (row.get("Patient ID") or "").strip():
            item["patient_id"] = row["Patient ID"].strip()
        out.items.append(item)
    return out
