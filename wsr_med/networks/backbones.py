"""Feature extractors built from MONAI's DenseNet and EfficientNet.

Each encoder keeps MONAI's module names, so a MONAI classifier's state dict loads into it
(prefixed ``backbone.`` inside :class:`~wsr_med.networks.WiseSrNet`), and returns the last
feature map after the backbone's final activation: ``(B, in_channels, *S) -> (B, out_channels, *S/32)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DenseNet, EfficientNetBN
from monai.networks.nets.efficientnet import efficientnet_params
from monai.utils import look_up_option

from wsr_med.networks.checkpointing import run_segments

__all__ = ["DenseNetFeatures", "EfficientNetFeatures", "BACKBONES", "build_backbone", "backbone_label"]

DENSENET_BLOCKS = {
    "densenet121": (6, 12, 24, 16),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
    "densenet264": (6, 12, 64, 48),
}


class DenseNetFeatures(nn.Module):
    """MONAI DenseNet ``features`` followed by its final ReLU.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        block_config: layers per dense block (e.g. ``(6, 12, 24, 16)`` for DenseNet121).
        kwargs: other :class:`monai.networks.nets.DenseNet` arguments (``init_features``,
            ``growth_rate``, ``bn_size``, ``dropout_prob``, ``act``, ``norm``); small values give
            the reduced configurations used for CPU studies and tests.

    Set ``checkpointing = True`` to recompute each dense block (with its transition) in backward
    instead of keeping its activations (:mod:`wsr_med.networks.checkpointing`).
    """

    def __init__(self, spatial_dims: int, in_channels: int, block_config: Sequence[int], **kwargs) -> None:
        super().__init__()
        net = DenseNet(spatial_dims, in_channels, out_channels=1, block_config=block_config, **kwargs)
        self.features = net.features
        self.act = net.class_layers.relu
        self.out_channels: int = net.class_layers.out.in_features
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._forward_segments(x)
        return self.act(self.features(x))

    @torch.jit.unused
    def _forward_segments(self, x: torch.Tensor) -> torch.Tensor:
        # the stem, then each dense block with the transition after it; the final norm joins the last block
        segments: list[list[nn.Module]] = [[]]
        for name, module in self.features.named_children():
            if name.startswith("denseblock"):
                segments.append([])
            segments[-1].append(module)
        return self.act(run_segments(segments, x, checkpointing=True))


class EfficientNetFeatures(nn.Module):
    """MONAI EfficientNetBN (b0..b8) up to its head convolution, BatchNorm and swish.

    Swish is ``nn.SiLU``: the same function as MONAI's memory-efficient swish, also memory
    efficient in PyTorch's native kernel, and scriptable (TorchScript export).

    Args:
        model_name: ``efficientnet-b0`` .. ``efficientnet-b8``.
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        kwargs: other :class:`monai.networks.nets.EfficientNetBN` arguments (e.g. ``norm``).

    Set ``checkpointing = True`` to recompute each MBConv stage in backward instead of keeping its
    activations (:mod:`wsr_med.networks.checkpointing`).
    """

    def __init__(self, model_name: str, spatial_dims: int, in_channels: int, **kwargs) -> None:
        super().__init__()
        net = EfficientNetBN(model_name, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
        for name in ("_conv_stem", "_conv_stem_padding", "_bn0", "_blocks", "_conv_head", "_conv_head_padding", "_bn1"):
            setattr(self, name, getattr(net, name))
        self._swish = nn.SiLU()
        for block in self._blocks.modules():
            if hasattr(block, "_swish"):
                block._swish = nn.SiLU()
        self.out_channels: int = net._fc.in_features
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._forward_segments(x)
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(x))))
        x = self._blocks(x)
        return self._swish(self._bn1(self._conv_head(self._conv_head_padding(x))))

    @torch.jit.unused
    def _forward_segments(self, x: torch.Tensor) -> torch.Tensor:
        # the stem, then one segment per MBConv stage (MONAI builds each stage as one Sequential)
        segments: list[list[nn.Module]] = [[self._conv_stem_padding, self._conv_stem, self._bn0, self._swish]]
        segments += [[stage] for stage in self._blocks]
        segments[-1] += [self._conv_head_padding, self._conv_head, self._bn1, self._swish]
        return run_segments(segments, x, checkpointing=True)


def _densenet(name: str) -> Callable[..., nn.Module]:
    # block_config may be overridden (reduced configurations); it defaults to the named network's
    return lambda spatial_dims, in_channels, **kw: DenseNetFeatures(
        spatial_dims, in_channels, **{"block_config": DENSENET_BLOCKS[name], **kw}
    )


def _efficientnet(name: str) -> Callable[..., nn.Module]:
    return lambda spatial_dims, in_channels, **kw: EfficientNetFeatures(name, spatial_dims, in_channels, **kw)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: _densenet(name) for name in DENSENET_BLOCKS},
    **{name: _efficientnet(name) for name in efficientnet_params if name[-2:] != "l2"},
}


def build_backbone(name: str, spatial_dims: int, in_channels: int, **kwargs) -> nn.Module:
    """Build the encoder called ``name`` (one of :data:`BACKBONES`); ``kwargs`` go to the MONAI network."""
    return look_up_option(name, BACKBONES)(spatial_dims, in_channels, **kwargs)


def backbone_label(name: str, backbone_kwargs: dict | None = None) -> str:
    """A short name that says what the backbone is: ``densenet121``, or for a reduced DenseNet its
    ``init_features-growth_rate-blocks`` (``densenet-16-8-2222``); other options are marked ``+``."""
    kwargs = dict(backbone_kwargs or {})
    if name.startswith("densenet") and {"init_features", "growth_rate", "block_config"} & set(kwargs):
        blocks = "".join(str(b) for b in kwargs.pop("block_config", DENSENET_BLOCKS[name]))
        label = f"densenet-{kwargs.pop('init_features', 64)}-{kwargs.pop('growth_rate', 32)}-{blocks}"
    else:
        label = name
    return label + ("+" if kwargs else "")
