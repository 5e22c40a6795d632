"""Load a trained model's weights into the network its run folder describes."""

from __future__ import annotations

from pathlib import Path

import torch

from wsr_med.errors import WsrMedError

__all__ = ["load_model"]


def load_model(network: torch.nn.Module, checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load every weight of ``checkpoint`` into ``network`` (strict, ``weights_only=True``) and return it on ``device`` in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise WsrMedError(f"model checkpoint not found: {path} (has the training run completed a validation epoch?)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WsrMedError(f"{path} does not fit this network configuration (backbone, head, image_size, classes): {e}") from None
    return network.to(device).eval()
