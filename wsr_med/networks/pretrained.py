"""ImageNet weights by name (``pretrained_weights=imagenet``), from torch's own hub cache, never fetched unasked.

The files are the ones torchvision's DenseNets and MONAI's ``EfficientNetBN(pretrained=True)`` use, looked up in
``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``): a hospital machine without internet copies them there
once. Downloading needs ``download_weights=true`` (the bundle setting); offline, or without it, a missing file is
an error naming the file, where to get it and the folder to put it in.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from monai.utils import look_up_option

from wsr_med.errors import WsrMedError

__all__ = ["IMAGENET_WEIGHTS", "resolve_pretrained_weights", "imagenet_weights_file", "optimizer_param_groups"]

_TORCHVISION = "https://download.pytorch.org/models/"
_EFFICIENTNET = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
IMAGENET_WEIGHTS = {
    "densenet121": _TORCHVISION + "densenet121-a639ec97.pth",
    "densenet169": _TORCHVISION + "densenet169-b2777c0a.pth",
    "densenet201": _TORCHVISION + "densenet201-c1103571.pth",
    "efficientnet-b0": _EFFICIENTNET + "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1": _EFFICIENTNET + "efficientnet-b1-f1951068.pth",
    "efficientnet-b2": _EFFICIENTNET + "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3": _EFFICIENTNET + "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4": _EFFICIENTNET + "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5": _EFFICIENTNET + "efficientnet-b5-b6417697.pth",
    "efficientnet-b6": _EFFICIENTNET + "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7": _EFFICIENTNET + "efficientnet-b7-dcc49843.pth",
}


def imagenet_weights_file(backbone: str) -> Path:
    """Where torch's hub cache keeps ``backbone``'s ImageNet checkpoint."""
    url = look_up_option(backbone, IMAGENET_WEIGHTS)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def resolve_pretrained_weights(pretrained_weights: str | Path, backbone: str, download: bool = False) -> Path:
    """The checkpoint file ``pretrained_weights`` names: a local path as it is, or ``imagenet`` for ``backbone``."""
    if str(pretrained_weights) != "imagenet":
        return Path(pretrained_weights)
    if backbone not in IMAGENET_WEIGHTS:
        raise WsrMedError(f"no ImageNet weights for backbone '{backbone}' (they exist for {', '.join(IMAGENET_WEIGHTS)}); "
                          "give a local state dict file instead")
    url, path = IMAGENET_WEIGHTS[backbone], imagenet_weights_file(backbone)
    if path.is_file():
        return path
    if download:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = re.search(r"-([a-f0-9]+)\.", path.name)  # torchvision's names carry a SHA-256 prefix
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix.group(1) if prefix else None, progress=False)
            return path
        except Exception as e:
            reason = f"downloading it failed ({type(e).__name__}: {e})"
    else:
        reason = "downloading is off (download_weights=false)"
    raise WsrMedError(f"ImageNet weights for {backbone}: {path.name} is not in {path.parent} and {reason}. "
                      f"Copy {path.name} (from {url}) into {path.parent} (or set TORCH_HOME to a folder whose "
                      "hub/checkpoints holds it)")


def optimizer_param_groups(network: torch.nn.Module, learning_rate: float, finetune: dict | None = None) -> list[dict] | list:
    """The optimizer's parameters: one group, or with ``finetune["backbone_lr_scale"]`` != 1 the backbone's at
    ``learning_rate * scale`` and the head's at ``learning_rate`` (a pretrained backbone moves less than a new head)."""
    scale = float((finetune or {}).get("backbone_lr_scale", 1.0))
    network = getattr(network, "module", network)
    if scale == 1.0:
        return list(network.parameters())  # one group: checkpoints of earlier runs resume as they are
    backbone = list(network.backbone.parameters())
    ids = {id(p) for p in backbone}
    return [{"params": backbone, "lr": learning_rate * scale},
            {"params": [p for p in network.parameters() if id(p) not in ids], "lr": learning_rate}]
