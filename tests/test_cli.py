"""The README's path as a user walks it: the installed ``wsr-med`` entry point, in subprocesses, from a folder
outside the checkout, with only the options a user would pass at each step.

train (image_size=96, a small backbone) -> evaluate and predict with no settings -> train again with
max_epochs raised (same MLflow run, one value per epoch, a falling learning rate, a new model version) ->
contradictory settings, a finished run and a concurrent training all refused, leaving the run as it was.
"""

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

WSR_MED = Path(sys.executable).parent / "wsr-med"
SMALL = "backbone_kwargs={'init_features':8,'growth_rate':4,'block_config':[1,1,1,1]}"
LEARNING_RATE = 0.01


def wsr_med(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([str(WSR_MED), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one-line error of a refused command (no traceback), checked for ``phrases``."""
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("wsr-med ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict:
    """A user's folder: a synthetic hospital export, a trained run, its evaluation and predictions."""
    home = tmp_path_factory.mktemp("user")
    ok(wsr_med(home, "synth", "hospital", "--n-per-class", "10", "--image-size", "80"))
    ok(wsr_med(home, "synth", "new_scans", "--n-per-class", "3", "--image-size", "120", "--seed", "7"))
    train = ok(wsr_med(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/a", "--set", "image_size=96", SMALL,
                       "max_epochs=2", "batch_size=8", "num_workers=0", "progress_bar=false", f"learning_rate={LEARNING_RATE}"))
    evaluate = ok(wsr_med(home, "evaluate", "--output-dir", "runs/a", "--dataset-dir", "hospital"))
    predict = ok(wsr_med(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "new_scans"))
    run_id = (home / "runs/a/mlflow_run_id").read_text()
    more = ok(wsr_med(home, "train", "--output-dir", "runs/a", "--set", "max_epochs=4"))
    return {"home": home, "run": home / "runs/a", "uri": f"sqlite:///{home / 'mlflow.db'}", "first_run_id": run_id,
            "logs": {"train": train, "evaluate": evaluate, "predict": predict, "continue": more}}


def test_evaluate_and_predict_use_the_trained_settings(user):
    run = user["run"]
    assert json.loads((run / "config.json").read_text())["settings"]["image_size"] == 96
    metrics = json.loads((run / "eval.superseded-1" / "metrics.json").read_text())  # moved aside by the continuation
    assert metrics["n"] == 20 and metrics["classes"] == ["left", "right"]
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == ["path", "predicted_class", "prob_left", "prob_right", "decision_rule",
                                                "unlike_training"]
    evaluate = user["logs"]["evaluate"]
    assert "Results:" in evaluate.stdout and "runs/a/eval/report.html" in evaluate.stdout
    # an evaluation is not a validation and has no "best" epoch; MONAI's eval() warning is not shown
    assert "val_auc" not in evaluate.stdout + evaluate.stderr and "best metric" not in evaluate.stdout + evaluate.stderr
    assert "passed to Python `eval()`" not in evaluate.stderr and "MLflow tracking store: sqlite:///" in evaluate.stderr


def test_continuing_a_run_stays_in_its_mlflow_run(user):
    run = user["run"]
    assert "continuing it with its own settings" in user["logs"]["continue"].stdout
    assert "best metric of train_loss" not in user["logs"]["continue"].stdout + user["logs"]["continue"].stderr
    assert (run / "mlflow_run_id").read_text() == user["first_run_id"]
    client = MlflowClient(user["uri"])
    run_id = user["first_run_id"]
    for metric in ("train_loss", "val_auc", "val_accuracy", "learning_rate"):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2, 3, 4], metric
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "learning_rate")}
    # epochs 3-4 follow the cosine of the new length, falling; not the old one, which climbs after its end
    for epoch in (3, 4):
        assert lr[epoch] == pytest.approx(LEARNING_RATE * (1 + math.cos(math.pi * (epoch - 1) / 4)) / 2, rel=1e-6)
    assert lr[1] > lr[2] >= lr[3] > lr[4]
    tracked = client.get_run(run_id)
    assert tracked.data.tags["continued.max_epochs"] == "4" and tracked.data.params["max_epochs"] == "2"
    assert tracked.info.run_name == "densenet-8-4-1111-wise-96"  # says what the network is
    versions = client.search_model_versions("name='wsr_med-left-right'")  # default: experiment and classes
    assert sorted(int(v.version) for v in versions) == [1, 2] and {v.run_id for v in versions} == {run_id}
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["max_epochs"] == 4 and [c["max_epochs"] for c in config["continued"]] == [4]


def test_mlflow_gets_no_paths(user):
    client = MlflowClient(user["uri"])
    tracked = client.get_run(user["first_run_id"])
    text = json.dumps(tracked.data.params) + json.dumps(tracked.data.tags)
    local = Path(client.download_artifacts(user["first_run_id"], "run"))
    text += "".join(p.read_text() for p in local.rglob("*.json"))
    assert str(user["home"]) not in text and "hospital" not in text and "runs/a" not in text
    assert "dataset_dir_id" in tracked.data.params and "dataset_dir" not in tracked.data.params


