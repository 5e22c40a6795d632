"""Turn a trained run folder into a self-contained MONAI model-zoo bundle (``wsr-med export-bundle``).

The exported bundle pins the run's network, preprocessing and classes in its configs, holds the
weights (``models/model.pt``) and their TorchScript (``models/model.ts``, made by MONAI's own
``ckpt_export``), and documents the run's numbers. Nothing that names a patient or a folder goes in:
path settings are hashed, the datalist stays behind, and text from the data (class names) is escaped
for the format it is written into.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from importlib.metadata import version as package_version
from pathlib import Path

from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_path
from wsr_med.handlers.reports import VALIDATION_CAVEAT
from wsr_med.runs import RunFolder, path_id, settings_without_paths
from wsr_med.settings import RECIPE_SETTINGS
from wsr_med.workflows.bundle import BUNDLE
from wsr_med.workflows.model import TrainedModel

__all__ = ["export_bundle", "strip_torchscript_debug"]

SEMANTIC_VERSION = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
# DICOM modality -> the metadata schema's ``modality`` words.
MODALITIES = {"CR": "xray", "DX": "xray", "DR": "xray", "MG": "xray", "RF": "xray", "XA": "xray", "CT": "ct",
              "MR": "mri", "US": "ultrasound", "PT": "pet", "NM": "spect", "OT": "light"}


def _markdown(text: object) -> str:
    """``text`` as literal Markdown (class names come from folder names: nothing in them may become markup)."""
    text = re.sub(r"[\x00-\x1f\x7f]", " ", str(text))
    return re.sub(r"([\\`*_{}\[\]#!|<>~&$])", r"\\\1", text)


def _code(value: object) -> str:
    """``value`` as JSON in a Markdown code span, safe in a table cell."""
    return "`" + json.dumps(value).replace("`", "'").replace("|", "\\|") + "`"


def _number(value) -> float | str:
    return round(float(value), 4) if isinstance(value, (int, float)) else "n/a"


def _modality(profile: dict | None) -> str:
    """The training scans' modality in the metadata schema's words ("" when no DICOM header said)."""
    modalities = (profile or {}).get("modalities") or {}
    return ", ".join(sorted({MODALITIES.get(m, m.lower()) for m in modalities}))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_bundle(run_dir: str | Path, bundle_dir: str | Path, version: str = "1.0.0",
                  data_license: str | Path | None = None, name: str | None = None) -> Path:
    """Write the bundle of the trained run ``run_dir`` to ``bundle_dir`` (which must not exist) and return it.

    Args:
        run_dir: a finished (or at least validated) training run folder: ``model.pt``, ``config.json``, ``classes.json``.
        bundle_dir: the new bundle folder; written under a temporary name and renamed, so it is whole or absent.
        version: the bundle's version (``metadata.json`` and its changelog).
        data_license: a text file with the training data's licence, copied to ``docs/data_license.txt``.
        name: the bundle's human-readable name (default: from the run name).
    """
    from monai.bundle import ckpt_export

    run = RunFolder(run_dir)
    bundle_dir = Path(bundle_dir)
    if not SEMANTIC_VERSION.fullmatch(version):
        raise WsrMedError(f"--version {version!r} is not a semantic version MAJOR.MINOR.PATCH (e.g. 1.0.0), as the model "
                          "zoo requires")
    if bundle_dir.resolve().is_relative_to(run.path.resolve()):
        raise WsrMedError(f"{bundle_dir} is inside the run folder {run.path}: a bundle is shared, the run folder holds "
                          "the datalist and file names; choose a folder outside it")
    trained = run.trained_settings()
    classes = run.classes()
    settings = run.settings()
    best = run.best()
    evaluation = run.evaluation()
    profile = run.training_profile()
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    try:  # claimed now, exclusively: another export (or anything else) that made it first is never replaced
        bundle_dir.mkdir()
    except FileExistsError:
        raise WsrMedError(f"{bundle_dir} exists: export-bundle writes a new folder and never overwrites one") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}-", dir=bundle_dir.parent))
    written = False
    try:
        for folder in ("configs", "models", "docs"):
            (tmp / folder).mkdir()
        _write_models(run, tmp / "models", settings)
        _write_source(tmp / "source")
        _write_configs(tmp / "configs", TrainedModel(run.path), settings)
        metadata = _metadata(tmp, version, trained, classes, settings, best, evaluation, profile, name, run.multilabel())
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
        ckpt_export(net_id="network_def", filepath=str(tmp / "models" / "model.ts"), ckpt_file=str(tmp / "models" / "model.pt"),
                    meta_file=str(tmp / "configs" / "metadata.json"), config_file=str(tmp / "configs" / "inference.json"))
        strip_torchscript_debug(tmp / "models" / "model.ts")
        shutil.copy(BUNDLE / "LICENSE", tmp / "LICENSE")
        if data_license is not None:
            shutil.copy(data_license, tmp / "docs" / "data_license.txt")
        (tmp / "docs" / "README.md").write_text(_readme(metadata, trained, classes, settings, best, evaluation, run.multilabel(),
                                                        data_license is not None))
        (tmp / "large_files.yml").write_text(_large_files(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        try:
            os.replace(tmp, bundle_dir)  # over the empty folder claimed above; fails if anything was put in it since
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise WsrMedError(f"{bundle_dir}: another process put files in it while the bundle was written; nothing "
                              "was replaced (export to a new folder)") from None
        written = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not written:
            with contextlib.suppress(OSError):  # left as found when something else was put in it meanwhile
                bundle_dir.rmdir()
    return bundle_dir


def strip_torchscript_debug(path: Path) -> None:
    """Remove the debug entries (``*.debug_pkl``) of a TorchScript archive, in place.

    They map the compiled code back to its source, quoting the absolute paths of every source file (the
    environment's, the checkout's, a user's home); the model runs the same without them, only TorchScript's own
    error messages lose their source lines.
    """
    import zipfile

    with zipfile.ZipFile(path) as archive:
        kept = [(info, archive.read(info)) for info in archive.infolist() if not info.filename.endswith(".debug_pkl")]
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for info, data in kept:
            archive.writestr(info, data)


def _write_source(target: Path) -> None:
    """The wsr_med code the bundle was made with, as an installable project (``pip install ./source``): the
    configs call it, and the exported version may be on no package index."""
    import importlib.metadata

    import wsr_med

    shutil.copytree(Path(wsr_med.__file__).parent, target / "wsr_med",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".lock"))
    requires = [r for r in importlib.metadata.requires("wsr_med") or [] if "extra ==" not in r]
    (target / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "wsr_med"\nversion = "{package_version("wsr_med")}"\nrequires-python = ">=3.10"\n'
        f"dependencies = {json.dumps(requires)}\n\n"
        '[project.scripts]\nwsr-med = "wsr_med.cli:main"\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["wsr_med", "wsr_med.*"]\nexclude = ["wsr_med.bundles*"]\n\n'
        '[tool.setuptools.package-data]\nwsr_med = ["bundles/wise_srnet_classification/**/*"]\n')


def _write_models(run: RunFolder, models: Path, settings: dict) -> None:
    """The weights and what the inference config reads beside them; ``config.json`` with its paths hashed."""
    shutil.copy(run.model, models / RunFolder.MODEL)
    for name in (RunFolder.CLASSES, RunFolder.BEST, RunFolder.PROFILE, RunFolder.CALIBRATION):
        if (run / name).is_file():
            shutil.copy(run / name, models / name)
    (models / RunFolder.CONFIG).write_text(json.dumps({"settings": settings_without_paths(settings), "task": run.task(),
                                                       "exported": time.strftime("%Y-%m-%d")}, indent=1))


def _write_configs(configs: Path, model: TrainedModel, settings: dict) -> None:
    """The repository bundle's configs with this run pinned: inference.json names the trained settings and the
    network as literals (as model-zoo bundles do; :class:`wsr_med.workflows.TrainedModel` still refuses a
    contradicting override), train.json carries the recipe."""
    source = BUNDLE / "configs"
    inference = json.loads((source / "inference.json").read_text())
    inference.update({
        **model.settings,
        "classes": model.classes,
        "network_def": {"_target_": "wsr_med.networks.WiseSrNet", **model.network_args()},
        "predictions_file": "$@bundle_root + '/eval/predictions.csv'",
    })
    (configs / "inference.json").write_text(json.dumps(inference, indent=4))
    train = json.loads((source / "train.json").read_text())
    train.update({k: settings[k] for k in RECIPE_SETTINGS if k in settings})
    (configs / "train.json").write_text(json.dumps(train, indent=4))
    evaluate = json.loads((source / "evaluate.json").read_text())
    evaluate.update({"output_dir": "$@bundle_root + '/models'", "eval_dir": "$@bundle_root + '/eval'"})
    (configs / "evaluate.json").write_text(json.dumps(evaluate, indent=4))
    for name in ("multi_gpu_train.json", "logging.conf"):
        shutil.copy(source / name, configs / name)


def _metadata(bundle: Path, version: str, trained: dict, classes: list[str], settings: dict, best: dict,
              evaluation: dict | None, profile: dict | None, name: str | None, multilabel: bool = False) -> dict:
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    run_name = settings.get("run_name", "wise_srnet")
    wsr_version = package_version("wsr_med")
    metrics = {f"best_{best['metric']}": _number(best.get("value"))} if best else {}
    if evaluation and multilabel:
        metrics.update({"macro_auc": _number(evaluation.get("macro_auc")), "micro_auc": _number(evaluation.get("micro_auc")),
                        **{f"auc_{f}": _number(m.get("auc")) for f, m in evaluation.get("per_finding", {}).items()},
                        "n_cases": evaluation.get("n"), "evaluated_cases": (evaluation.get("provenance") or {}).get("cases", "")})
    elif evaluation:
        cases = (evaluation.get("provenance") or {}).get("cases", "")
        metrics.update({"auc": _number(evaluation.get("auc")), "accuracy": _number(evaluation.get("accuracy")),
                        "balanced_accuracy": _number(evaluation.get("balanced_accuracy")), "n_cases": evaluation.get("n")})
        metrics["evaluated_cases"] = cases
    else:
        metrics.update({"auc": "n/a", "accuracy": "n/a"})
    size = [int(trained["image_size"])] * int(trained["spatial_dims"])
    channels = {str(i): c for i, c in enumerate(classes)}
    output = {"format": "classes", "num_channels": len(classes), "spatial_shape": [len(classes)], "dtype": "float32",
              "is_patch_data": False, "channel_def": channels}
    inputs = metadata["network_data_format"]["inputs"]["image"]
    inputs.update({"num_channels": int(trained["in_channels"]), "spatial_shape": size, "modality": _modality(profile) or "unknown",
                   "channel_def": {str(i): "image" if trained["in_channels"] == 1 else f"channel {i}"
                                   for i in range(int(trained["in_channels"]))}})
    metadata["network_data_format"]["outputs"]["pred"] = {"type": "logits", "value_range": [], **output}
    metadata["network_data_format"]["post_processed_outputs"]["pred"] = {"type": "probabilities", "value_range": [0, 1], **output}
    metadata.update({
        "version": version,
        "changelog": {version: f"{time.strftime('%Y-%m-%d')}: exported by wsr_med {wsr_version} from the training run "
                               f"'{run_name}' ({trained['backbone']} with a {trained['head']} head, {size} px, classes "
                               f"{', '.join(classes)})"},
        "required_packages_version": {**metadata["required_packages_version"], "wsr_med": wsr_version},
        "name": name or f"Wise-SrNet classifier {run_name}",
        "task": (f"Multi-label classification of {_modality(profile) or 'medical'} scans: {len(classes)} findings, each "
                 f"present or not (independent sigmoids): {', '.join(classes)}" if multilabel else
                 f"Classification of {_modality(profile) or 'medical'} scans into {len(classes)} classes: {', '.join(classes)}"),
        "data_source": f"the training run's own data (location id {path_id(settings.get('dataset_dir'))}; "
                       f"{(profile or {}).get('n', '?')} training scans); see docs/README.md",
        "eval_metrics": metrics,
    })
    return metadata


def _large_files(bundle: Path) -> str:
    lines = ["# The model files and their SHA-256; fill in url where you host them (the files are already here).",
             "large_files:"]
    for name in ("model.pt", "model.ts"):
        lines += [f'  - path: "models/{name}"', '    url: ""', f'    hash_val: "{_sha256(bundle / "models" / name)}"',
                  '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _readme(metadata: dict, trained: dict, classes: list[str], settings: dict, best: dict, evaluation: dict | None,
            multilabel: bool, has_data_license: bool) -> str:
    metrics = metadata["eval_metrics"]
    size = " x ".join(str(s) for s in metadata["network_data_format"]["inputs"]["image"]["spatial_shape"])
    class_rows = "\n".join(f"| {i} | {_markdown(c)} |" for i, c in enumerate(classes))
    output = ("one logit per finding; `postprocessing` applies a sigmoid to each (findings are independent; each is "
              "called present at its own threshold, chosen on the validation split: `models/calibration.json`). Findings "
              "in output order:" if multilabel else "one logit per class; `postprocessing` applies a softmax. Classes in "
              "output order:")
    if evaluation and multilabel:
        rows = "".join(f"| {_markdown(f)} | {_number(m.get('auc'))} ({', '.join(str(_number(v)) for v in m.get('auc_ci95') or [])}) "
                       f"| {_number(m.get('prevalence'))} |\n" for f, m in sorted(
                           (evaluation.get("per_finding") or {}).items(), key=lambda fm: -(fm[1].get("auc") or 0)))
        perf = (f"Evaluated on {_markdown(metrics.get('evaluated_cases') or 'a labelled set')} ({evaluation.get('n')} cases): "
                f"macro AUC (mean over findings) {_number(evaluation.get('macro_auc'))} (95% CI "
                f"{', '.join(str(_number(v)) for v in evaluation.get('macro_auc_ci95') or [])}), micro AUC (pooled) "
                f"{_number(evaluation.get('micro_auc'))}.\n\n| finding | AUC (95% CI) | prevalence |\n|---|---|---|\n{rows}")
    elif evaluation:
        per_class = evaluation.get("per_class") or {}
        perf = (f"Evaluated on {_markdown(metrics.get('evaluated_cases') or 'a labelled folder')} "
                f"({evaluation.get('n')} cases, evaluated {_markdown((evaluation.get('provenance') or {}).get('evaluated', '?'))}):\n\n"
                "| metric | value |\n|---|---|\n"
                f"| AUC ({_markdown(evaluation.get('auc_kind', ''))}) | {_number(evaluation.get('auc'))} "
                f"(95% CI {', '.join(str(_number(v)) for v in evaluation.get('auc_ci95') or [])}) |\n"
                f"| accuracy | {_number(evaluation.get('accuracy'))} |\n"
                f"| balanced accuracy | {_number(evaluation.get('balanced_accuracy'))} |\n"
                + "".join(f"| sensitivity {_markdown(c)} | {_number(v.get('sensitivity'))} |\n" for c, v in per_class.items()))
    else:
        perf = ("No evaluation was run before the export (`wsr-med evaluate --output-dir RUN ...` writes one; "
                "export again after it).")
    if evaluation and evaluation.get("split") == "validation":
        perf = f"**Caveat:** {VALIDATION_CAVEAT}.\n\n{perf}"
    validation = (f"Best validation {best['metric']} during training: {_number(best.get('value'))} at epoch "
                  f"{best.get('epoch')} of {settings.get('max_epochs')}." if best else "")
    recipe = "\n".join(f"| `{k}` | {_code(settings[k])} |" for k in RECIPE_SETTINGS if k in settings)
    license_line = ("The training data's licence is in `docs/data_license.txt`." if has_data_license else
                    "The training data's licence was not given at export; ask the data's owner before sharing.")
    return f"""# {_markdown(metadata['name'])}

## Overview
{_markdown(metadata['task'])}. A MONAI {trained['backbone']} backbone whose last feature map is compressed by a
`{trained['head']}` head (Wise-SrNet, arXiv:2104.12294, learns the compression instead of averaging it
away), trained with wsr_med and exported from its run folder by `wsr-med export-bundle`.
Research use only; not a medical device.

## Data
Trained on the run's own data (location id `{path_id(settings.get('dataset_dir'))}`; paths and patients are not
part of the bundle), split at the patient level (validation fraction {settings.get('val_fraction')},
seed {settings.get('seed')}).

