"""WiseSrNet: a MONAI DenseNet/EfficientNet backbone with a selectable classification head."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from monai.utils import ensure_tuple_rep

from wsr_med.errors import WsrMedError
from wsr_med.networks.backbones import build_backbone
from wsr_med.networks.heads import ClassificationHead
from wsr_med.networks.pretrained import resolve_pretrained_weights

__all__ = ["ImageTooSmall", "WiseSrNet", "feature_size", "load_pretrained_weights"]

logger = logging.getLogger(__name__)


def feature_size(backbone: str, spatial_dims: int, in_channels: int, img_size: Sequence[int],
                 backbone_kwargs: dict | None = None) -> list[int] | None:
    """The backbone's last feature map size for inputs of ``img_size``, or None when the input is too small for it.

    Computed on a copy on the meta device: no memory, no compute.
    """
    with torch.device("meta"):
        probe = build_backbone(backbone, spatial_dims, in_channels, **dict(backbone_kwargs or {})).eval()
        try:
            shape = probe(torch.empty(1, in_channels, *img_size)).shape
        except RuntimeError:  # a pooling or convolution kernel larger than what is left of the input
            return None
    return list(shape[2:]) if min(shape[2:]) >= 1 else None


class ImageTooSmall(WsrMedError, ValueError):
    """An ``image_size`` the backbone cannot take: its message names the smallest size that works."""

    def __init__(self, backbone: str, spatial_dims: int, in_channels: int, img_size: Sequence[int],
                 backbone_kwargs: dict | None = None) -> None:
        smallest = next((n for n in range(max(img_size) + 1, 4097)
                         if feature_size(backbone, spatial_dims, in_channels, [n] * spatial_dims, backbone_kwargs)), None)
        super().__init__(f"image_size {max(img_size)} is too small for backbone '{backbone}' in {spatial_dims}D: its last "
                         f"feature map would be empty; the smallest image_size it takes is {smallest} (a feature map of 1 "
                         f"per axis; 2 or more keep some spatial layout for the head)")


class WiseSrNet(nn.Module):
    """Image classifier: backbone feature map -> head (Wise-SrNet by default) -> logits.

    Args:
        backbone: ``densenet121|169|201|264`` or ``efficientnet-b0`` .. ``efficientnet-b8`` (MONAI networks).
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: input channels (1 for grayscale scans, 3 for RGB).
        out_channels: number of classes.
        img_size: the input's spatial size (int, or one per axis); the head is built for the
            feature map this size gives, and other sizes are refused.
        head: how the feature map is compressed, one of
            :data:`wsr_med.networks.heads.HEADS` (``wise`` is Wise-SrNet, ``gap`` is MONAI's default).
        dropout: dropout probability before the final Linear layer.
        pretrained_weights: path of a local state dict (a WiseSrNet, a MONAI DenseNet/EfficientNet
            or a torchvision DenseNet checkpoint) to initialise from, or ``imagenet``: the backbone's ImageNet
            checkpoint from torch's hub cache (:mod:`wsr_med.networks.pretrained`). Every backbone tensor must
            load. See :func:`load_pretrained_weights`.
        backbone_kwargs: extra arguments of the MONAI backbone (e.g. ``{"init_features": 16,
            "growth_rate": 8, "block_config": [2, 2, 2, 2]}`` for a small DenseNet).
        head_kwargs: options of the head (``pre_pool``, ``max_kernel`` for ``wise``; ``p`` for ``gem``).
        download_weights: with ``pretrained_weights="imagenet"``, download a checkpoint missing from the cache
            (off by default: hospital machines are often offline, and nothing is fetched unasked).
        bn_momentum: momentum of every BatchNorm running statistic in the backbone; PyTorch's 0.1 by
            default for both families. MONAI's EfficientNet uses TensorFlow's 0.01, with which the running
            statistics of a model trained for a few hundred steps are still near their initial values and
            eval-mode outputs collapse to one class. ``None`` keeps the backbone's own.
        checkpointing: recompute the backbone's activations in backward, one dense block / MBConv stage
            at a time, instead of keeping them: the same outputs, gradients and BatchNorm statistics for
            a fraction of the training memory and about a third more compute (large scans;
            :mod:`wsr_med.networks.checkpointing`). Inference is unaffected.

    Shapes: ``(B, in_channels, *img_size) -> (B, out_channels)``.

    Example::

        net = WiseSrNet("densenet121", spatial_dims=2, in_channels=1, out_channels=3, img_size=512)
        net.head.compression.kernel_size   # (5, 5): 16x16 map, average pool 3, depthwise 5x5
    """

    def __init__(
        self,
        backbone: str = "densenet121",
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        img_size: int | Sequence[int] = 224,
        head: str = "wise",
        dropout: float = 0.0,
        pretrained_weights: str | Path | None = None,
        backbone_kwargs: dict | None = None,
        head_kwargs: dict | None = None,
        bn_momentum: float | None = 0.1,
        download_weights: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.img_size: list[int] = list(ensure_tuple_rep(img_size, spatial_dims))
        backbone_kwargs = dict(backbone_kwargs or {})
        self.backbone = build_backbone(backbone, spatial_dims, in_channels, **backbone_kwargs)
        self.backbone.checkpointing = checkpointing
        if bn_momentum is not None:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = bn_momentum
        self.feature_size: list[int] = self._probe_feature_size(backbone, spatial_dims, in_channels, backbone_kwargs)
        self.head = ClassificationHead(
            head, self.backbone.out_channels, self.feature_size, out_channels, spatial_dims, dropout, **dict(head_kwargs or {})
        )
        if pretrained_weights is not None:
            load_pretrained_weights(self, resolve_pretrained_weights(pretrained_weights, backbone, download_weights))

    def _probe_feature_size(self, backbone: str, spatial_dims: int, in_channels: int, kwargs: dict) -> list[int]:
        shape = feature_size(backbone, spatial_dims, in_channels, self.img_size, kwargs)
        if shape is None:
            raise ImageTooSmall(backbone, spatial_dims, in_channels, self.img_size, kwargs)
        return shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input spatial size {list(x.shape[2:])} differs from the size the network was built for "
                f"{self.img_size} (img_size); resize the input or rebuild the network."
            )
        return self.head(self.backbone(x))


_TORCHVISION_DENSE_LAYER = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")


def _model_key(key: str, target: dict) -> str | None:
    """The model key a checkpoint key corresponds to, or None."""
    key = key.removeprefix("module.")  # DistributedDataParallel / DataParallel
    key = _TORCHVISION_DENSE_LAYER.sub(r"\1.layers.\2\3.\4", key)
    for candidate in (key, f"backbone.{key}"):
        if candidate in target:
            return candidate
    return None


def read_state_dict(path: str | Path, missing_hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, the one way wsr_med reads weights: ``weights_only=True`` (no code is
    unpickled), a plain state dict or one nested under ``state_dict`` / ``model`` / ``network``.

    Raises:
        WsrMedError: the file does not exist (``missing_hint`` says what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise WsrMedError(f"checkpoint not found: {path}" + (f" ({missing_hint})" if missing_hint else ""))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "network"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def load_pretrained_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load the tensors of a local checkpoint that match ``model`` by name and shape, and say which.

    Accepts a plain state dict or one nested under ``state_dict``/``model``/``network``; keys
    of a MONAI backbone (``features.*``, ``_conv_stem.*``), of a DDP model (``module.*``) and
    torchvision's DenseNet names are mapped. An RGB first convolution loaded into a
    1-channel model is summed over its colour channels. Loading uses ``weights_only=True``.

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...]}``: model keys loaded, checkpoint
        keys ignored (unknown name or incompatible shape), model keys left as initialised.
    """
    path = Path(path)
    state = read_state_dict(path, "the pretrained_weights setting names it")
    target = model.state_dict()
    new_state, skipped = {}, []
    for key, value in state.items():
        dest = _model_key(key, target)
        if dest is None or not isinstance(value, torch.Tensor):
            skipped.append(key)
            continue
        want = target[dest].shape
        if value.shape != want and value.dim() > 2 and value.shape[1] == 3 and want[1] == 1 and value.shape[2:] == want[2:]:
            value = value.sum(dim=1, keepdim=True)  # RGB stem -> grayscale stem
        if value.shape != want:
            skipped.append(f"{key} (shape {tuple(value.shape)} != {tuple(want)})")
            continue
        new_state[dest] = value
    report = {"loaded": sorted(new_state), "skipped": skipped, "missing": [k for k in target if k not in new_state]}
    # old checkpoints carry no BatchNorm step counters; every other backbone tensor must come from the file
    unmatched = [k for k in report["missing"] if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    if unmatched:
        raise WsrMedError(f"pretrained_weights {path} does not fit this backbone: {len(unmatched)} of its tensors are not "
                          f"in the file or have another shape (e.g. {', '.join(unmatched[:5])}); "
                          f"checkpoint tensors skipped: {', '.join(skipped[:5]) or 'none'}")
    model.load_state_dict(new_state, strict=False)
    logger.info(
        "pretrained_weights %s: loaded %d of the model's %d tensors, %d checkpoint tensors skipped%s; left as initialised: %s",
        path, len(report["loaded"]), len(target), len(skipped), f" ({', '.join(skipped[:10])})" if skipped else "",
        ", ".join(report["missing"][:10]) + (" ..." if len(report["missing"]) > 10 else "") or "none",
    )
    return report
