"""Classification heads: one string selects how the last feature map is compressed to a vector.

Every head is ``compression -> flatten -> dropout -> Linear``; only the compression differs
(timm's ``classifier.py`` pattern). Feature maps are ``(B, C, *spatial)`` with 1, 2 or 3
spatial axes; layers come from MONAI's dimension-generic factories.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, Pool
from monai.utils import ensure_tuple_rep, look_up_option

__all__ = [
    "HEADS",
    "default_pre_pool",
    "WiseCompression",
    "GlobalPool",
    "AvgMaxPool",
    "CatAvgMaxPool",
    "GeneralizedMeanPool",
    "FlattenAll",
    "build_compression",
    "ClassificationHead",
    "WiseSrNetHead",
]


def default_pre_pool(feature_size: Sequence[int], max_kernel: int = 6) -> tuple[int, ...]:
    """The Wise-SrNet average-pool size per axis: the smallest ``k`` with ``floor(f / k) <= max_kernel``.

    In closed form ``k = f // (max_kernel + 1) + 1``, so the depthwise kernel that follows
    (``f // k`` per axis) stays between ``max_kernel / 2`` and ``max_kernel`` for maps larger than
    ``max_kernel``, and maps that are already small are not pooled. It reproduces both reference
    points of the paper (stride-32 backbones):

    ============  ============  ======  ================
    input size    feature map   pool k  depthwise kernel
    ============  ============  ======  ================
    128           4             1       4
    224           7             2       3   (paper)
    256           8             2       4
    512           16            3       5   (paper)
    1024          32            5       6
    2048          64            10      6
    ============  ============  ======  ================

    Each axis is treated alone, so anisotropic 2D maps and 3D volumes follow the same rule.
    """
    return tuple(f // (max_kernel + 1) + 1 for f in feature_size)


class WiseCompression(nn.Module):
    """Wise-SrNet compression: average pool, then a depthwise conv whose kernel covers the pooled map.

    Follows the authors' Keras code (arXiv:2104.12294): pool ``k`` with stride ``k``, 'valid'
    padding; depthwise conv with depth multiplier 1, bias, no activation or normalisation,
    weights ~ N(0, 0.01), bias 0. With ``nonneg`` the weights are projected to ``max(w, 0)`` by
    :meth:`project_` after every optimizer step (Keras ``NonNeg``); the bias stays free.

    Args:
        channels: C, channels of the feature map.
        feature_size: spatial size of the feature map this module is built for.
        spatial_dims: 1, 2 or 3.
        pre_pool: average-pool size per axis (int or sequence); ``None`` uses :func:`default_pre_pool`.
            ``1`` disables the pool (the ``depthwise`` head).
        max_kernel: the largest depthwise kernel per axis that the default rule aims for.
        nonneg: constrain the depthwise weights to be non-negative.

    Shapes: ``(B, C, *feature_size) -> (B, C)``.
    """

    def __init__(
        self,
        channels: int,
        feature_size: Sequence[int],
        spatial_dims: int,
        pre_pool: int | Sequence[int] | None = None,
        max_kernel: int = 6,
        nonneg: bool = True,
    ) -> None:
        super().__init__()
        feature_size = ensure_tuple_rep(feature_size, spatial_dims)
        pool = default_pre_pool(feature_size, max_kernel) if pre_pool is None else ensure_tuple_rep(pre_pool, spatial_dims)
        kernel = tuple(f // k for f, k in zip(feature_size, pool))
        if min(kernel) < 1:
            raise ValueError(f"pre_pool {pool} is larger than the feature map {feature_size}.")
        self.pre_pool = pool
        self.kernel_size = kernel
        self.nonneg = nonneg
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=pool, stride=pool) if max(pool) > 1 else nn.Identity()
        self.depthwise = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=kernel, groups=channels, bias=True)
        nn.init.normal_(self.depthwise.weight, 0.0, 0.01)
        nn.init.zeros_(self.depthwise.bias)

    @torch.no_grad()
    def project_(self) -> None:
        """Apply the constraint in place (no-op when ``nonneg`` is False)."""
        if self.nonneg:
            self.depthwise.weight.clamp_(min=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.pool(x)).flatten(1)


class GlobalPool(nn.Module):
    """Global average (``gap``) or max (``gmp``) pooling. ``(B, C, *S) -> (B, C)``."""

    def __init__(self, spatial_dims: int, mode: str = "avg") -> None:
        super().__init__()
        pool = Pool.ADAPTIVEAVG if mode == "avg" else Pool.ADAPTIVEMAX
        self.pool = Pool[pool, spatial_dims](1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)


class AvgMaxPool(nn.Module):
    """Mean of global average and global max pooling. ``(B, C, *S) -> (B, C)``."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.avg = GlobalPool(spatial_dims, "avg")
        self.max = GlobalPool(spatial_dims, "max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.avg(x) + self.max(x))


class CatAvgMaxPool(AvgMaxPool):
    """Concatenated global average and global max pooling. ``(B, C, *S) -> (B, 2C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.avg(x), self.max(x)], dim=1)


class GeneralizedMeanPool(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (Radenovic et al. 2018). ``(B, C, *S) -> (B, C)``.

    Args:
        p: initial exponent (1 is GAP, large p approaches GMP).
        eps: floor applied before the power, for a finite gradient at 0.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).flatten(2).mean(-1).pow(1.0 / self.p)


class FlattenAll(nn.Module):
    """No compression: the whole map goes to the Linear layer (VGG-style). ``(B, C, *S) -> (B, C * prod(S))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


HEADS = ("wise", "gap", "gmp", "avgmax", "catavgmax", "gem", "depthwise", "wise_unconstrained", "flatten")


def build_compression(
    head: str, channels: int, feature_size: Sequence[int], spatial_dims: int, **head_kwargs
) -> tuple[nn.Module, int]:
    """The one switch that selects a head's compression.

    Args:
        head: one of :data:`HEADS`.
        channels: C, channels of the feature map.
        feature_size: spatial size of the feature map.
        spatial_dims: 1, 2 or 3.
        head_kwargs: ``pre_pool``/``max_kernel`` for ``wise`` and ``wise_unconstrained``, ``p``/``eps`` for ``gem``.

    Returns:
        the module ``(B, C, *feature_size) -> (B, F)`` and F.
    """
    head = look_up_option(head, HEADS)
    feature_size = ensure_tuple_rep(feature_size, spatial_dims)
    if head in ("wise", "wise_unconstrained"):
        return WiseCompression(channels, feature_size, spatial_dims, nonneg=head == "wise", **head_kwargs), channels
    if head == "depthwise":
        return WiseCompression(channels, feature_size, spatial_dims, pre_pool=1, nonneg=False, **head_kwargs), channels
    if head == "gem":
        return GeneralizedMeanPool(**head_kwargs), channels
    if head_kwargs:
        raise ValueError(f"head '{head}' takes no options, got {sorted(head_kwargs)}.")
    if head in ("gap", "gmp"):
        return GlobalPool(spatial_dims, "avg" if head == "gap" else "max"), channels
    if head == "avgmax":
        return AvgMaxPool(spatial_dims), channels
    if head == "catavgmax":
        return CatAvgMaxPool(spatial_dims), 2 * channels
    n_positions = 1
    for f in feature_size:
        n_positions *= f
    return FlattenAll(), channels * n_positions


class ClassificationHead(nn.Module):
    """``compression -> dropout -> Linear``: logits from a feature map.

    Args:
        head: compression name, one of :data:`HEADS`.
        in_channels: C, channels of the feature map.
        feature_size: spatial size of the feature map the head is built for.
        out_channels: number of classes.
        spatial_dims: 1, 2 or 3.
        dropout: dropout probability before the Linear layer.
        head_kwargs: options of the compression, see :func:`build_compression`.

    The Linear layer starts from N(0, 0.01) weights and zero bias for every head (as in the
    reference code), so heads differ only in their compression.

    Shapes: ``(B, C, *feature_size) -> (B, out_channels)``.
    """

    def __init__(
        self,
        head: str,
        in_channels: int,
        feature_size: Sequence[int],
        out_channels: int,
        spatial_dims: int = 2,
        dropout: float = 0.0,
        **head_kwargs,
    ) -> None:
        super().__init__()
        self.compression, n_features = build_compression(head, in_channels, feature_size, spatial_dims, **head_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(n_features, out_channels)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.compression(x)))


class WiseSrNetHead(ClassificationHead):
    """The Wise-SrNet head: :class:`WiseCompression` with the non-negativity constraint, then dropout and Linear.

    Args: as :class:`ClassificationHead` without ``head``; ``pre_pool`` and ``max_kernel`` as in
    :class:`WiseCompression`.
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: Sequence[int],
        out_channels: int,
        spatial_dims: int = 2,
        dropout: float = 0.0,
        pre_pool: int | Sequence[int] | None = None,
        max_kernel: int = 6,
    ) -> None:
        super().__init__(
            "wise", in_channels, feature_size, out_channels, spatial_dims, dropout, pre_pool=pre_pool, max_kernel=max_kernel
        )
