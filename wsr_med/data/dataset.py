"""MONAI datasets over scanned items, with an on-disk cache keyed by file content and preprocessing."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

from monai.data import Dataset, PersistentDataset
from monai.transforms import Compose

__all__ = ["cache_key", "scan_dataset"]


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
    fields = {k: v for k, v in item.items() if k not in ("image", "sha1")}
    blob = json.dumps({"content": content, "fields": fields, "preprocessing": signature}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest().encode()


def scan_dataset(items: list[dict], transform: Compose, cache_dir: str | Path | None, signature: dict) -> Dataset:
    """A dataset over ``items``: cached in ``cache_dir`` with :class:`monai.data.PersistentDataset`, or not cached.

    MONAI caches the output of the transforms before the first random one, one file per item,
    written atomically; only one full-resolution image per worker is in memory at a time.
    ``signature`` (see :func:`wsr_med.data.transforms.preprocessing_signature`) enters every key,
    so a changed preprocessing never reads a stale entry.
    """
    if cache_dir is None or str(cache_dir) == "":
        return Dataset(items, transform)
    return PersistentDataset(items, transform, cache_dir=cache_dir,
                             hash_func=partial(cache_key, signature=json.dumps(signature, sort_keys=True)))
