"""Run the bundle's workflows from Python: the one door used by the CLI, the pipelines and the tests."""

from __future__ import annotations

import ast
import json
from importlib.resources import files
from pathlib import Path

from wsr_med.errors import WsrMedError
from wsr_med.settings import SETTINGS, check_known

__all__ = ["BUNDLE", "check_overrides", "config_files", "parse_overrides", "parse_value", "run_workflow", "parse_bundle"]

# The bundle ships inside the package (package data), so an installed wheel has it; in a checkout,
# bundles/wise_srnet_classification links here.
BUNDLE = Path(str(files("wsr_med") / "bundles" / "wise_srnet_classification"))


def config_files(workflow: str, bundle_root: Path = BUNDLE) -> list[str]:
    """``inference.json`` alone (it stands alone, as in the model zoo); ``train.json`` for ``train``, with
    ``<workflow>.json`` on top (an override) for ``evaluate`` and ``multi_gpu_train``."""
    configs = Path(bundle_root) / "configs"
    first = "inference.json" if workflow == "inference" else "train.json"
    if not (configs / first).is_file():
        raise FileNotFoundError(f"bundle not found in {bundle_root} (wsr-med bundle-path prints the installed one)")
    if workflow in ("train", "inference"):
        return [str(configs / first)]
    return [str(configs / "train.json"), str(configs / f"{workflow}.json")]


def parse_value(text: str):
    """An override value as JSON / a Python literal, else the string as it is."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def parse_overrides(items: list[str] | None) -> dict:
    """``["key=value", ...]`` (``--set``) as ``{key: parsed value}``; an item without ``=`` is refused in one line."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WsrMedError(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = parse_value(value)
    return out


def check_overrides(workflow: str, overrides: dict, bundle_root: Path = BUNDLE) -> None:
    """Refuse an override that names neither a setting (:data:`wsr_med.settings.SETTINGS`) nor an id of the
    workflow's configs (``key`` or ``key#sub#...``), before anything runs: a typo would otherwise become a new,
    unused config id and the run would train with the default."""
    ids = set()
    for path in config_files(workflow, bundle_root):
        ids |= set(json.loads(Path(path).read_text()))
    check_known((key.split("#")[0] for key in overrides), extra=ids - set(SETTINGS))


def run_workflow(workflow: str, bundle_root: Path = BUNDLE, **overrides) -> None:
    """``monai.bundle.run`` of ``train``, ``evaluate`` or ``inference`` with ``overrides`` (config ids -> values);
    an unknown setting is refused first (:func:`check_overrides`)."""
    import gc

    from monai.bundle import run

    from wsr_med.tracking import fail_open_runs

    check_overrides(workflow, overrides, bundle_root)
    configs = Path(bundle_root) / "configs"
    try:
        run(config_file=config_files(workflow, bundle_root), meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"), bundle_root=str(bundle_root), **overrides)
    except BaseException:
        fail_open_runs()  # no MLflow run is left RUNNING by a failed workflow
        raise
    finally:
        # ignite engines and their handlers refer to each other: collect them now, so that a caller running
        # workflow after workflow (an ablation) does not keep their loader processes and GPU tensors alive
        gc.collect()


def parse_bundle(workflow: str = "train", bundle_root: Path = BUNDLE, **overrides):
    """A MONAI ``ConfigParser`` holding the bundle config with ``overrides``; ``parser.get_parsed_content(id)`` builds parts."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(workflow, bundle_root))
    parser.read_meta(str(Path(bundle_root) / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_root)
    for key, value in overrides.items():
        parser[key] = value
    return parser
