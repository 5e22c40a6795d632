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


def drawn(path: Path) -> dict:
    """What a figure holds, from its pixels: ``coloured`` (share of saturated pixels: plotted data in colour) and
    ``grey_levels`` (distinct grey values: pictures of scans). A blank figure (white, black axes and text) has
    neither."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    grey = rgb[saturation < 8][:, 0]
    return {"coloured": float((saturation > 60).mean()), "grey_levels": len(np.unique(grey))}
