"""What a model was trained on, and how far a new scan lies from it.

A classifier answers for any input: an ultrasound model labels a chest radiograph as confidently as an
ultrasound. During the scan each file's profile is taken (DICOM modality, channels, size, and the mean and
spread of its intensities after the same percentile scaling the model sees); the run folder keeps the
training set's summary (``profile.json``), and predict / evaluate flag every file that lies outside it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from wsr_med.data.readers import LUMA
from wsr_med.settings import default

__all__ = ["scan_profile", "training_profile", "unlike_training"]

_SIZE_FACTOR = 2.0  # a longest side more than this factor outside the training range is unusual
_INTENSITY_MARGIN = 0.1  # on the [0, 1] scale the model sees


def scan_profile(image: np.ndarray, meta: dict, intensity_percentiles=default("intensity_percentiles")) -> dict:
    """The profile of one decoded scan ``(C, *S)`` with the reader's ``meta``; intensities are scaled between the
    run's ``intensity_percentiles``, as the model sees them."""
    # intensities as a one-channel network sees them (colour converted to luma, as the reader does): a picture saved
    # in grey and in colour profiles alike
    gray = np.tensordot(LUMA, image[:3], axes=1)[None] if image.shape[0] >= 3 else image[:1]
    values = gray.reshape(1, -1)
    stride = max(1, values.shape[1] // 65536)  # a regular subsample, as the percentile scaling uses
    sample = values[:, ::stride].astype(np.float32)
    low, high = np.percentile(sample, list(intensity_percentiles))
    scaled = np.clip((sample - low) / max(float(high - low), 1e-12), 0, 1)
    # the stored size, not the decoded one: JPEG 2000 may decode at a reduced scale (LoadScan's min_size)
    shape = meta.get("original_shape") or image.shape[1:]
    return {"modality": str(meta.get("modality") or ""), "channels": int(image.shape[0]),
            "longest_side": int(max(shape)), "mean": float(scaled.mean()), "std": float(scaled.std())}


def training_profile(profiles: list[dict]) -> dict:
    """The summary of a training set's profiles: modalities and channels seen, size range, intensity ranges."""
    sides = [p["longest_side"] for p in profiles]
    return {
        "n": len(profiles),
        "modalities": dict(Counter(p["modality"] for p in profiles if p["modality"])),
        "channels": dict(Counter(str(p["channels"]) for p in profiles)),
        "longest_side": [min(sides), max(sides)],
        "mean": [float(np.percentile([p["mean"] for p in profiles], q)) for q in (1, 99)],
        "std": [float(np.percentile([p["std"] for p in profiles], q)) for q in (1, 99)],
    }


def unlike_training(profile: dict, trained: dict) -> str:
    """Why a scan with ``profile`` looks unlike the training data summarised in ``trained`` ("" if it does not)."""
    reasons = []
    if profile["modality"] and trained["modalities"] and profile["modality"] not in trained["modalities"]:
        reasons.append(f"modality {profile['modality']} never seen in training ({', '.join(sorted(trained['modalities']))})")
    low, high = trained["longest_side"]
    if not low / _SIZE_FACTOR <= profile["longest_side"] <= high * _SIZE_FACTOR:
        reasons.append(f"{profile['longest_side']} px, training had {low}-{high} px")
    for key in ("mean", "std"):
        low, high = trained[key]
        if not low - _INTENSITY_MARGIN <= profile[key] <= high + _INTENSITY_MARGIN:
            reasons.append(f"intensity {key} {profile[key]:.2f} outside the training range {low:.2f}-{high:.2f}")
    return "; ".join(reasons)