def test_contradictory_settings_are_refused(user):
    home, before = user["home"], snapshot(user["run"])
    refused(wsr_med(home, "evaluate", "--output-dir", "runs/a", "--dataset-dir", "hospital", "--set", "image_size=128"),
            "image_size=128 (trained: 96)")
    refused(wsr_med(home, "train", "--output-dir", "runs/a", "--set", "max_epochs=6", "head=gap"),
            "head='gap' (run: 'wise')")
    assert snapshot(user["run"]) == before


def test_finished_run_is_refused_and_left_byte_identical(user):
    home, before = user["home"], snapshot(user["run"])
    ok(wsr_med(home, "synth", "other_hospital", "--n-per-class", "4", "--image-size", "64", "--classes", "3"))
    refused(wsr_med(home, "train", "--dataset-dir", "other_hospital", "--output-dir", "runs/a", "--set", "max_epochs=4"),
            "finished run (4 of max_epochs=4)")
    refused(wsr_med(home, "train", "--output-dir", "runs/a"), "finished run")
    assert snapshot(user["run"]) == before
    ok(wsr_med(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "new_scans"))
    with open(user["run"] / "predictions.csv", newline="") as f:
        assert list(next(csv.reader(f))) == ["path", "predicted_class", "prob_left", "prob_right", "decision_rule",
                                             "unlike_training"]


def test_second_training_in_the_same_folder_is_refused(user):
    home = user["home"]
    log = home / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([str(WSR_MED), "train", "--dataset-dir", "hospital", "--output-dir", "runs/busy", "--set",
                                  "image_size=64", SMALL, "max_epochs=500", "num_workers=0", "progress_bar=false"],
                                 cwd=home, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while "Epoch[1] Complete" not in log.read_text() and time.time() < deadline:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        second = wsr_med(home, "train", "--output-dir", "runs/busy", "--set", "max_epochs=500")
        assert first.poll() is None, "the first training must still be running"
        refused(second, "in use by another training process")
    finally:
        first.kill()
        first.wait()
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history((home / "runs/busy/mlflow_run_id").read_text(), "train_loss")]
    assert steps == sorted(set(steps)), "each epoch logged once"


def test_bundle_path_and_monai_bundle_cli(user):
    """MONAI users run the installed bundle with python -m monai.bundle; evaluate needs no network settings."""
    home = user["home"]
    bundle = ok(wsr_med(home, "bundle-path")).stdout.strip()
    assert (Path(bundle) / "configs" / "train.json").is_file()
    configs = f"['{bundle}/configs/train.json','{bundle}/configs/evaluate.json']"
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs,
                             "--meta_file", f"{bundle}/configs/metadata.json", "--bundle_root", bundle,
                             "--output_dir", "runs/a", "--dataset_dir", "new_scans", "--eval_split", "all"],
                            cwd=home, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((user["run"] / "eval" / "metrics.json").read_text())["n"] == 6


def test_demo_on_the_users_own_folder(user):
    home = user["home"]
    result = ok(wsr_med(home, "demo", "--dataset-dir", "hospital", "--output-dir", "runs/demo", "--set", "max_epochs=1",
                        "image_size=64", SMALL, "num_workers=0"))
    assert "training on hospital" in result.stdout
    assert json.loads((home / "runs/demo/eval/metrics.json").read_text())["classes"] == ["left", "right"]
    assert (home / "runs/demo/predictions.csv").is_file()


def test_unrelated_runs_register_under_different_names():
    from wsr_med.tracking import model_name

    assert model_name("wsr_med", ["left", "right"]) == "wsr_med-left-right"
    assert model_name("wsr_med", ["NORMAL", "PNEUMONIA"]) != model_name("wsr_med", ["left", "right"])
    assert model_name("chest", ["left", "right"]) != model_name("wsr_med", ["left", "right"])


def test_imbalanced_classes_are_warned_about(tmp_path, caplog):
    from wsr_med.data import make_synthetic_folder
    from wsr_med.workflows import prepare_data

    data = make_synthetic_folder(tmp_path / "data", n_per_class=16, image_size=32)
    for scan in sorted((data / "right").iterdir())[4:]:  # 16 left, 4 right
        scan.unlink()
    caplog.set_level("WARNING", "wsr_med")
    prepare_data(str(data), str(tmp_path / "run"), num_workers=0)
    assert "imbalanced (left: 16, right: 4; the largest has 4.0x" in caplog.text and "class_balance=weighted_loss" in caplog.text
    caplog.clear()
    prepare_data(str(data), str(tmp_path / "run2"), num_workers=0, class_balance="weighted_loss")
    assert "imbalanced" not in caplog.text


