"""Probes of how much a trained classifier relies on WHERE features are, and where its evidence lies."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["HeadEvidence", "shuffle_positions", "logits_with_shuffled_positions", "gradcam_layer", "gradcam",
           "strongest_point", "to_source_pixels"]


class HeadEvidence:
    """The head's own account of a batch: the logits, and for any class the contribution of each position of the
    backbone's last feature map to that class's logit.

    Every head of :data:`wsr_med.networks.HEADS` is positively homogeneous in the feature map ``F`` up to its bias
    terms (average and max pools, the generalised mean, Wise-SrNet's depthwise kernel, the linear layer; dropout is off
    in evaluation), so by Euler's theorem ``logit_c - bias = sum over positions and channels of F * d logit_c / d F``:
    the map ``sum_channels(F * grad)`` is the exact decomposition of the logit by position (class activation mapping,
    generalised to heads that weigh positions differently, as Wise-SrNet does). It costs one backward pass through the
    head alone; the backbone runs once, without gradients.

    Args:
        network: a :class:`wsr_med.networks.WiseSrNet` (a DDP wrapper is unwrapped), in evaluation mode.
        images: ``(N, C, *S)``.

    Attributes:
        logits: ``(N, classes)``, detached.
    """

    def __init__(self, network: nn.Module, images: torch.Tensor) -> None:
        network = getattr(network, "module", network)
        with torch.no_grad():
            self._features = network.backbone(images)
        self._features.requires_grad_(True)
        with torch.enable_grad():
            self._logits = network.head(self._features)
        self.logits = self._logits.detach()
        self.feature_size = tuple(self._features.shape[2:])

    def maps(self, class_idx: Sequence[int], against_mean: bool = False) -> torch.Tensor:
        """``(N, *feature_size)``: the contribution of each position to the logit of ``class_idx[n]`` for sample n;
        ``against_mean``: to that logit minus the mean of all logits, what a softmax decides on (for two classes, half
        their difference: the evidence for one class against the other, not what raises both alike)."""
        idx = torch.as_tensor(list(class_idx), dtype=torch.long, device=self._logits.device)
        logits = self._logits - self._logits.mean(1, keepdim=True) if against_mean else self._logits
        chosen = logits.gather(1, idx[:, None]).sum()
        (grad,) = torch.autograd.grad(chosen, self._features, retain_graph=True)
        return (grad * self._features).sum(1).detach()


def strongest_point(contribution: torch.Tensor, image_size: int) -> tuple[float, ...]:
    """Where a contribution map ``(*feature_size)`` is strongest, in the coordinates of the network's input
    (``image_size`` per axis, continuous: the centre of the strongest feature cell), axis order as the map's."""
    flat = int(torch.argmax(contribution))
    cell = []
    for size in reversed(contribution.shape):
        cell.append(flat % size)
        flat //= size
    return tuple((k + 0.5) * image_size / size for k, size in zip(reversed(cell), contribution.shape))


def to_source_pixels(point: Sequence[float], source_shape: Sequence[int], image_size: int) -> tuple[float, ...]:
    """A point in the network's input back in the source image's pixels, undoing the preprocessing's resize of the
    longest side to ``image_size`` and its centred padding (:func:`wsr_med.data.scan_transforms`); clipped to the
    image. ``source_shape``: the source's (rows, columns[, ...])."""
    scale = image_size / max(source_shape)
    out = []
    for p, n in zip(point, source_shape):
        resized = max(1, round(n * scale))
        before = (image_size - resized) // 2
        out.append(min(max((p - before) / scale, 0.0), float(n)))
    return tuple(out)


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
