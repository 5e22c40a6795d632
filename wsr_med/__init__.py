"""wsr_med: Wise-SrNet classification for medical images, as a MONAI plugin."""

__version__ = "0.1.0"
