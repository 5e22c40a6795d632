"""wsr_med: Wise-SrNet classification for medical images, as a MONAI plugin."""

__version__ = "0.1.0"

# Subpackages are imported here so that bundle configs can write `$import wsr_med` and then
# `wsr_med.data.scan_transforms`, `wsr_med.workflows.prepare_data`, ...
from wsr_med import data, handlers, metrics, networks, workflows  # noqa: E402,F401
