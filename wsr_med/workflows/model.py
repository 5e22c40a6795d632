"""Load a trained model and its class map from a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load_classes", "load_model"]


def load_classes(run_dir: str | Path) -> list[str]:
    """The class names a model was trained with (``classes.json`` written next to it)."""
    path = Path(run_dir) / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the output_dir of a training run?")
    return json.loads(path.read_text())


def load_model(network: torch.nn.Module, checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load every weight of ``checkpoint`` into ``network`` (strict, ``weights_only=True``) and return it on ``device`` in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit this network configuration (backbone, head, image_size, classes): {e}") from None
    return network.to(device).eval()
