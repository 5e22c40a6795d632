"""Shared fixtures: real data from ../shared/data (skipped where absent) and small generated folders."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHEST = SHARED / "chest_xray_pneumonia"
REAL_DICOM = SHARED / "dicom"


@pytest.fixture(scope="session")
def chest_dir() -> Path:
    if not CHEST.is_dir():
        pytest.skip("../shared/data/chest_xray_pneumonia not present")
    return CHEST


@pytest.fixture(scope="session")
def real_dicom_dir() -> Path:
    if not REAL_DICOM.is_dir():
        pytest.skip("../shared/data/dicom not present")
    return REAL_DICOM


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A 3-class synthetic hospital folder, DICOM and PNG mixed, 64 px."""
    from wsr_med.data import make_synthetic_folder

    return make_synthetic_folder(tmp_path_factory.mktemp("synthetic"), n_per_class=12, image_size=64, n_classes=3)
