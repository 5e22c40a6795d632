"""MONAI datasets over scanned items, with an on-disk cache keyed by file content and preprocessing."""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from pathlib import Path

from monai.data import Dataset, PersistentDataset
from monai.transforms import Compose, RandomizableTrait

__all__ = ["cache_key", "scan_dataset", "transform_signature"]

CACHE_VERSION = 4  # raise when a transform's output changes without a change of its settings


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


def scan_dataset(items: list[dict], transform: Compose, cache_dir: str | Path | None = None) -> Dataset:
    """A dataset over ``items``: cached in ``cache_dir`` with :class:`monai.data.PersistentDataset`, or not cached.

    MONAI caches the output of the transforms before the first random one, one file per item,
    written atomically; only one full-resolution image per worker is in memory at a time. The
    settings of those transforms (:func:`transform_signature`) enter every key, so a changed
    preprocessing never reads a stale entry.
    """
    if cache_dir is None or str(cache_dir) == "":
        return Dataset(items, transform)
    return PersistentDataset(items, transform, cache_dir=cache_dir,
                             hash_func=partial(cache_key, signature=transform_signature(transform)))
