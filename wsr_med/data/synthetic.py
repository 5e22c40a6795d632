"""A synthetic hospital folder whose class depends only on WHERE a lesion lies.

The default task separates heads that keep spatial information from GAP: one small blob lies
just beside the image centre, inside the central third, on the side that gives the class
(``left``/``right``, then ``above``/``below`` for 3-4 classes); three identical distractor blobs
lie anywhere outside the central third. A network must know where the central blob is relative
to the centre line; what it looks like says nothing.

Scans are written as DICOM (16-bit DX, MONOCHROME2 or MONOCHROME1 with a rescale) and PNG (8 or
16 bit) with made-up patient identifiers (several images per patient), so the whole data path
(readers, polarity, patient-level splits, identifier hashing) runs on them.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import zoom

from wsr_med.settings import default

__all__ = ["SIDES", "FINDINGS", "synthetic_image", "multilabel_image", "make_synthetic_folder", "make_multilabel_folder",
           "synthetic_dataset", "write_dicom"]

SIDES = ("left", "right", "above", "below")
# The multi-label task: each finding is the same blob at its own place (fractions of the side, y then x), so only
# where a blob lies tells the findings apart; distractors lie in the band between them.
FINDINGS = {"nodule": (0.25, 0.25), "pneumothorax": (0.25, 0.75), "effusion": (0.75, 0.75), "cardiomegaly": (0.75, 0.25)}
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
              "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def _blob(size: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    y, x = np.ogrid[:size, :size]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def synthetic_image(side: str, size: int, rng: np.random.Generator, n_distractors: int = 3) -> np.ndarray:
    """A ``(size, size)`` float image in [0, 1] for class ``side`` (one of :data:`SIDES`)."""
    coarse = rng.normal(0.0, 1.0, (8, 8))
    background = 0.45 + 0.08 * zoom(coarse, size / 8, order=3)[:size, :size]
    background += np.linspace(-0.05, 0.05, size)[:, None]  # a gentle cranio-caudal gradient
    sigma = size * 0.025
    centre = size / 2
    offset = rng.uniform(0.04, 0.14) * size  # beside the centre line, inside the central third
    along = rng.uniform(-0.12, 0.12) * size
    cy, cx = {"left": (centre + along, centre - offset), "right": (centre + along, centre + offset),
              "above": (centre - offset, centre + along), "below": (centre + offset, centre + along)}[side]
    lesions = _blob(size, cy, cx, sigma)
    placed = 0
    while placed < n_distractors:  # identical blobs outside the central third
        y, x = rng.uniform(0.08, 0.92, 2) * size
        if abs(y - centre) < size / 6 and abs(x - centre) < size / 6:
            continue
        lesions = np.maximum(lesions, _blob(size, y, x, sigma))
        placed += 1
    image = background + 0.3 * lesions + rng.normal(0.0, 0.03, (size, size))
    return np.clip(image, 0.0, 1.0)


def multilabel_image(present: list[str], size: int, rng: np.random.Generator, n_distractors: int = 2) -> np.ndarray:
    """A ``(size, size)`` float image in [0, 1] holding a blob at the place of each finding in ``present``."""
    coarse = rng.normal(0.0, 1.0, (8, 8))
    image = 0.45 + 0.08 * zoom(coarse, size / 8, order=3)[:size, :size]
    sigma = size * 0.03
    lesions = np.zeros((size, size))
    for name in present:
        y, x = (np.array(FINDINGS[name]) + rng.uniform(-0.06, 0.06, 2)) * size
        lesions = np.maximum(lesions, _blob(size, y, x, sigma))
    for _ in range(n_distractors):  # on the cross between the four places: present in every image, says nothing
        along, across = rng.uniform(0.1, 0.9) * size, rng.uniform(0.46, 0.54) * size
        y, x = (along, across) if rng.random() < 0.5 else (across, along)
        lesions = np.maximum(lesions, _blob(size, y, x, sigma))
    return np.clip(image + 0.3 * lesions + rng.normal(0.0, 0.03, (size, size)), 0.0, 1.0)


def make_multilabel_folder(root: str | Path, n_images: int = 200, image_size: int = 256, prevalence: float = 0.35,
                           uncertain: float = 0.1, seed: int = 0) -> Path:
    """Write a multi-label chest-X-ray-like set: ``images/<patient>_<follow-up>.png`` and its labels twice, as NIH's
    ``Data_Entry_2017.csv`` and as a CheXpert-style ``chexpert.csv`` (``Path,Patient,Sex,Age,Frontal/Lateral`` then one
    column per finding of :data:`FINDINGS`: 1, 0, -1 uncertain, blank not mentioned).

    Each finding occurs independently with ``prevalence`` (so an image holds 0 to 4); in ``chexpert.csv`` an
    ``uncertain`` share of the labels is -1 (the image is drawn with the truth), and half of the absent findings are
    blank. NIH's file has no uncertainty: it lists the true findings. 1 to 3 images per patient.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(FINDINGS)
    nih, chexpert = [NIH_HEADER], [["Path", "Patient", "Sex", "Age", "Frontal/Lateral", *names]]
    patient, follow_up = 0, 0
    for _ in range(n_images):
        if follow_up == 0 or rng.random() < 0.5:
            patient, follow_up = patient + 1, 0
        present = [f for f in names if rng.random() < prevalence]
        image = multilabel_image(present, image_size, rng)
        file = f"{patient:08d}_{follow_up:03d}.png"
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(root / "images" / file)
        nih.append([file, "|".join(present) or "No Finding", str(follow_up), str(patient), "50", "M", "PA",
                    str(image_size), str(image_size), "0.143", "0.143"])
        codes = ["-1" if rng.random() < uncertain else ("1" if f in present else rng.choice(["0", ""])) for f in names]
        chexpert.append([f"images/{file}", f"patient{patient:05d}", "Male", "50", "Frontal", *codes])
        follow_up += 1
    for name, rows in (("Data_Entry_2017.csv", nih), ("chexpert.csv", chexpert)):
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def write_dicom(path: str | Path, image: np.ndarray, patient_id: str, monochrome1: bool = False,
                slope: float = 1.0, intercept: float = 0.0) -> None:
    """Write a ``[0, 1]`` image as a 16-bit (12 bits stored) DX DICOM file with made-up identifiers."""
    stored = np.round(image * 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.PatientID = patient_id
    ds.PatientName = f"Doe^{patient_id}"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = f"ACC-{patient_id}"
    ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_synthetic_folder(root: str | Path, n_per_class: int = 100, image_size: int = 256, n_classes: int = 2,
                          formats: tuple[str, ...] = ("dcm", "png"), seed: int = 0) -> Path:
    """Write ``<root>/<side>/case<label><patient>_<n>.<dcm|png>``: ``n_per_class`` scans per class.

    Args:
        root: output folder (created).
        n_per_class: scans per class.
        image_size: side of the square scans in pixels.
        n_classes: 2 to 4 (``left``, ``right``, ``above``, ``below``).
        formats: file formats used in turn (``dcm``, ``png``).
        seed: random seed; the same seed writes the same pixels.

    Returns:
        ``root``.
    """
    if not 2 <= n_classes <= len(SIDES):
        raise ValueError(f"n_classes must be 2 to {len(SIDES)}, got {n_classes}")
    unknown = set(formats) - {"dcm", "png"}
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; use dcm and/or png")
    rng = np.random.default_rng(seed)
    root = Path(root)
    n = 0
    for label, side in enumerate(SIDES[:n_classes]):
        (root / side).mkdir(parents=True, exist_ok=True)
        patient, left_for_patient = 0, 0
        for i in range(n_per_class):
            if left_for_patient == 0:  # 1 to 3 scans per patient, all of one format
                patient, left_for_patient = patient + 1, int(rng.integers(1, 4))
            left_for_patient -= 1
            fmt = formats[patient % len(formats)]
            image = synthetic_image(side, image_size, rng)
            # The DICOM header holds identifiers unlike the file name, so tests can check they never leak.
            path = root / side / f"case{label}{patient:03d}_{i:03d}.{fmt}"
            if fmt == "dcm":
                write_dicom(path, image, f"PID-{label}{patient:03d}-X", monochrome1=n % 4 == 0,
                            slope=1.0 if n % 3 else 0.5, intercept=0.0 if n % 3 else -100.0)
            elif n % 4 == 1:
                Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(path)  # 16-bit grayscale
            else:
                Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
            n += 1
    return root


def _cache_root() -> Path:
    return Path(os.environ.get("WSR_MED_CACHE") or Path.home() / ".cache" / "wsr_med")


def synthetic_dataset(**options) -> Path:
    """The folder of ``dataset_dir=synthetic`` (``options``: the ``synthetic`` setting, ``n_per_class``, ``image_size``,
    ``n_classes``, ``seed``, over its defaults): written once per set of options in the user's cache
    (``$WSR_MED_CACHE``, else ``~/.cache/wsr_med``), then shared by every run that asks for it.

    Not in the run folder: building a workflow (MONAI apps do it to check a bundle) must not write
    into the working folder, and a study of many runs needs one copy. Written to a temporary folder
    and renamed, so a folder that exists is complete; the same options always give the same pixels.
    """
    options = {k: int(v) for k, v in {**default("synthetic"), **options}.items()}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    root = _cache_root() / "synthetic" / digest
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        make_synthetic_folder(tmp, **options)
        os.replace(tmp, root)
    except OSError:
        if not root.is_dir():  # another process renamed its copy first: use that one
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
