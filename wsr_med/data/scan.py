"""Find and check every scan of a dataset before training: hospital folders and CSV manifests.

Each file is decoded once here (in worker processes); files that cannot be used are reported
with the reason, in the log and in a CSV report, and left out, so that training never meets
them. Patient identifiers are only ever kept hashed.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import io
import logging
import os
import re
import secrets
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from wsr_med.data.csv_files import write_csv
from wsr_med.data.findings import is_label_file, read_label_file
from wsr_med.data.profile import scan_profile
from wsr_med.data.readers import MAX_PIXELS, ScanReadError, dicom_patient_id, read_scan, scan_format, suffix_of
from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write
from wsr_med.settings import default

__all__ = ["DatasetScan", "NoValidScans", "scan_folder", "scan_manifest", "hash_id", "DEFAULT_PATIENT_PATTERN"]

logger = logging.getLogger(__name__)

# Patient id from a file name when neither the manifest nor the DICOM header has one: the name
# without its trailing image counter, and any words just before it ("IM-0117-0001.jpeg" ->
# "IM-0117", "person12_virus_3.jpeg" -> "person12", "NORMAL2-IM-0383-0001" -> "NORMAL2-IM-0383").
# No match: every file is its own patient.
DEFAULT_PATIENT_PATTERN = default("patient_pattern")
_ID_SALT = "wsr_med/patient/v1"
MIN_SIDE = 16  # pixels: smaller images carry nothing a classifier can use


def id_key_file() -> Path:
    """Where this installation's pseudonym key lives: ``$XDG_CONFIG_HOME/wsr_med/id_key`` (``~/.config/...``)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "wsr_med" / "id_key"


@functools.lru_cache(maxsize=1)
def _id_key() -> bytes:
    """The secret behind patient pseudonyms: ``$WSR_MED_ID_KEY``, else :func:`id_key_file`, created at first use
    (32 random bytes, readable by its owner only). It is never logged or written into a run."""
    if os.environ.get("WSR_MED_ID_KEY"):
        return os.environ["WSR_MED_ID_KEY"].encode()
    path = id_key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # whole or absent (a full disk never leaves an empty key); two first uses at once: one key wins
            atomic_write(path, secrets.token_hex(32), exclusive=True, mode=0o600)
        except FileExistsError:
            pass
    key = path.read_text().strip()
    if not key:
        raise WsrMedError(f"{path} is empty: delete it (a new key is made) or set WSR_MED_ID_KEY")
    return key.encode()


