"""Load a trained model's weights into the network its run folder describes."""

from __future__ import annotations

from pathlib import Path

import torch

from wsr_med.errors import WsrMedError
from wsr_med.networks import read_state_dict

__all__ = ["amp_dtype", "load_model", "place_network"]


def load_model(network: torch.nn.Module, checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load every weight of ``checkpoint`` into ``network`` (strict; read by :func:`wsr_med.networks.read_state_dict`)
    and return it on ``device`` in eval mode."""
    path = Path(checkpoint)
    state = read_state_dict(path, "has the training run completed a validation epoch?")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WsrMedError(f"{path} does not fit this network configuration (backbone, head, image_size, classes): {e}") from None
    return network.to(device).eval()


def amp_dtype() -> torch.dtype:
    """The autocast type on this machine's GPU: bfloat16 where supported (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def place_network(network: torch.nn.Module, device: torch.device | str, channels_last: bool = False) -> torch.nn.Module:
    """``network`` on ``device``; with ``channels_last``, its 4D weights in channels-last memory order, which
    tensor-core convolutions on CUDA run fastest in (2D networks; a no-op for 3D)."""
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if channels_last else network
