"""MONAI datasets over scanned items, with a verified on-disk cache keyed by file content and preprocessing."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from copy import deepcopy
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, ThreadDataLoader
from monai.transforms import Compose, RandomizableTrait
from monai.utils import look_up_option

from wsr_med.files import atomic_write

__all__ = ["CACHE_MODES", "VerifiedPersistentDataset", "cache_key", "default_num_workers", "scan_dataset", "scan_loader",
           "transform_signature"]

CACHE_MODES = ("disk", "memory", "none")

logger = logging.getLogger(__name__)

CACHE_VERSION = 7  # raise when a transform's output or the cache's storage changes without a change of its settings
_UNIT_SCALE = 65535.0  # cached images in [0, 1] are stored as uint16 steps of 1/65535
_QUANTIZED = "_uint16_keys"


def _to_storage(item: dict) -> dict:
    """``item`` as cached: floating tensors within [0, 1] (every preprocessed image) as uint16, half of float32's
    size (a 2048 px scan: 8 MiB instead of 16) with a step of 1.5e-5, finer than a 16-bit scan's own after
    percentile scaling; other values as they are. In numpy: torch's casts to and from uint16 are far slower."""
    stored, keys = dict(item), []
    for key, value in item.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            array = value.numpy(force=True)
            if array.min() >= 0 and array.max() <= 1:
                stored[key] = torch.from_numpy(np.rint(array * _UNIT_SCALE).astype(np.uint16))
                keys.append(key)
    stored[_QUANTIZED] = keys
    return stored


def _from_storage(stored: dict) -> dict:
    """The item a cache entry holds (the inverse of :func:`_to_storage`, up to its rounding)."""
    item = dict(stored)
    for key in item.pop(_QUANTIZED, []):
        array = item[key].numpy().astype(np.float32)
        item[key] = torch.from_numpy(np.multiply(array, np.float32(1 / _UNIT_SCALE), out=array))
    return item