def hash_id(value: str) -> str:
    """A stable pseudonym for a patient id: HMAC-SHA-256 with this installation's secret key, 16 hex digits.

    Without the key, a pseudonym cannot be turned back into an id by trying every id of a known format
    (``SEC-000000`` .. ``999999`` takes seconds against an unkeyed hash). The same key gives the same
    pseudonyms, so runs on one installation (or sharing ``WSR_MED_ID_KEY``) split patients alike.
    """
    # surrogateescape: an id taken from a non-UTF-8 file name hashes its original bytes
    return hmac.new(_id_key(), f"{_ID_SALT}:{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]


class NoValidScans(WsrMedError):
    """Every candidate file was rejected; ``scan`` holds the reasons (``scan.bad_files``)."""

    def __init__(self, message: str, scan: "DatasetScan"):
        super().__init__(message)
        self.scan = scan


@dataclass
class DatasetScan:
    """What a scan found. ``items`` are ``{"image": path relative to root, "label": int, "patient": hash, "sha1": ...}``;
    with ``multilabel``, ``classes`` are findings and ``label`` one value per finding (1.0, 0.0, None = masked)."""

    root: Path
    classes: list[str]
    items: list[dict] = field(default_factory=list)
    bad_files: list[dict] = field(default_factory=list)
    profiles: dict[str, dict] = field(default_factory=dict)  # image -> wsr_med.data.profile.scan_profile
    multilabel: bool = False

    def write_report(self, path: str | Path) -> Path:
        """Write the bad-file report (``file,reason``; paths relative to the dataset root)."""
        return write_csv(path, ["file", "reason"], [[row["file"], row["reason"]] for row in self.bad_files])

    @property
    def class_counts(self) -> dict[str, int]:
        """Scans per class; multi-label: scans in which each finding is present."""
        counts = {c: 0 for c in self.classes}
        for item in self.items:
            if "label" not in item:
                continue
            if self.multilabel:
                for c, value in zip(self.classes, item["label"]):
                    counts[c] += value == 1.0
            else:
                counts[self.classes[item["label"]]] += 1
        return counts


def degenerate_reason(image) -> str | None:
    """Why a decoded 2D scan ``(C, H, W)`` cannot be classified (constant, or smaller than :data:`MIN_SIDE`), or None."""
    height, width = image.shape[-2:]
    if min(height, width) < MIN_SIDE:
        return f"degenerate image ({height}x{width} pixels, below {MIN_SIDE} per side)"
    low, high = float(image.min()), float(image.max())
    if low == high:
        return f"constant image (every pixel {low:g})"
    return None


def _check_file(args: tuple[str, int, bool, int, list]) -> tuple[str | None, str | None, str | None, dict | None]:
    """Decode one file: returns ``(sha1, dicom patient id, error reason, profile)``."""
    path, spatial_dims, reject_degenerate, max_pixels, intensity_percentiles = args
    try:
        image, meta = read_scan(path, channels=None, spatial_dims=spatial_dims, max_pixels=max_pixels)
        reason = degenerate_reason(image) if reject_degenerate and spatial_dims == 2 else None
        if reason:
            return None, None, reason, None
        profile = scan_profile(image, meta, intensity_percentiles)
        del image
    except ScanReadError as e:
        return None, None, e.reason, None
    except Exception as e:  # a decoder bug must not stop the scan of thousands of files
        return None, None, ScanReadError(path, f"unexpected error while reading ({type(e).__name__}: {e})").reason, None
    digest = hashlib.sha1()
    if Path(path).is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:  # DICOM series folder: hash the file names and sizes
        for p in sorted(Path(path).rglob("*")):
            digest.update(f"{p.name}:{p.stat().st_size}".encode())
    patient = dicom_patient_id(path) if Path(path).is_file() and scan_format(path) == "dicom" else None
    return digest.hexdigest(), patient, None, profile


def _reason(path: Path) -> str:
    """Why ``path`` is not a scan (the reader's own words)."""
    try:
        read_scan(path)
    except ScanReadError as e:
        return e.reason
    return "not a scan"


def _patient_from_name(path: Path, pattern: str) -> str:
    stem = path.name[: -len(suffix_of(path))] if suffix_of(path) else path.name
    match = re.match(pattern, stem)
    return match.group(1) if match else str(path.parent / stem)


def _check_all(root: Path, candidates: list[dict], spatial_dims: int, num_workers: int, patient_pattern: str,
               scan: DatasetScan, reject_degenerate: bool, max_pixels: int, intensity_percentiles) -> None:
    """Decode each candidate; good ones go to ``scan.items`` with a hashed patient id, bad ones to the report."""
    jobs = [(str(root / c["image"]), spatial_dims, reject_degenerate, max_pixels, list(intensity_percentiles))
            for c in candidates]
    if num_workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            results = list(pool.map(_check_file, jobs, chunksize=8))
    else:
        results = [_check_file(job) for job in jobs]
    for candidate, (sha1, dicom_patient, reason, profile) in zip(candidates, results):
        if reason is not None:
            scan.bad_files.append({"file": candidate["image"], "reason": reason})
            logger.warning("skipping %s: %s", candidate["image"], reason)
            continue
        patient = candidate.pop("patient_id", None) or dicom_patient or _patient_from_name(Path(candidate["image"]), patient_pattern)
        scan.items.append({**candidate, "patient": hash_id(patient), "sha1": sha1})
        scan.profiles[candidate["image"]] = profile


def _finish(scan: DatasetScan, source: Path, report: str | Path | None) -> DatasetScan:
    """Write the bad-file report (first: it is the user's list of what to fix), then check that scans remain."""
    if report is not None:
        scan.write_report(report)
    if not scan.items:
        where = f"; the list is in {report}" if report is not None else ""
        raise NoValidScans(f"{source}: no valid scans found ({len(scan.bad_files)} files rejected{where}).", scan)
    if any("label" in item for item in scan.items):
        logger.info("%s: %d valid scans in %d %s %s, %d rejected", source, len(scan.items), len(scan.classes),
                    "findings (scans with each)" if scan.multilabel else "classes", scan.class_counts, len(scan.bad_files))
    else:  # unlabelled (inference): the model's classes say nothing about this folder
        logger.info("%s: %d valid scans, %d rejected", source, len(scan.items), len(scan.bad_files))
    return scan


def _is_scan_candidate(path: Path, spatial_dims: int) -> bool:
    if spatial_dims == 3 and path.is_dir():
        return any(p.is_file() for p in path.iterdir())
    return path.is_file()


def scan_folder(root: str | Path, spatial_dims: int = 2, num_workers: int = 2,
                patient_pattern: str = DEFAULT_PATIENT_PATTERN, classes: list[str] | None = None,
                labelled: bool = True, reject_degenerate: bool = True, report: str | Path | None = None,
                max_pixels: int = MAX_PIXELS, intensity_percentiles=default("intensity_percentiles")) -> DatasetScan:
    """Scan a hospital folder ``<root>/<class name>/**/<scan files>``; classes are the sorted folder names.

    Every file is decoded once (``num_workers`` processes). Unreadable, truncated, empty, pixel-less
    or unknown-extension files, empty class folders and files outside class folders are reported
    and skipped. For ``spatial_dims=3`` a scan is a NIfTI file or a folder holding one DICOM series.

    Args:
        classes: fix the class names and their order (e.g. a trained model's); folders with other
            names are reported and skipped.
        labelled: False scans every file under ``root`` without labels (inference).
        reject_degenerate: report constant images and images under :data:`MIN_SIDE` pixels as bad.
        report: write the bad-file report here (also when no valid scan remains).
        max_pixels: scans whose header declares more pixels are bad files (checked before decoding).
        intensity_percentiles: the run's intensity scaling, which each scan's profile is taken under.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, or no valid scan at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise WsrMedError(f"dataset folder not found: {root}")
    if not labelled:
        scan = DatasetScan(root, list(classes or []))
        class_dirs = [root]
    else:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise WsrMedError(f"{root}: no class folders; expected <root>/<class name>/<scan files>.")
        scan = DatasetScan(root, [p.name for p in class_dirs] if classes is None else list(classes))
        for p in class_dirs:
            if p.name not in scan.classes:
                scan.bad_files.append({"file": f"{p.name}/", "reason": f"class '{p.name}' not among {scan.classes}"})
        class_dirs = [p for p in class_dirs if p.name in scan.classes]
        for p in sorted(root.iterdir()):  # scans at the top level have no class; other files (a README) are fine
            kind = scan_format(p) if p.is_file() else None
            if kind == "dicomdir":
                scan.bad_files.append({"file": p.name, "reason": _reason(p)})
            elif kind is not None:
                scan.bad_files.append({"file": p.name, "reason": "not inside a class folder"})
    candidates = []
    for class_dir in class_dirs:
        if spatial_dims == 3:
            entries = [p for p in class_dir.iterdir() if _is_scan_candidate(p, 3) and not p.name.startswith(".")]
        else:
            entries = [p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
        if not entries:
            scan.bad_files.append({"file": f"{class_dir.name}/", "reason": "empty class folder"})
            logger.warning("class folder %s holds no files", class_dir.name)
        for p in sorted(entries):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and scan_format(p) in (None, "dicomdir"):
                scan.bad_files.append({"file": rel, "reason": _reason(p)})
                continue
            candidates.append({"image": rel, "label": scan.classes.index(class_dir.name)} if labelled else {"image": rel})
    _check_all(root, candidates, spatial_dims, num_workers, patient_pattern, scan, reject_degenerate, max_pixels,
               intensity_percentiles)
    return _finish(scan, root, report)


def _read_text(manifest: Path) -> str:
    """The manifest as text: UTF-8 (a BOM is fine); anything else is an error naming the line."""
    data = manifest.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise WsrMedError(f"{manifest}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
                          "save the manifest as UTF-8") from None


def scan_manifest(manifest: str | Path, spatial_dims: int = 2, num_workers: int = 2,
                  patient_pattern: str = DEFAULT_PATIENT_PATTERN, classes: list[str] | None = None,
                  reject_degenerate: bool = True, report: str | Path | None = None,
                  max_pixels: int = MAX_PIXELS, intensity_percentiles=default("intensity_percentiles"),
                  findings: list[str] | dict[str, str] | None = default("findings"),
                  uncertain: str = default("uncertain"), task: str = default("task")) -> DatasetScan:
    """Scan a CSV manifest ``path,label[,patient_id][,split]`` (paths relative to the CSV), or a multi-label file
    (NIH's ``Data_Entry_2017.csv`` or a CheXpert-style CSV, recognised by its header, or any manifest with
    ``task=multilabel``: :mod:`wsr_med.data.findings`, which ``findings`` and ``uncertain`` are passed to).

    Classes are the sorted distinct labels unless ``classes`` fixes their order. A ``split``
    column (``train``/``val``/``test``) is kept in the items and used by :func:`wsr_med.data.split_items`.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise WsrMedError(f"manifest not found: {manifest}")
    if is_label_file(manifest, task):
        labels = read_label_file(manifest, findings, uncertain)
        if classes is not None and list(classes) != labels.findings:
            raise WsrMedError(f"{manifest}: findings {labels.findings}, the model's are {list(classes)}")
        scan = DatasetScan(labels.root, labels.findings, multilabel=True)
        if labels.n_uncertain:
            logger.info("%s: %d uncertain labels, read as uncertain=%s", manifest, labels.n_uncertain, uncertain)
        _check_all(labels.root, labels.items, spatial_dims, num_workers, patient_pattern, scan, reject_degenerate,
                   max_pixels, intensity_percentiles)
        return _finish(scan, manifest, report)
    rows = list(csv.DictReader(io.StringIO(_read_text(manifest), newline="")))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise WsrMedError(f"{manifest}: a CSV with at least the columns 'path' and 'label' is expected.")
    labels = sorted({r["label"].strip() for r in rows}) if classes is None else list(classes)
    scan = DatasetScan(manifest.parent, labels)
    candidates = []
    for n, row in enumerate(rows, start=2):
        label = row["label"].strip()
        if label not in labels:
            scan.bad_files.append({"file": row["path"], "reason": f"line {n}: label '{label}' not among {labels}"})
            continue
        candidate = {"image": row["path"].strip(), "label": labels.index(label)}
        if (row.get("patient_id") or "").strip():
            candidate["patient_id"] = row["patient_id"].strip()
        if (row.get("split") or "").strip():
            candidate["split"] = row["split"].strip().lower()
        candidates.append(candidate)
    _check_all(manifest.parent, candidates, spatial_dims, num_workers, patient_pattern, scan, reject_degenerate, max_pixels,
               intensity_percentiles)
    return _finish(scan, manifest, report)
