"""Activation checkpointing of backbone segments: large scans trained in a fraction of the memory.

A backbone is run as a few segments (DenseNet: the stem, then each dense block with its transition;
EfficientNet: the stem, then each MBConv stage). With checkpointing, each segment but the last keeps
only its input for backward and runs its forward again when the gradient reaches it
(``torch.utils.checkpoint``, non-reentrant). The last segment works at 1/32 of the input size, holds
little memory, and is not recomputed.

Recomputing a forward in training mode would update every BatchNorm's running statistics a second
time (and count the batch twice); they are restored after each recomputation, so a checkpointed
network trains to exactly the same state as a plain one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["run_segments"]


@contextlib.contextmanager
def _batchnorm_statistics_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Restore the running statistics of every BatchNorm in ``modules`` on exit."""
    buffers = [b for module in modules for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for current, before in zip(buffers, saved):
                current.copy_(before)


def _run(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def run_segments(segments: Sequence[Sequence[nn.Module]], x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``x`` through each segment's modules in turn; with ``checkpointing`` (and gradients on), every segment
    but the last is recomputed in backward instead of keeping its activations. ``(B, C, *S) -> (B, C', *S')``."""
    last = len(segments) - 1
    for i, modules in enumerate(segments):
        if checkpointing and i < last and torch.is_grad_enabled():
            x = checkpoint(_run, modules, x, use_reentrant=False,
                           context_fn=lambda m=modules: (contextlib.nullcontext(), _batchnorm_statistics_kept(m)))
        else:
            x = _run(modules, x)
    return x
