"""MONAI transforms that load scans and bring them to the network's input, the same way everywhere.

``scan_transforms(...)`` is the one pipeline used by training, evaluation and inference:

    LoadScand -> Resized(longest side = image_size, area) -> ScalePercentilesd
    -> SpatialPadd(image_size, centred) [-> augmentations when train=True] -> EnsureTyped

The deterministic part is what :class:`monai.data.PersistentDataset` caches (MONAI caches up
to the first random transform).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandScaleIntensityd,
    Resized,
    SpatialPadd,
    Transform,
)

from wsr_med.data.readers import read_scan

__all__ = ["LoadScan", "LoadScand", "ScalePercentilesd", "scan_transforms", "preprocessing_signature"]


class LoadScan(Transform):
    """Load a scan file as a ``MetaTensor`` (``(C, H, W)`` or ``(1, X, Y, Z)``), see :func:`wsr_med.data.readers.read_scan`.

    Args:
        channels: 1 or 3 for 2D scans: colour is converted to luma, grayscale replicated.
        voi_lut: DICOM VOI LUT / window; None applies it for radiograph modalities only.
        spatial_dims: 2 for pictures and DICOM images, 3 for NIfTI files and DICOM series.
        min_size: the size the image is resized to next; JPEG files may decode at a reduced
            scale that keeps the longest side at least this large (None: full resolution).
    """

    def __init__(self, channels: int = 1, voi_lut: bool | None = None, spatial_dims: int = 2,
                 min_size: int | None = None) -> None:
        self.channels = channels
        self.voi_lut = voi_lut
        self.spatial_dims = spatial_dims
        self.min_size = min_size

    def __call__(self, path: str | Path) -> MetaTensor:
        array, meta = read_scan(path, self.channels, self.voi_lut, self.spatial_dims, self.min_size)
        affine = meta.pop("affine", None)
        return MetaTensor(torch.from_numpy(array), affine=affine, meta=meta)


class LoadScand(MapTransform):
    """Dictionary version of :class:`LoadScan`: replaces the file path under each key by the image."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        channels: int = 1,
        voi_lut: bool | None = None,
        spatial_dims: int = 2,
        min_size: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadScan(channels, voi_lut, spatial_dims, min_size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class ScalePercentilesd(MapTransform):
    """Map intensities between two percentiles of each image to [0, 1], clipped outside.

    The same mapping as MONAI's ``ScaleIntensityRangePercentilesd(lower, upper, 0, 1, clip=True)``,
    computed with ``np.percentile`` (a partial sort): several times faster, which matters when
    this runs once per image in the data loader. A constant image maps to zeros.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            low, high = np.percentile(np.asarray(image), [self.lower, self.upper])
            scaled = (image - float(low)) / max(float(high - low), 1e-12)
            d[key] = scaled.clamp(0.0, 1.0) if isinstance(scaled, torch.Tensor) else np.clip(scaled, 0.0, 1.0)
        return d


def preprocessing_signature(image_size: int, in_channels: int, spatial_dims: int, voi_lut: bool | None,
                            intensity_percentiles: Sequence[float]) -> dict:
    """Everything that changes a cached, preprocessed image; part of the cache key."""
    return {"image_size": image_size, "in_channels": in_channels, "spatial_dims": spatial_dims,
            "voi_lut": voi_lut, "intensity_percentiles": list(intensity_percentiles), "version": 2}


def scan_transforms(
    image_size: int = 224,
    in_channels: int = 1,
    spatial_dims: int = 2,
    train: bool = False,
    voi_lut: bool | None = None,
    intensity_percentiles: Sequence[float] = (0.5, 99.5),
    rotate_degrees: float = 5.0,
    zoom: float = 0.05,
    shift: float = 0.02,
    intensity: float = 0.1,
    keys: Sequence[str] = ("image",),
) -> Compose:
    """The preprocessing (and, with ``train=True``, augmentation) pipeline for dictionaries ``{"image": path, ...}``.

    Args:
        image_size: side of the square (cube) input; the longest side is resized to it with
            area interpolation (anti-aliased), the aspect ratio kept, and the rest zero-padded
            symmetrically.
        in_channels: 1 or 3 (2D); volumes are single channel.
        spatial_dims: 2 or 3.
        train: add random augmentations suitable for radiographs: small rotation, zoom and shift
            (no flips: left and right are anatomy), brightness and contrast.
        voi_lut: DICOM VOI LUT / windowing, see :class:`LoadScan`.
        intensity_percentiles: intensities between these percentiles map to [0, 1], clipped outside
            (robust to burned-in text and collimator edges).
        rotate_degrees, zoom, shift, intensity: augmentation amplitudes (shift as a fraction of the size).
        keys: the image keys.
    """
    keys = list(keys)
    lower, upper = intensity_percentiles
    steps = [
        LoadScand(keys, channels=in_channels, voi_lut=voi_lut, spatial_dims=spatial_dims, min_size=image_size),
        Resized(keys, spatial_size=image_size, size_mode="longest", mode="area"),
        ScalePercentilesd(keys, lower=lower, upper=upper),
        SpatialPadd(keys, spatial_size=[image_size] * spatial_dims, method="symmetric"),
    ]
    if train:
        rotate = np.deg2rad(rotate_degrees)
        steps += [
            RandAffined(
                keys,
                prob=0.8,
                rotate_range=[rotate] if spatial_dims == 2 else [rotate] * 3,
                scale_range=[zoom] * spatial_dims,
                translate_range=[shift * image_size] * spatial_dims,
                padding_mode="zeros",
                mode="bilinear",
            ),
            RandScaleIntensityd(keys, factors=intensity, prob=0.5),
            RandAdjustContrastd(keys, gamma=(1 - 2 * intensity, 1 + 2 * intensity), prob=0.5),
        ]
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return Compose(steps)
