"""MONAI transforms that load scans and bring them to the network's input, the same way everywhere.

``scan_transforms(...)`` is the one pipeline used by training, evaluation and inference:

    LoadScand -> ResizeLongestd(image_size) -> ScalePercentilesd -> PadToSquared(image_size)
    [-> augmentations when train=True] -> EnsureTyped

The deterministic part is what :class:`monai.data.PersistentDataset` caches (MONAI caches up
to the first random transform).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandScaleIntensityd,
    ToDeviced,
    Transform,
)

from wsr_med.data.readers import MAX_PIXELS, read_scan
from wsr_med.settings import default

__all__ = ["LoadScan", "LoadScand", "ResizeLongestd", "ScalePercentilesd", "PadToSquared", "LabelVectord", "label_vector", "scan_transforms"]


class LoadScan(Transform):
    """Load a scan file as a float tensor (``(C, H, W)`` or ``(1, X, Y, Z)``), see :func:`wsr_med.data.readers.read_scan`.

    A plain tensor rather than a ``MetaTensor``: nothing downstream needs the meta data (and it
    must not carry header fields), and plain tensors skip MONAI's per-operation meta tracking.

    Args:
        channels: 1 or 3 for 2D scans: colour is converted to luma, grayscale replicated.
        voi_lut: DICOM VOI LUT / window; None applies it for radiograph modalities only.
        spatial_dims: 2 for pictures and DICOM images, 3 for NIfTI files and DICOM series.
        min_size: the size the image is resized to next; JPEG files and JPEG 2000 DICOM may decode at
            a reduced scale that keeps the longest side at least this large (None: full resolution).
        max_pixels: the largest declared size read (see :data:`wsr_med.data.readers.MAX_PIXELS`).
    """

    def __init__(self, channels: int = 1, voi_lut: bool | None = None, spatial_dims: int = 2,
                 min_size: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
        self.channels = channels
        self.voi_lut = voi_lut
        self.spatial_dims = spatial_dims
        self.min_size = min_size
        self.max_pixels = max_pixels

    def read(self, path: str | Path | bytes):
        """``(array, meta)`` of the scan (:func:`wsr_med.data.readers.read_scan`): the meta for those who profile it."""
        return read_scan(path, self.channels, self.voi_lut, self.spatial_dims, self.min_size, self.max_pixels)

    def __call__(self, path: str | Path | bytes) -> torch.Tensor:
        return torch.from_numpy(self.read(path)[0])


class LoadScand(MapTransform):
    """Dictionary version of :class:`LoadScan`: replaces the file path under each key by the image."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        channels: int = 1,
        voi_lut: bool | None = None,
        spatial_dims: int = 2,
        min_size: int | None = None,
        max_pixels: int = MAX_PIXELS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadScan(channels, voi_lut, spatial_dims, min_size, max_pixels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class _SizedMapTransform(MapTransform):
    """A dictionary transform parameterised by one target ``size``."""

    def __init__(self, keys: KeysCollection, size: int) -> None:
        super().__init__(keys)
        self.size = size


class ResizeLongestd(_SizedMapTransform):
    """Resize so that the longest side is ``size``, keeping the aspect ratio. ``(C, *S) -> (C, *S')``.

    Area (box) interpolation: each output pixel averages the input pixels it covers, so a 3000 px
    radiograph shrunk to 512 px does not alias. 2D goes through PIL's box filter per channel
    (float32, single-threaded C, the fastest here), 3D through torch's area interpolation. Not
    MONAI's ``Resize``: its meta-data tracking alone costs a few milliseconds per image, a third
    of the whole preprocessing of a radiograph.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key], dtype=torch.float32)
            spatial = image.shape[1:]
            scale = self.size / max(spatial)
            target = [max(1, round(s * scale)) for s in spatial]
            if list(spatial) != target and len(spatial) == 2:
                size = (target[1], target[0])  # PIL sizes are (width, height)
                channels = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize(size, Image.Resampling.BOX)) for c in image]
                image = torch.from_numpy(np.stack(channels))
            elif list(spatial) != target:
                image = torch.nn.functional.interpolate(image[None], size=target, mode="area")[0]
            d[key] = image
        return d


class PadToSquared(_SizedMapTransform):
    """Zero-pad every spatial axis to ``size``, centred (the extra pixel of an odd margin goes after). ``(C, *S) -> (C, size, ...)``."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            pads = []
            for s in reversed(image.shape[1:]):  # F.pad takes the last axis first
                margin = max(self.size - s, 0)
                pads += [margin // 2, margin - margin // 2]
            d[key] = torch.nn.functional.pad(image, pads)
        return d


class ScalePercentilesd(MapTransform):
    """Map intensities between two percentiles of each image to [0, 1], clipped outside.

    The mapping of MONAI's ``ScaleIntensityRangePercentilesd(lower, upper, 0, 1, clip=True)``,
    with the percentiles estimated on a regular subsample of at most ~65k pixels (a strided grid,
    deterministic): an order of magnitude faster on a 512 px image, and the same up to the
    estimate's precision. A constant image maps to zeros.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key], dtype=torch.float32)
            values = image.numpy()
            stride = max(1, int(np.ceil((values.size / 65536) ** (1 / max(values.ndim - 1, 1)))))
            sample = values[(slice(None),) + (slice(None, None, stride),) * (values.ndim - 1)]
            low, high = np.percentile(sample, [self.lower, self.upper])
            scaled = torch.sub(image, float(low))  # a new tensor: the input is left as it was
            d[key] = scaled.mul_(1.0 / max(float(high - low), 1e-12)).clamp_(0.0, 1.0)
        return d


def scan_transforms(
    image_size: int = 224,
    in_channels: int = 1,
    spatial_dims: int = 2,
    train: bool = False,
    voi_lut: bool | None = None,
    intensity_percentiles: Sequence[float] = tuple(default("intensity_percentiles")),
    rotate_degrees: float = 5.0,
    zoom: float = 0.05,
    shift: float = 0.02,
    intensity: float = 0.1,
    keys: Sequence[str] = ("image",),
    max_pixels: int = MAX_PIXELS,
    device: torch.device | str | None = None,
) -> Compose:
    """The preprocessing (and, with ``train=True``, augmentation) pipeline for dictionaries ``{"image": path, ...}``.

    Args:
        image_size: side of the square (cube) input; the longest side is resized to it
            (anti-aliased), the aspect ratio kept, and the rest zero-padded, centred.
        in_channels: 1 or 3 (2D); volumes are single channel.
        spatial_dims: 2 or 3.
        train: add random augmentations suitable for radiographs: small rotation, zoom and shift
            (no flips: left and right are anatomy), brightness and contrast.
        voi_lut: DICOM VOI LUT / windowing, see :class:`LoadScan`.
        intensity_percentiles: intensities between these percentiles map to [0, 1], clipped outside
            (robust to burned-in text and collimator edges).
        rotate_degrees, zoom, shift, intensity: augmentation amplitudes (shift as a fraction of the size).
        keys: the image keys.
        max_pixels: the largest declared scan size read, in pixels (checked before decoding).
        device: move the preprocessed image to this device before augmenting (e.g. ``cuda``: augmentation on
            the GPU). Part of the cached output: meant for ``scan_dataset(cache="memory")``.
    """
    keys = list(keys)
    lower, upper = intensity_percentiles
    steps = [
        LoadScand(keys, channels=in_channels, voi_lut=voi_lut, spatial_dims=spatial_dims, min_size=image_size,
                  max_pixels=max_pixels),
        ResizeLongestd(keys, image_size),
        ScalePercentilesd(keys, lower=lower, upper=upper),
        PadToSquared(keys, image_size),
    ]
    if device is not None:
        steps.append(ToDeviced(keys, device=device))
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
                device=device,
            ),
            RandScaleIntensityd(keys, factors=intensity, prob=0.5),
            RandAdjustContrastd(keys, gamma=(1 - 2 * intensity, 1 + 2 * intensity), prob=0.5),
        ]
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    steps.append(LabelVectord())
    return Compose(steps)


class LabelVectord(MapTransform):
    """``label`` through :func:`label_vector` (not a MONAI ``Lambdad``: that records itself in the item, and the cached
    item would then hold objects a ``weights_only`` load refuses)."""

    def __init__(self) -> None:
        super().__init__("label", allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if "label" in d:
            d["label"] = label_vector(d["label"])
        return d


def label_vector(label):
    """A multi-label label (one value per finding, None masked) as a float32 tensor with NaN where masked, which the
    loss and the metrics leave out; a class index (single-label) as it is."""
    if isinstance(label, (list, tuple)):
        # a tensor, not numpy: a cache entry holding it loads with weights_only=True
        return torch.tensor([float("nan") if value is None else value for value in label], dtype=torch.float32)
    return label
