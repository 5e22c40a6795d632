"""Probes of how much a trained classifier relies on WHERE features are."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["shuffle_positions", "logits_with_shuffled_positions", "gradcam_layer"]


def shuffle_positions(features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Permute the spatial positions of a feature map ``(B, C, *S)``, one random permutation per sample,
    the same for every channel: what is at each position is kept, where it is is lost."""
    b, c = features.shape[:2]
    flat = features.flatten(2)
    order = torch.stack([torch.randperm(flat.shape[2], generator=generator) for _ in range(b)]).to(features.device)
    shuffled = torch.gather(flat, 2, order[:, None, :].expand(b, c, -1))
    return shuffled.view_as(features)


@torch.no_grad()
def logits_with_shuffled_positions(net: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits of a :class:`~wsr_med.networks.WiseSrNet` whose final feature map is spatially shuffled.

    GAP-like heads give the same logits (they are permutation invariant by construction); the
    change for other heads measures their use of position.
    """
    net = getattr(net, "module", net)
    return net.head(shuffle_positions(net.backbone(x), generator))


def gradcam_layer(net: nn.Module) -> str:
    """The name of the layer giving a WiseSrNet backbone's last feature map, for ``monai.visualize.GradCAM``:
    the final ReLU of a DenseNet, the last BatchNorm of an EfficientNet (its swish module is shared)."""
    net = getattr(net, "module", net)
    return "backbone.act" if hasattr(net.backbone, "features") else "backbone._bn1"
