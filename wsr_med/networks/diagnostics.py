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


def gradcam(net: nn.Module, images: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
    """MONAI Grad-CAM of a WiseSrNet at its last feature map: ``(B, 1, *S)`` in [0, 1], 1 where the
    class score depends most on the input (the predicted class unless ``class_idx``).

    MONAI's default post-processing maps (min, max) to (1, 0), so that drawn with an ordinary colour
    map the least important region would look the hottest; this keeps the usual orientation.
    """
    from monai.transforms import ScaleIntensity
    from monai.visualize import GradCAM

    scale = ScaleIntensity(minv=0.0, maxv=1.0)  # each sample's map on its own, as MONAI's default does
    cam = GradCAM(nn_module=net, target_layers=gradcam_layer(net),
                  postprocessing=lambda heat: torch.stack([scale(h) for h in heat]))
    with torch.enable_grad():
        return cam(images.clone().requires_grad_(False), class_idx=class_idx).detach()