## Input and output
- Input `image`: {trained['in_channels']} channel(s), {size} pixels, float32 in [0, 1]: the scan's intensities
  between its {trained['intensity_percentiles']} percentiles, longest side resized to {trained['image_size']} and
  padded square (the bundle's `preprocessing` does this from a DICOM/PNG/JPEG/TIFF file).
- Output `pred`: {output}

| index | {'finding' if multilabel else 'class'} |
|---|---|
{class_rows}

## Training configuration
| setting | value |
|---|---|
{recipe}

## Performance
{validation}

{perf}

## Commands
Run from this folder. The configs call the `wsr_med` package ({metadata['required_packages_version']['wsr_med']}); its
code as exported is in `source/`: `pip install ./source "torch=={_torch_version()}"` installs it with its dependencies.

```bash
# predict every scan under a folder -> eval/predictions.csv
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /data/new_scans
# evaluate on a labelled class-per-folder directory -> eval/metrics.json, eval/report.html
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir /data/labelled
# check the network's input/output and export TorchScript again
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json
```

In Python: `monai.bundle.load(name="<this folder's name>", bundle_dir="<its parent>", workflow_type="inference")`
returns the network with these weights; `torch.jit.load("models/model.ts")` needs no wsr_med at all.

## References
{chr(10).join(f"- {_markdown(r)}" for r in metadata['references'])}

## License
The code and configs: Apache License 2.0 (`LICENSE`). {license_line}
"""
