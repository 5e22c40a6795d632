"""The MONAI model zoo's bundle checks in full mode, as ``ci/verify_bundle.py`` of Project-MONAI/model-zoo runs them.

Adapted from that file (Copyright (c) MONAI Consortium, Apache License 2.0): the same order and the same MONAI
calls; without the zoo's per-bundle exclusion lists and its ``model_info.json`` (a bundle new to the zoo has no
previous versions), with the metadata schema read from a local copy (the zoo downloads it), and with the
inference properties checked through ``ConfigWorkflow.check_properties`` (the zoo does so per supported app).
"""

from __future__ import annotations

import json
import os

import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

NECESSARY_FILES = ["configs/metadata.json", "LICENSE"]
PREFERRED_FILES = ["models/model.pt", "configs/inference.json"]


def download_large_files(bundle_path: str) -> None:
    """The zoo fetches ``large_files.yml``'s entries; files already present must match their hash."""
    from monai.apps import download_url
    from monai.bundle import ConfigParser

    name = next((f"large_files.{s}" for s in ("yml", "yaml", "json") if os.path.isfile(os.path.join(bundle_path, f"large_files.{s}"))), None)
    if name is None:
        return
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_path, name))
    for entry in parser.get()["large_files"]:
        entry = dict(entry, fuzzy=True)
        if entry.get("hash_val", "") == "":
            entry.pop("hash_val", None)
        if entry.get("hash_type", "") == "":
            entry.pop("hash_type", None)
        entry["filepath"] = os.path.join(bundle_path, entry.pop("path"))
        download_url(**entry)


def verify_bundle_directory(bundle_path: str) -> None:
    download_large_files(bundle_path)
    for file in NECESSARY_FILES + PREFERRED_FILES:
        if not os.path.exists(os.path.join(bundle_path, file)):
            raise ValueError(f"necessary file {file} is not existing.")


def verify_version_changes(bundle_path: str) -> None:
    with open(os.path.join(bundle_path, "configs/metadata.json")) as f:
        metadata = json.load(f)
    for key in ("version", "changelog"):
        if key not in metadata:
            raise ValueError(f"'{key}' is missing in configs/metadata.json")
    if metadata["version"] not in metadata["changelog"]:
        raise ValueError(f"version number: {metadata['version']} is missing in 'changelog'")


def verify_bundle_properties(bundle_path: str) -> None:
    workflow = ConfigWorkflow(workflow_type="inference", bundle_root=bundle_path,
                              config_file=os.path.join(bundle_path, "configs/inference.json"),
                              logging_file=os.path.join(bundle_path, "configs/logging.conf"),
                              meta_file=os.path.join(bundle_path, "configs/metadata.json"))
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"check properties for workflow failed: {missing}")


def verify(bundle_path: str, schema: str) -> list[str]:
    """Run every check of the zoo's full mode on ``bundle_path``; return what passed, raise on the first failure."""
    passed = []
    verify_bundle_directory(bundle_path)
    passed.append("directory")
    verify_version_changes(bundle_path)
    passed.append("version and changelog")
    verify_metadata(meta_file=os.path.join(bundle_path, "configs/metadata.json"), filepath=schema)
    passed.append("metadata format")
    verify_bundle_properties(bundle_path)
    passed.append("properties")
    config_file = os.path.join("configs", "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=os.path.join(bundle_path, "configs/metadata.json"),
                      config_file=os.path.join(bundle_path, config_file), bundle_root=bundle_path)
    passed.append("data shape")
    ckpt_export(net_id="network_def", filepath=os.path.join(bundle_path, "models/verify_model.ts"),
                ckpt_file=os.path.join(bundle_path, "models", "model.pt"),
                meta_file=os.path.join(bundle_path, "configs/metadata.json"),
                config_file=os.path.join(bundle_path, config_file), bundle_root=bundle_path)
    torch.jit.load(os.path.join(bundle_path, "models", "model.ts"))
    passed.append("torchscript")
    return passed
