"""Every run setting, in one table: what it is, its default, and how the run folder, MLflow and an export treat it.

The bundle's ``train.json`` holds the same defaults as data (``tests/test_settings.py`` checks that each literal
default there equals :data:`SETTINGS`'s, and that ``run_settings`` records exactly the settings marked
``recorded``); code defaults import them from here (:func:`default`); every list of settings the project uses
(:data:`TRAINED_SETTINGS`, :data:`PATH_SETTINGS`, ...) is derived from this table, and no other module spells one.
:func:`check_known` refuses a setting name that is none of them, naming the closest.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from wsr_med.errors import WsrMedError

__all__ = ["SETTINGS", "Setting", "COMPUTED", "KINDS", "TRAINED_SETTINGS", "PATH_SETTINGS", "MACHINE_SETTINGS",
           "CONTINUABLE_SETTINGS", "RECIPE_SETTINGS", "RECORDED_SETTINGS", "CLASS_BALANCE", "TASKS", "SELECTION_AVERAGES",
           "UnknownSetting",
           "check_known", "default"]

KINDS = ("network", "preprocessing", "data", "optimisation", "machine", "tracking")
COMPUTED = object()  # the default is computed by the bundle config (a ``$`` expression: the device, a path below output_dir)


@dataclass(frozen=True)
class Setting:
    """One run setting.

    Attributes:
        kind: one of :data:`KINDS`; ``network`` and ``preprocessing`` define the trained model (evaluate, predict,
            serve and export take them from the run folder).
        default: the value when none is given (:data:`COMPUTED`: the bundle config computes it).
        path: a file or folder: stored resolved, compared resolved, sent to MLflow only as a keyed hash.
        continuable: may change when training continues in the same run folder (every other recorded setting
            must stay as it was).
        recipe: part of the training recipe an exported bundle's ``train.json`` and docs carry.
        recorded: saved in the run folder's ``config.json`` (the bundle's ``run_settings``) and logged as MLflow params.
    """

    kind: str
    default: Any
    path: bool = False
    continuable: bool = False
    recipe: bool = False
    recorded: bool = True


def _machine(default: Any, recorded: bool = True) -> Setting:
    return Setting("machine", default, continuable=True, recorded=recorded)


def _tracking(default: Any, recorded: bool = True) -> Setting:
    return Setting("tracking", default, continuable=True, recorded=recorded)


SETTINGS: dict[str, Setting] = {
    # the model and what it sees
    "image_size": Setting("network", 224, recipe=True),
    "in_channels": Setting("network", 1, recipe=True),
    "spatial_dims": Setting("network", 2, recipe=True),
    "backbone": Setting("network", "densenet121", recipe=True),
    "backbone_kwargs": Setting("network", {}, recipe=True),
    "head": Setting("network", "wise", recipe=True),
    "head_kwargs": Setting("network", {}, recipe=True),
    "dropout": Setting("network", 0.0, recipe=True),
    "bn_momentum": Setting("network", 0.1, recipe=True),
    "voi_lut": Setting("preprocessing", None, recipe=True),
    "intensity_percentiles": Setting("preprocessing", [0.5, 99.5], recipe=True),
    # the data and its split
    "dataset_dir": Setting("data", "synthetic", path=True),
    "patient_pattern": Setting("data", r"^(.*?\d+)[-_][^\d]*\d+$", recipe=True),
    "reject_degenerate": Setting("data", True, recipe=True),
    "max_pixels": Setting("data", 100_000_000, recipe=True),
    "val_fraction": Setting("data", 0.2, recipe=True),
    "test_fraction": Setting("data", 0.2, recipe=True),
    "n_folds": Setting("data", 0),
    "fold": Setting("data", 0),
    "inner_validation": Setting("data", False),
    "class_balance": Setting("data", "none", recipe=True),
    "task": Setting("data", "auto", recipe=True),  # auto (from the labels' layout) | multiclass | multilabel
    "findings": Setting("data", None, recipe=True),  # multi-label files: pick / rename finding columns
    "uncertain": Setting("data", "zeros", recipe=True),  # multi-label files: ignore | zeros | ones
    "synthetic": Setting("data", {"n_per_class": 150, "image_size": 256, "n_classes": 2, "seed": 1234}),
    "eval_split": Setting("data", "all", recorded=False),
    "predictions_file": Setting("data", COMPUTED, path=True, recorded=False),
    # how it learns
    "pretrained_weights": Setting("optimisation", None, path=True),
    "finetune": Setting("optimisation", {"freeze_backbone_epochs": 0, "backbone_lr_scale": 1.0}),
    "max_epochs": Setting("optimisation", 30, continuable=True, recipe=True),
    "val_interval": Setting("optimisation", 1, continuable=True),
    "batch_size": Setting("optimisation", 16, recipe=True),
    "learning_rate": Setting("optimisation", 0.0003, recipe=True),
    "weight_decay": Setting("optimisation", 0.0001, recipe=True),
    "seed": Setting("optimisation", 0, recipe=True),
    "operating_point": Setting("optimisation", "youden"),
    # multi-label: the findings with this many validation positives and negatives choose the best epoch (ModelSelection)
    "selection_min_cases": Setting("optimisation", 10, recipe=True),
    "selection_average": Setting("optimisation", "macro", recipe=True),  # macro | micro | weighted
    # this machine
    "output_dir": Setting("machine", "runs/wise_srnet", path=True, continuable=True),
    "cache_dir": Setting("machine", COMPUTED, path=True, continuable=True),
    "bundle_root": Setting("machine", ".", path=True, continuable=True, recorded=False),
    "device": _machine(COMPUTED),
    "amp": _machine(COMPUTED),
    "amp_dtype": _machine(COMPUTED),
    "checkpointing": _machine(False),
    "channels_last": _machine(COMPUTED),
    "cache": _machine("disk"),
    "num_workers": _machine(COMPUTED),
    "num_threads": _machine(None, recorded=False),
    "progress_bar": _machine(True),
    "download_weights": _machine(False, recorded=False),
    # MLflow
    "tracking_uri": _tracking(COMPUTED, recorded=False),
    "experiment_name": _tracking("wsr_med"),
    "run_name": _tracking(COMPUTED),
    "registered_model_name": _tracking(COMPUTED),
    "parent_run_id": _tracking("", recorded=False),
}

TRAINED_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.kind in ("network", "preprocessing"))
PATH_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.path)
MACHINE_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.kind == "machine" and not s.path)
CONTINUABLE_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.continuable)
RECIPE_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.recipe)
RECORDED_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.recorded)
# what ``wsr-med predict`` from or to a PACS takes (wsr_med.pacs); everything about the model comes from the run folder
PACS_SETTINGS = ("output_dir", "dataset_dir", "predictions_file", "batch_size", "max_pixels", "device")
CLASS_BALANCE = ("none", "weighted_loss", "sampler")  # the values of ``class_balance``
TASKS = ("auto", "multiclass", "multilabel")  # the values of ``task``
SELECTION_AVERAGES = ("macro", "micro", "weighted")  # the values of ``selection_average``


def default(key: str) -> Any:
    """The default of ``key`` (a copy for lists and dicts, so no caller can change the table)."""
    value = SETTINGS[key].default
    if value is COMPUTED:
        raise KeyError(f"{key} has no literal default: the bundle config computes it")
    return type(value)(value) if isinstance(value, (list, dict)) else value


class UnknownSetting(WsrMedError):
    """A setting name that is none of :data:`SETTINGS` (nor of the extra names a command allows)."""


def check_known(keys, extra=()) -> None:
    """Refuse the first of ``keys`` that is neither a setting nor in ``extra``, naming the closest known name.

    Raises:
        UnknownSetting: ``unknown setting 'max_epoch' (did you mean max_epochs?)``.
    """
    known = set(SETTINGS) | set(extra)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else " (the settings are listed in the bundle docs)"
            raise UnknownSetting(f"unknown setting {key!r}{hint}")
