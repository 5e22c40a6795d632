"""Probes of how much a trained classifier relies on WHERE features are."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["shuffle_positions", "logits_with_shuffled_positions", "gradcam_layer", "gradcam"]


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


def _to_unit_range(heat: torch.Tensor) -> torch.Tensor:
    """Each sample's map scaled to [0, 1] with its maximum at 1 (a constant map gives 0)."""
    flat = heat.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scale = torch.where(high > low, high - low, torch.ones_like(high))
    return (heat - low.view(-1, *[1] * (heat.ndim - 1))) / scale.view(-1, *[1] * (heat.ndim - 1))


def gradcam(net: nn.Module, images: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
    """MONAI Grad-CAM of a WiseSrNet at its last feature map: ``(B, 1, *S)`` in [0, 1], 1 where the
    class score depends most on the input (the predicted class unless ``class_idx``).

    MONAI's default post-processing maps (min, max) to (1, 0), so that drawn with an ordinary colour
    map the least important region would look the hottest; this keeps the usual orientation.
    """
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=net, target_layers=gradcam_layer(net), postprocessing=_to_unit_range)
    with torch.enable_grad():
        return cam(images.clone().requires_grad_(False), class_idx=class_idx).detach()