def _describe(obj, depth: int = 0):
    """A JSON-able, run-independent description of a transform's settings (nested objects included)."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(o, depth + 1) for o in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if callable(obj) and hasattr(obj, "__qualname__") and not hasattr(obj, "__dict__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if hasattr(obj, "__dict__") and depth < 4:
        fields = {k: _describe(v, depth + 1) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
        return {"type": f"{type(obj).__module__}.{type(obj).__qualname__}", **fields}
    return re.sub(r" at 0x[0-9a-f]+", "", repr(obj))  # no memory addresses: the same settings, the same text


def transform_signature(transform: Compose) -> str:
    """What :class:`monai.data.PersistentDataset` caches of ``transform`` (the transforms before the first
    random one), described by their types and settings: a changed setting is a new cache entry."""
    cached = []
    for t in transform.transforms:
        if isinstance(t, RandomizableTrait):
            break
        cached.append(_describe(t))
    return json.dumps({"version": CACHE_VERSION, "transforms": cached}, sort_keys=True)


def cache_key(item: dict, signature: str) -> bytes:
    """Cache key of one item: its file content hash (``sha1`` from the scan), its other fields, the preprocessing.

    The path is not part of it (a moved dataset keeps its cache); the label is (a duplicated file
    in two classes must not share a cached entry).
    """
    if "sha1" in item:
        content = item["sha1"]
    else:  # unscanned input (e.g. inference): path, size and modification time stand in for the content
        stat = Path(item["image"]).stat()
        content = f"{Path(item['image']).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    fields = {k: v for k, v in item.items() if k not in ("image", "sha1", "relative_path")}
    blob = json.dumps({"content": content, "fields": fields, "preprocessing": signature}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest().encode()


class VerifiedPersistentDataset(PersistentDataset):
    """MONAI's :class:`~monai.data.PersistentDataset` whose cache entries carry a SHA-256 of their content
    and hold images in [0, 1] as uint16 (:func:`_to_storage`).

    Each entry ``<key>.cache`` is the digest followed by ``torch.save`` of the preprocessed item, written to
    a temporary file and renamed. On read the digest is checked before anything is loaded (with
    ``weights_only=True``): an entry overwritten, truncated or unreadable is logged, deleted and rebuilt
    from the scan; it is never trusted and never fatal.
    """

    SUFFIX = ".cache"

    def __init__(self, data, transform, cache_dir: str | Path, **kwargs):
        super().__init__(data, transform, cache_dir=None, **kwargs)
        self.cache_dir = Path(cache_dir)  # made on the first write: building a workflow writes nothing

    def _cachecheck(self, item_transformed):
        entry = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}{self.SUFFIX}"
        if entry.is_file():
            problem = None
            try:
                blob = entry.read_bytes()
                digest, payload = blob[:32], blob[32:]
                if len(blob) <= 32 or hashlib.sha256(payload).digest() != digest:
                    problem = "its content does not match its checksum"
                else:
                    return _from_storage(torch.load(io.BytesIO(payload), weights_only=True))
            except Exception as e:  # unreadable for any reason: the scan is the truth
                problem = f"{type(e).__name__}: {e}"
            logger.warning("cache entry %s is damaged (%s); rebuilding it from the scan", entry.name, problem)
            entry.unlink(missing_ok=True)
        stored = _to_storage(self._pre_transform(deepcopy(item_transformed)))  # keep the original hashed
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        payload = buffer.getvalue()
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, hashlib.sha256(payload).digest() + payload)
        except OSError as e:  # a full or read-only disk slows training down, it does not stop it
            logger.warning("cache entry %s not written (%s)", entry.name, e)
        return _from_storage(stored)  # what later epochs read: every epoch sees the same values


def scan_dataset(data: list[dict], transform: Compose, cache_dir: str | Path | None = None, cache: str = "disk") -> Dataset:
    """A dataset over the items ``data`` (MONAI's argument names), its preprocessing cached as ``cache`` says.

    ``cache`` (one of :data:`CACHE_MODES`) is where the output of the transforms before the first random one
    is kept after the first epoch:

    * ``disk`` (the default): one verified file per item in ``cache_dir`` (:class:`VerifiedPersistentDataset`,
      images as uint16); only one full-resolution image per loader worker is in memory at a time. The settings
      of those transforms (:func:`transform_signature`) enter every key, so a changed preprocessing never
      reads a stale entry. An empty ``cache_dir`` means no cache.
    * ``memory``: MONAI's :class:`~monai.data.CacheDataset`, filled as items are first read; the cached
      images are float32 on the device the transforms end on (with ``scan_transforms(device=cuda)``: the
      GPU, which then also augments). Size: items x image_size^2 x 4 bytes (1,000 scans at 1024 px: 4 GiB).
    * ``none``: every epoch reads and preprocesses every scan.
    """
    look_up_option(cache, CACHE_MODES)
    if cache == "memory":
        return CacheDataset(data, transform, runtime_cache=True, progress=False)
    if cache == "none" or cache_dir is None or str(cache_dir) == "":
        return Dataset(data, transform)
    return VerifiedPersistentDataset(data, transform, cache_dir=cache_dir,
                                     hash_func=partial(cache_key, signature=transform_signature(transform)))


def default_num_workers(device: torch.device | str) -> int:
    """Loader (and scan) processes for training on ``device``: on CUDA, one per core but one, up to 8, so that
    decoding and augmentation keep the GPU fed; on the CPU none, as the training itself uses every core and
    loader processes only compete with it (docs/benchmarks.md: the bundle's loop at 1.00x of a bare loop with
    no loader process, 0.79x with two, on two cores)."""
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))


def scan_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, device: torch.device | str = "cpu",
                shuffle: bool = False, sampler=None, training: bool = False) -> DataLoader:
    """The loader of a :func:`scan_dataset`, set up to keep the device fed.

    ``training``: a last batch of a single scan is dropped (that scan is in another epoch's batches: the order is
    shuffled): BatchNorm cannot train on one value per channel, which a 3D volume's 1x1x1 feature map gives.

    A memory cache is read by MONAI's :class:`~monai.data.ThreadDataLoader` in this process (its items may
    already be on the GPU); otherwise ``num_workers`` processes decode and augment, kept alive between
    epochs, each preparing 4 batches ahead, into pinned memory when the device is CUDA.
    """
    drop_last = training and len(sampler if sampler is not None else dataset) % batch_size == 1
    if isinstance(dataset, CacheDataset):
        return ThreadDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                                num_workers=0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
