"""One owner for each setting: the table in wsr_med.settings, the bundle's defaults, what a run records, and a
typo refused before anything runs, through the installed ``wsr-med``."""

import ast
import json
from pathlib import Path

import pytest

import wsr_med
from test_cli import refused, wsr_med as run_wsr_med
from wsr_med.settings import COMPUTED, RECORDED_SETTINGS, SETTINGS, check_known
from wsr_med.workflows import BUNDLE

TRAIN = json.loads((BUNDLE / "configs" / "train.json").read_text())


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_the_bundle_default_is_the_tables(key):
    setting = SETTINGS[key]
    if key in ("eval_split", "predictions_file"):  # evaluate / inference settings: their own configs hold them
        return
    assert key in TRAIN, f"{key} is a setting train.json does not define"
    if setting.default is COMPUTED:
        assert isinstance(TRAIN[key], str) and TRAIN[key].startswith("$"), (key, TRAIN[key])
    else:
        assert TRAIN[key] == setting.default, (key, TRAIN[key], setting.default)


def test_a_run_records_exactly_the_recorded_settings():
    assert set(TRAIN["run_settings"]) == set(RECORDED_SETTINGS)


def test_no_other_module_spells_a_list_of_settings():
    """A tuple, list or set literal naming four settings or more is a second owner of a setting list."""
    root = Path(wsr_med.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                assert sum(n in SETTINGS for n in names) < 4, f"{path.relative_to(root)}:{node.lineno} lists {names}"


def test_an_unknown_setting_names_the_closest():
    with pytest.raises(wsr_med.errors.WsrMedError, match=r"unknown setting 'max_epoch' \(did you mean max_epochs\?\)"):
        check_known(["image_size", "max_epoch"])


@pytest.mark.parametrize("command", [["train", "--dataset-dir", "synthetic"], ["demo"], ["evaluate"], ["predict"],
                                     ["ablate", "--heads", "gap"]])
def test_every_command_refuses_a_typo_before_anything_runs(command, tmp_path):
    result = run_wsr_med(tmp_path, *command, "--output-dir", "runs/x", "--set", "max_epoch=3", timeout=300)
    refused(result, "unknown setting 'max_epoch' (did you mean max_epochs?)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", [["train"], ["ablate"]])
def test_set_without_equals_is_one_line(command, tmp_path):
    refused(run_wsr_med(tmp_path, *command, "--output-dir", "runs/x", "--set", "foo", timeout=300),
            "--set expects KEY=VALUE, got 'foo'")


def test_the_run_folder_layout_table_names_every_file_of_the_run_folder():
    from wsr_med.runs import RunFolder

    docs = (BUNDLE / "docs" / "README.md").read_text()
    table = docs[docs.index("| file | content |"):docs.index("This table is the layout")]
    names = {v for k, v in vars(RunFolder).items() if k.isupper() and isinstance(v, str)} - {RunFolder.EVAL_PREFIX,
                                                                                                RunFolder.SUPERSEDED}
    missing = [name for name in sorted(names) if f"`{name}" not in table]
    assert not missing, f"RunFolder files not in the bundle docs' layout table: {missing}"


def test_data_that_cannot_train_is_refused_at_scan_time(tmp_path):
    """One class: one line, nothing written to the run folder, no MLflow run; the same command on good data then
    trains."""
    import shutil

    from mlflow import MlflowClient

    from test_cli import SMALL, ok

    ok(run_wsr_med(tmp_path, "synth", "hospital", "--n-per-class", "8", "--image-size", "64"))
    shutil.copytree(tmp_path / "hospital" / "left", tmp_path / "one_class" / "left")
    args = ("--output-dir", "runs/a", "--set", "image_size=64", SMALL, "max_epochs=1", "num_workers=0", "progress_bar=false")
    refused(run_wsr_med(tmp_path, "train", "--dataset-dir", "one_class", *args, "batch_size=4"),
            "scans of 1 class(es) (left)", "training needs two or more")
    left = tmp_path / "runs" / "a"  # the lock and the (empty) cache folder its writability check made: no run yet
    assert {p.name for p in left.iterdir()} <= {".lock", "cache"} and not any((left / "cache").iterdir())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    ok(run_wsr_med(tmp_path, "train", "--dataset-dir", "hospital", *args, "batch_size=4"))
    assert (tmp_path / "runs" / "a" / "model.pt").is_file()


def test_a_class_without_training_scans_is_refused():
    from wsr_med.errors import WsrMedError
    from wsr_med.workflows import check_trainable

    items = [{"label": k % 2} for k in range(8)]
    with pytest.raises(WsrMedError, match="the training split has no scan of 'right'"):
        check_trainable("data", ["left", "right"], {"training": [{"label": 0}] * 8, "validation": items, "test": []})
    with pytest.raises(WsrMedError, match="the validation split has no scans"):
        check_trainable("data", ["left", "right"], {"training": items, "validation": [], "test": []})
    check_trainable("data", ["left", "right"], {"training": items, "validation": [{"label": 0}], "test": []})  # a warning