def test_wrong_settings_and_unreachable_store_fail_in_one_line_before_the_scan(user):
    home = user["home"]
    refused(wsr_med(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/bad", "--set", "head=avg"),
            "head='avg' is not one of: wise, gap")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    refused(wsr_med(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/bad", "--tracking-uri",
                    f"http://127.0.0.1:{port}"), f"127.0.0.1:{port} cannot be reached")
    assert not (home / "runs/bad/datalist.json").exists()  # refused before the scan


def test_tracking_can_be_turned_off(user):
    home = user["home"] / "no_tracking"
    home.mkdir()
    ok(wsr_med(home, "train", "--dataset-dir", "../hospital", "--output-dir", "runs/t", "--tracking-uri", "none", "--set",
               "image_size=64", SMALL, "max_epochs=1", "num_workers=0"))
    ok(wsr_med(home, "evaluate", "--output-dir", "runs/t", "--dataset-dir", "../hospital", "--tracking-uri", "none"))
    assert (home / "runs/t/model.pt").is_file() and (home / "runs/t/eval/metrics.json").is_file()
    assert not (home / "mlflow.db").exists() and not (home / "mlruns").exists() and not (home / "runs/t/mlflow_run_id").exists()


def test_export_bundle_then_run_it_from_its_folder(user):
    """The README's export step: a trained run becomes a zoo bundle a MONAI user runs with the commands they know."""
    home = user["home"]
    done = ok(wsr_med(home, "export-bundle", "--output-dir", "runs/a", "--bundle-dir", "exported/left_right"))
    bundle = home / "exported" / "left_right"
    assert "bundle written to exported/left_right" in done.stdout
    refused(wsr_med(home, "export-bundle", "--output-dir", "runs/a", "--bundle-dir", "exported/left_right"), "never overwrites")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["image_size"] == 96 and inference["classes"] == ["left", "right"]  # pinned, not read from the run
    ok(subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                       "--dataset_dir", str(home / "new_scans")], cwd=bundle, capture_output=True, text=True, timeout=600))
    with open(bundle / "eval" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_operating_point_is_chosen_on_validation_and_used_by_evaluate_and_predict(user):
    home, run = user["home"], user["run"]
    calibration = json.loads((run / "calibration.json").read_text())
    datalist = json.loads((run / "datalist.json").read_text())
    best = json.loads((run / "best.json").read_text())
    # fitted on the validation split of the best epoch: no other case (test split, evaluated folders) chooses it
    assert calibration["n_cases"] == len(datalist["validation"]) and calibration["epoch"] == best["epoch"]
    threshold = calibration["decision"]["threshold"]
    before = (run / "calibration.json").read_bytes()
    ok(wsr_med(home, "evaluate", "--output-dir", "runs/a", "--dataset-dir", "hospital"))
    ok(wsr_med(home, "predict", "--output-dir", "runs/a", "--dataset-dir", "new_scans"))
    assert (run / "calibration.json").read_bytes() == before
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["operating_point"]["threshold"] == threshold and metrics["operating_point"]["rule"] == "youden"
    assert len(metrics["operating_point"]["sensitivity"]) == 3  # value and 95% CI
    assert metrics["calibration"]["temperature"] == calibration["decision"]["temperature"]
    assert "Operating point" in (run / "eval" / "report.html").read_text()
    with open(run / "predictions.csv", newline="") as f:
        for row in csv.DictReader(f):
            assert row["predicted_class"] == ("right" if float(row["prob_right"]) >= threshold else "left")
            assert row["decision_rule"] == f"prob_right >= {threshold:.6g}"  # the decision, readable in the file


def test_registered_served_model_decides_at_the_runs_threshold(user, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from wsr_med.tracking import tracking_uri_context
    from wsr_med.workflows.serving import PATH_ROOTS_ENV

    run, home = user["run"], user["home"]
    threshold = json.loads((run / "calibration.json").read_text())["decision"]["threshold"]
    uri = (run / "mlflow_model_uri").read_text()  # the latest training's registered model
    monkeypatch.setenv(PATH_ROOTS_ENV, str(home))  # the server's setting: clients may name scans under home by path
    with tracking_uri_context(user["uri"]):
        model = mlflow.pyfunc.load_model(uri)
    scans = sorted(p for p in (home / "new_scans").rglob("*") if p.is_file())
    answer = model.predict(pd.DataFrame([{"path": str(p)} for p in scans] + [{"path": str(home / "missing.dcm")}]))
    for _, row in answer.iloc[:-1].iterrows():
        assert row["error"] == "" and row["prob_left"] + row["prob_right"] == pytest.approx(1)
        assert row["predicted_class"] == ("right" if row["prob_right"] >= threshold else "left")
    assert answer.iloc[-1]["error"] == "row 6: path not available on this server" and answer.iloc[-1]["predicted_class"] == ""
