"""Weight constraints applied after every optimizer step (Keras ``kernel_constraint`` semantics).

One mechanism serves every training loop: :func:`attach_constraints` registers a post-step
hook on the optimizer, so the projection follows each real update, including under AMP's
``GradScaler.step`` (which skips ``optimizer.step`` on overflow, and then the hook too).

Plain PyTorch::

    model = WiseSrNet(out_channels=2)
    optimizer = torch.optim.Adam(model.parameters())
    attach_constraints(optimizer, model)        # once; or call project_constraints_(model) after each step
    for x, y in loader:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

MONAI / ignite workflows use :class:`wsr_med.handlers.ConstraintHandler`, which calls
:func:`attach_constraints` on the trainer's optimizer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from wsr_med.networks.heads import WiseCompression

__all__ = ["project_constraints_", "attach_constraints"]


def project_constraints_(model: nn.Module) -> None:
    """Project every constrained parameter of ``model`` in place (works through DDP/DataParallel wrappers)."""
    for module in model.modules():
        if isinstance(module, WiseCompression):
            module.project_()


def attach_constraints(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Call :func:`project_constraints_` on ``model`` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: project_constraints_(model))
