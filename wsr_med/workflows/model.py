"""A trained model as its run folder describes it, and the placement of networks on a device."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wsr_med.data import scan_transforms
from wsr_med.errors import WsrMedError
from wsr_med.metrics import Decision
from wsr_med.networks import WiseSrNet, read_state_dict
from wsr_med.runs import RunFolder
from wsr_med.settings import TRAINED_SETTINGS, default

__all__ = ["TrainedModel", "amp_dtype", "load_model", "place_network"]


class TrainedModel:
    """What evaluate, predict and serve take from a training run folder: the network and preprocessing its
    ``config.json`` describes, its classes, weights and decision. The bundle's ``evaluate.json`` and
    ``inference.json`` build one and take everything about the model from it, so neither spells a trained setting.

    Args:
        run_dir: the run folder (``output_dir``; ``models/`` in an exported bundle).
        requested: the settings the workflow was given. A network or preprocessing setting
            (:data:`wsr_med.settings.TRAINED_SETTINGS`) that is given (neither None nor its default) and differs from
            the trained value is refused, naming both (:meth:`wsr_med.runs.RunFolder.check_trained`).

    Raises:
        WsrMedError: not a trained run folder; a requested setting contradicts the trained one.
    """

    def __init__(self, run_dir: str | Path, requested: dict | None = None) -> None:
        self.run = RunFolder(run_dir)
        given = {k: v for k, v in (requested or {}).items()
                 if k in TRAINED_SETTINGS and v is not None and json.dumps(v) != json.dumps(default(k))}
        self.run.check_trained(given)
        self.settings = self.run.trained_settings()
        self.classes = self.run.classes()
        self.multilabel = self.run.multilabel()

    def __repr__(self) -> str:
        return f"TrainedModel('{self.run.path}')"

    @property
    def decision(self) -> Decision:
        """The run's temperature and operating point (:meth:`wsr_med.metrics.Decision.of_run`)."""
        return Decision.of_run(self.run)

    def network_args(self) -> dict:
        """The :class:`wsr_med.networks.WiseSrNet` arguments of the network the run trained (JSON-ready)."""
        s = self.settings
        return {"backbone": s["backbone"], "spatial_dims": s["spatial_dims"], "in_channels": s["in_channels"],
                "out_channels": len(self.classes), "img_size": s["image_size"], "head": s["head"], "dropout": s["dropout"],
                "backbone_kwargs": s["backbone_kwargs"], "head_kwargs": s["head_kwargs"], "bn_momentum": s["bn_momentum"]}

    def network_def(self) -> WiseSrNet:
        """The network the run trained, with fresh weights."""
        return WiseSrNet(**self.network_args())

    def network(self, device: torch.device | str = "cpu", network_def: torch.nn.Module | None = None,
                weights: str | Path | None = None) -> torch.nn.Module:
        """``network_def`` (default: :meth:`network_def`) with the run's weights (``model.pt``, or the ``weights`` file,
        e.g. a training checkpoint), on ``device``, in eval mode."""
        return load_model(network_def if network_def is not None else self.network_def(), weights or self.run.model, device)

    def probabilities(self, logits: torch.Tensor):
        """The network's ``(N, classes)`` output as probabilities: softmax, or one sigmoid per finding (multi-label);
        not yet calibrated (:attr:`decision` does that)."""
        logits = logits.detach().float().cpu()
        return (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)).numpy()

    def preprocessing(self, max_pixels: int = default("max_pixels")):
        """The evaluation preprocessing of the run's scans (:func:`wsr_med.data.scan_transforms`, ``train=False``)."""
        s = self.settings
        return scan_transforms(image_size=s["image_size"], in_channels=s["in_channels"], spatial_dims=s["spatial_dims"],
                               voi_lut=s["voi_lut"], intensity_percentiles=s["intensity_percentiles"], max_pixels=max_pixels)


def load_model(network: torch.nn.Module, checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load every weight of ``checkpoint`` into ``network`` (strict; read by :func:`wsr_med.networks.read_state_dict`)
    and return it on ``device`` in eval mode."""
    path = Path(checkpoint)
    state = read_state_dict(path, "has the training run completed a validation epoch?")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WsrMedError(f"{path} does not fit this network configuration (backbone, head, image_size, classes): {e}") from None
    return network.to(device).eval()


def amp_dtype() -> torch.dtype:
    """The autocast type on this machine's GPU: bfloat16 where supported (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def place_network(network: torch.nn.Module, device: torch.device | str, channels_last: bool = False) -> torch.nn.Module:
    """``network`` on ``device``; with ``channels_last``, its 4D weights in channels-last memory order, which
    tensor-core convolutions on CUDA run fastest in (2D networks; a no-op for 3D)."""
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if channels_last else network
