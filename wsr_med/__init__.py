"""wsr_med: Wise-SrNet classification for medical images, as a MONAI plugin."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Subpackages load on first use, so that bundle configs can write `$import wsr_med` and then
# `wsr_med.data.scan_transforms`, while `import wsr_med.networks` stays free of MLflow and matplotlib.
_SUBMODULES = ("data", "errors", "handlers", "log_format", "metrics", "networks", "pipelines", "runs", "tracking", "workflows")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"wsr_med.{name}")
    raise AttributeError(f"module 'wsr_med' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
