"""The MONAI bundle end to end: train, evaluate, predict, MLflow (local store and a real server), resume, torchrun."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from wsr_med.data import make_synthetic_folder
from wsr_med.errors import WsrMedError
from wsr_med.metrics import roc_auc
from wsr_med.workflows import BUNDLE, run_workflow

from conftest import drawn

CONFIGS = BUNDLE / "configs"
TINY = {
    "image_size": 64,
    "backbone_kwargs": {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]},
    "batch_size": 8,
    "num_workers": 0,
    "progress_bar": False,
    "learning_rate": 0.01,
}


def cli_overrides(settings: dict) -> list[str]:
    """``--key value`` pairs for ``python -m monai.bundle run``."""
    args = []
    for key, value in settings.items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    return args


def bundle_command(config_files: list[str], settings: dict, launcher: list[str] | None = None) -> list[str]:
    files = "[" + ",".join(f"'{CONFIGS / f}'" for f in config_files) + "]"
    return [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", "--config_file", files,
            "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
            "--bundle_root", str(BUNDLE), *cli_overrides(settings)]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    """3 classes, DICOM and PNG mixed, plus one broken file."""
    root = make_synthetic_folder(tmp_path_factory.mktemp("hospital"), n_per_class=10, image_size=64, n_classes=3)
    (root / "left" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hospital) -> dict:
    """One training run (2 epochs) tracked in a local SQLite store, then evaluation and inference on it."""
    out = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(out / "run"), "tracking_uri": uri,
                "max_epochs": 2, "experiment_name": "test", "registered_model_name": "tiny_wise"}
    run_workflow("train", **settings)
    run_workflow("evaluate", **settings, eval_split="all")
    unlabelled = make_synthetic_folder(out / "unlabelled", n_per_class=3, image_size=80, n_classes=2, seed=5)
    run_workflow("inference", **{**settings, "dataset_dir": str(unlabelled)})
    return {"settings": settings, "out": Path(settings["output_dir"]), "uri": uri, "unlabelled": unlabelled}


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_training_outputs_and_mlflow_record(trained):
    out = trained["out"]
    for name in ("model.pt", "best.json", "classes.json", "config.json", "datalist.json", "bad_files.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "classes.json").read_text()) == ["above", "left", "right"]
    assert "broken.png" in (out / "bad_files.csv").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["image_size"] == 64 and "train.json" in next(iter(config["config_files"]))
    client, run = only_run(trained["uri"], "test")
    assert run.data.params["head"] == "wise" and run.data.params["image_size"] == "64"
    assert run.data.params["pretrained_weights_id"] == "none"  # no path, no hash of one
    for metric in ("val_auc", "val_accuracy", "val_loss", "train_loss", "learning_rate", "val_auc_left"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    artifacts = {a.path for folder in ("run", "plots", "eval_all") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"run/config.json", "run/datalist.json", "run/bad_files.json", "plots/spatial_weights.png",
            "eval_all/report.html", "eval_all/metrics.json", "eval_all/roc.png"} <= artifacts
    assert "eval_all_auc" in client.get_run(run.info.run_id).data.metrics
    shared = Path(client.download_artifacts(run.info.run_id, "eval_all/report.html"))
    shared_text = shared.read_text()  # roc, confusion, reliability after and before calibration; no example scans
    assert shared_text.count("data:image/png;base64,") == 4 and "<figcaption>examples" not in shared_text


def test_mlflow_holds_no_patient_identifiers(trained, hospital):
    import pydicom

    client, run = only_run(trained["uri"], "test")
    local = Path(client.download_artifacts(run.info.run_id, "run"))
    text = "".join(p.read_text() for p in local.rglob("*.json")) + json.dumps(run.data.params)
    for path in hospital.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for value in (ds.PatientID, str(ds.PatientName), ds.AccessionNumber, ds.PatientBirthDate):
            assert value not in text
    assert "case0" not in text  # file names stay local; MLflow gets content hashes


def test_logged_network_reproduces_the_weights(trained):
    """The bare network (torch.export) is logged beside the served model, for those who embed it."""
    import mlflow.pytorch

    from wsr_med.tracking import tracking_uri_context
    from wsr_med.networks import WiseSrNet

    run_id = (trained["out"] / "mlflow_run_id").read_text()
    with tracking_uri_context(trained["uri"]):
        network = mlflow.pytorch.load_model(f"runs:/{run_id}/network")  # exported in eval mode
    local = WiseSrNet(out_channels=3, img_size=64, backbone_kwargs=TINY["backbone_kwargs"])
    local.load_state_dict(torch.load(trained["out"] / "model.pt", weights_only=True))
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network(x), local.eval()(x))


SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "highdicom_dx_image.dcm"


def test_served_model_answers_like_predict_and_names_no_patient(trained, hospital, tmp_path, monkeypatch):
    """mlflow models serve on the registered model: a real DICOM by path, a PNG as bytes and a broken file in one
    request; the probabilities are wsr-med predict's, the broken row carries an error, no identifier comes back."""
    import base64

    import mlflow.pyfunc
    import pandas as pd
    import pydicom

    from wsr_med.tracking import tracking_uri_context
    from wsr_med.workflows.serving import PATH_ROOTS_ENV

    scans = tmp_path / "scans"
    scans.mkdir()
    dicom = SHARED_DICOM if SHARED_DICOM.is_file() else next((hospital / "left").glob("*.dcm"))
    (scans / "a.dcm").write_bytes(dicom.read_bytes())
    png = next((hospital / "right").glob("*.png"))
    (scans / "b.png").write_bytes(png.read_bytes())
    predictions = tmp_path / "predictions.csv"
    run_workflow("inference", output_dir=str(trained["out"]), dataset_dir=str(scans), predictions_file=str(predictions),
                 num_workers=0)
    with open(predictions, newline="") as f:
        expected = {row["path"]: row for row in csv.DictReader(f)}
    records = [{"path": str(scans / "a.dcm")}, {"bytes": base64.b64encode((scans / "b.png").read_bytes()).decode()},
               {"bytes": base64.b64encode(b"\x00" * 300).decode()}]

    version = max(int(v.version) for v in MlflowClient(trained["uri"]).search_model_versions("name='tiny_wise'"))
    monkeypatch.setenv(PATH_ROOTS_ENV, str(scans))  # plain MLflow serving: the path roots come from the environment
    with tracking_uri_context(trained["uri"]):
        in_process = mlflow.pyfunc.load_model(f"models:/tiny_wise/{version}").predict(pd.DataFrame(records))
    port = free_port()
    bin_dir = Path(sys.executable).parent  # as in an activated environment: mlflow starts uvicorn from it
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/tiny_wise/{version}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"dataframe_records": records}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=30)
    answer = json.loads(text)["predictions"]
    assert len(answer) == 3
    for row, name in zip(answer[:2], ("a.dcm", "b.png")):
        for c in ("above", "left", "right"):
            assert row[f"prob_{c}"] == pytest.approx(float(expected[name][f"prob_{c}"]), abs=1e-5), (name, c)
            assert row[f"prob_{c}"] == pytest.approx(float(in_process[f"prob_{c}"][answer.index(row)]), abs=1e-6)
        assert row["predicted_class"] == expected[name]["predicted_class"] and row["error"] == ""
    assert answer[2]["error"] == "row 2: unknown file type: the content is neither DICOM nor an image"
    assert answer[2]["predicted_class"] == "" and answer[2]["prob_left"] is None
    header = pydicom.dcmread(dicom, stop_before_pixels=True)
    for tag in ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "PatientBirthDate"):
        value = str(header.get(tag, "") or "")
        if len(value) > 3:
            assert value not in text, tag
    assert str(scans) not in text


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_evaluation_report(trained):
    eval_dir = trained["out"] / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["n"] == 30 and metrics["classes"] == ["above", "left", "right"]
    assert len(metrics["auc_ci95"]) == 2 and set(metrics["per_class"]) == {"above", "left", "right"}
    assert np.array(metrics["confusion_matrix"]).sum() == 30
    html = (eval_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "AUC 95% CI" in html  # ROC, confusion, reliability (calibrated and not), examples
    assert drawn(eval_dir / "examples.png")["grey_levels"] > 64  # thumbnails of scans, not an empty grid
    # provenance: the report can be handed on without explaining where it came from
    for field in ("What was evaluated", "model (model.pt sha256)", "best epoch", "data (hashed location)",
                  "AUC (macro one-vs-rest)", "balanced accuracy", "prevalence", "lowest class sensitivity"):
        assert field in html, field
    assert metrics["provenance"]["MLflow run"] == (trained["out"] / "mlflow_run_id").read_text()
    assert str(trained["out"]) not in html and 0 <= metrics["balanced_accuracy"] <= 1
    for name in ("roc.png", "confusion_matrix.png", "reliability.png"):
        assert drawn(eval_dir / name)["coloured"] > 0.002, name  # curves, cells or bars drawn in colour
    # the per-case file keeps enough digits that the AUC recomputed from it is the reported one
    with open(eval_dir / "cases.csv", newline="") as f:
        cases = list(csv.DictReader(f))
    labels = np.array([metrics["classes"].index(r["label"]) for r in cases])
    probs = np.array([[float(r[f"prob_{c}"]) for c in metrics["classes"]] for r in cases])
    assert len(cases) == 30 and roc_auc(labels, probs) == pytest.approx(metrics["auc"], abs=1e-9)


def test_predictions_csv(trained):
    import csv

    with open(trained["out"] / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert list(rows[0]) == ["path", "predicted_class", "prob_above", "prob_left", "prob_right", "decision_rule",
                             "unlike_training"]
    assert rows[0]["decision_rule"] == "highest probability"  # three classes
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in ("above", "left", "right")]
        assert abs(sum(probs) - 1) < 1e-4
        assert row["predicted_class"] == ["above", "left", "right"][int(np.argmax(probs))]
        assert (trained["unlabelled"] / row["path"]).is_file()


def test_inference_json_alone_passes_verify_net_in_out_and_ckpt_export(trained, tmp_path):
    """The zoo's tools read inference.json alone; with a run folder's output_dir the network is the trained one."""
    base = [sys.executable, "-m", "monai.bundle"]
    common = ["--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
              "--output_dir", str(trained["out"])]
    shape = ["--_meta_#network_data_format#inputs#image#spatial_shape", "[64, 64]",
             "--_meta_#network_data_format#outputs#pred#num_channels", "3"]
    checked = subprocess.run([*base, "verify_net_in_out", "network_def", *common, *shape], capture_output=True, text=True)
    assert checked.returncode == 0 and "verified with no error" in checked.stdout + checked.stderr, checked.stderr[-2000:]
    ts = tmp_path / "model.ts"
    subprocess.run([*base, "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained["out"] / "model.pt"),
                    *common], check=True, capture_output=True)
    from wsr_med.networks import WiseSrNet

    local = WiseSrNet(out_channels=3, img_size=64, backbone_kwargs=TINY["backbone_kwargs"]).eval()
    local.load_state_dict(torch.load(trained["out"] / "model.pt", weights_only=True))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(ts)(x), local(x))


def test_exported_bundle_passes_the_model_zoo_checks_and_runs_from_its_folder(trained, hospital, tmp_path, monkeypatch):
    """wsr-med export-bundle: the zoo's full-mode checks pass; load() gives every trained tensor; inference.json
    runs from inside the bundle with nothing repeated; the run's numbers are in metadata and docs; no path leaks."""
    from monai.bundle import load

    import zoo_checks
    from wsr_med.workflows.export import export_bundle

    schema = Path(__file__).resolve().parents[2] / "shared" / "reference" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip("../shared/reference not present")
    licence = tmp_path / "licence.txt"
    licence.write_text("CC BY 4.0, Kermany et al. 2018\n")
    bundle = export_bundle(trained["out"], tmp_path / "zoo" / "tiny_wise", data_license=licence)
    assert (bundle / "docs" / "data_license.txt").read_text() == licence.read_text()
    with pytest.raises(Exception, match="never overwrites"):
        export_bundle(trained["out"], bundle)
    # another process fills the claimed folder while the bundle is written: one line, and its file is kept
    import wsr_med.workflows.export as export

    raced = tmp_path / "zoo" / "raced"
    write_source = export._write_source
    monkeypatch.setattr(export, "_write_source", lambda folder: (write_source(folder), (raced / "theirs").write_text("x")))
    with pytest.raises(WsrMedError, match="another process put files in it") as refused:
        export_bundle(trained["out"], raced)
    assert "\n" not in str(refused.value) and [p.name for p in raced.iterdir()] == ["theirs"]
    assert not [p for p in raced.parent.iterdir() if p.name.startswith(".raced-")]  # no temporary folder left
    monkeypatch.setattr(export, "_write_source", write_source)
    assert zoo_checks.verify(str(bundle), str(schema)) == ["directory", "version and changelog", "metadata format",
                                                             "properties", "data shape", "torchscript"]
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    evaluation = json.loads((trained["out"] / "eval" / "metrics.json").read_text())
    assert metadata["eval_metrics"]["auc"] == round(evaluation["auc"], 4)
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "above", "1": "left", "2": "right"}
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert metadata["version"] in metadata["changelog"] and "wsr_med" in metadata["required_packages_version"]
    readme = (bundle / "docs" / "README.md").read_text()
    assert f"{round(evaluation['auc'], 4)}" in readme and "## Performance" in readme and "## License" in readme
    assert len((bundle / "LICENSE").read_text().splitlines()) > 150  # the Apache text, not a notice

    trained_state = torch.load(trained["out"] / "model.pt", weights_only=True)
    monkeypatch.chdir(tmp_path)  # load() from elsewhere creates nothing where it runs
    before = set(tmp_path.rglob("*"))
    net = load(name="tiny_wise", bundle_dir=str(tmp_path / "zoo"), workflow_type="inference", device="cpu")
    assert set(tmp_path.rglob("*")) == before
    assert net.state_dict().keys() == trained_state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained_state.items())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(bundle / "models" / "model.ts")(x), net.eval()(x))

    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", str(trained["unlabelled"]), "--num_workers", "0"],
                          cwd=bundle, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(bundle / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"prob_above", "prob_left", "prob_right"} <= set(rows[0])
    contradicted = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                                   "--dataset_dir", str(trained["unlabelled"]), "--num_workers", "0", "--image_size", "32"],
                                  cwd=bundle, capture_output=True, text=True)
    assert contradicted.returncode != 0 and "image_size=32 (trained: 64)" in contradicted.stdout + contradicted.stderr
    for path in bundle.rglob("*"):  # neither the data's nor the run's location is in the bundle
        if path.is_file() and path.suffix in (".json", ".md", ".yml", ".conf"):
            text = path.read_text()
            assert str(hospital) not in text and str(trained["out"]) not in text, path


def test_configs_read_like_a_model_zoo_bundle():
    """inference.json: few expressions, none into a private function; evaluate.json spells no trained setting (the
    ``trained`` component applies the run folder's); the multi-GPU config overrides only what differs."""
    import re

    from wsr_med.settings import TRAINED_SETTINGS

    inference = (CONFIGS / "inference.json").read_text()
    expressions = re.findall(r'"\$[^"]*"', inference)
    assert len(expressions) <= 20, expressions
    assert not [e for e in expressions if re.search(r"wsr_med(\.\w+)*\._", e) or "@trained[" in e], expressions
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    assert not set(evaluate) & set(TRAINED_SETTINGS) and "@trained[" not in json.dumps(evaluate)
    multi_gpu = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert "run" not in multi_gpu and "initialize" not in multi_gpu and "finalize" not in multi_gpu


@pytest.mark.parametrize("workflow, override, phrase", [
    (["inference.json"], {"image_size": 32}, "image_size=32 (trained: 64)"),
    (["train.json", "evaluate.json"], {"head": "gap"}, "head='gap' (trained: 'wise')"),
])
def test_plain_monai_bundle_run_refuses_a_contradicting_setting(trained, workflow, override, phrase):
    before = {p: p.stat().st_mtime_ns for p in trained["out"].rglob("*") if p.is_file()}
    result = subprocess.run(bundle_command(workflow, {"output_dir": str(trained["out"]), "dataset_dir": str(trained["unlabelled"]),
                                                      "num_workers": 0, **override}), capture_output=True, text=True)
    assert result.returncode != 0 and phrase in result.stdout + result.stderr, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in trained["out"].rglob("*") if p.is_file()} == before


def test_monai_tracking_switch_is_folded_into_one_run(tmp_path, hospital):
    """python -m monai.bundle run --tracking mlflow: one MLflow run, each metric once per epoch, the config as a file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(tmp_path / "run"), "tracking_uri": uri,
                "max_epochs": 2, "experiment_name": "switch", "registered_model_name": ""}
    done = subprocess.run([*bundle_command(["train.json"], settings), "--tracking", "mlflow"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in experiments] == ["switch"]
    _, run = only_run(uri, "switch")
    assert set(run.data.metrics) == {"train_loss", "val_auc", "val_accuracy", "val_loss", "learning_rate",
                                     "val_auc_above", "val_auc_left", "val_auc_right"}
    for metric in run.data.metrics:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    assert "run/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "run")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_uri_fails_before_training(tmp_path, hospital):
    port = free_port()  # nothing listens there
    with pytest.raises(RuntimeError) as failure:  # MONAI wraps the error of the config expression
        run_workflow("train", **TINY, dataset_dir=str(hospital), output_dir=str(tmp_path / "run"),
                     tracking_uri=f"http://127.0.0.1:{port}", max_epochs=1)
    assert isinstance(failure.value.__cause__, ConnectionError)
    assert f"127.0.0.1:{port} cannot be reached" in str(failure.value.__cause__)
    assert not (tmp_path / "run" / "checkpoints").exists()


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend, in its own process group."""

    def __init__(self, folder: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def test_real_mlflow_server(mlflow_server, tmp_path, hospital):
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(tmp_path / "run"), "tracking_uri": mlflow_server.url,
                "max_epochs": 1, "experiment_name": "served", "registered_model_name": "served_model"}
    run_workflow("train", **settings)
    client, run = only_run(mlflow_server.url, "served")
    # the epoch's metrics reached the server (val_auc itself is NaN when the 5 validation scans, split by this
    # installation's patient key, miss a class)
    assert "val_auc" in run.data.metrics and run.data.metrics["val_loss"] >= 0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "run")} >= {"run/config.json", "run/datalist.json"}
    assert client.get_latest_versions("served_model")[0].version == "1"


def test_tracking_server_lost_mid_run(mlflow_server, tmp_path, hospital):
    out = tmp_path / "run"
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(out), "tracking_uri": mlflow_server.url,
                "max_epochs": 4, "experiment_name": "lost", "registered_model_name": "lost_model"}
    proc = subprocess.Popen(bundle_command(["train.json"], settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("checkpoint_epoch=*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    mlflow_server.stop()
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "the run goes on, its results stay in" in log
    assert (out / "checkpoints" / "checkpoint_epoch=4.pt").is_file() and (out / "model.pt").is_file()


def train_until_first_checkpoint(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start a training process and return it once it has saved its first epoch."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("checkpoint_epoch=*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    return proc


def test_interrupted_training_resumes_same_run(tmp_path, hospital):
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(out), "tracking_uri": uri, "max_epochs": 6,
                "experiment_name": "resume", "registered_model_name": ""}
    cmd = bundle_command(["train.json"], settings)
    proc = train_until_first_checkpoint(cmd, out)
    proc.send_signal(signal.SIGKILL)  # as hard as a power cut
    proc.wait()
    done = [int(p.stem.split("=")[1]) for p in (out / "checkpoints").glob("checkpoint_epoch=*.pt")]
    assert done and max(done) < 6, "the run was not interrupted"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert (out / "checkpoints" / "checkpoint_epoch=6.pt").is_file()
    client, run = only_run(uri, "resume")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert set(steps) == set(range(1, 7))
    again = subprocess.run(cmd, capture_output=True, text=True)  # a finished run is never overwritten
    assert again.returncode != 0 and "finished run" in again.stdout + again.stderr


def test_same_run_name_elsewhere_is_a_new_run(tmp_path, hospital):
    """A new output folder is a new MLflow run, even when an unfinished run of the same name is in the experiment
    (a killed training, or the same cell name in another study): MONAI's handler alone would attach to it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    left_running = client.create_run(client.create_experiment("same"), run_name="same").info.run_id
    settings = {**TINY, "dataset_dir": str(hospital), "tracking_uri": uri, "max_epochs": 1, "experiment_name": "same",
                "run_name": "same", "registered_model_name": "", "output_dir": str(tmp_path / "run")}
    run_workflow("train", **settings)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    assert run_id != left_running
    assert client.get_metric_history(left_running, "val_auc") == []
    assert len(client.get_metric_history(run_id, "val_auc")) == 1


def test_torchrun_two_nodes_one_mlflow_run(tmp_path, hospital):
    """The multi-node form of the bundle docs: two torchrun launchers (two "nodes" of one process each) meeting
    at a c10d rendezvous endpoint, as on two machines; one run folder, one MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(tmp_path / "run"), "tracking_uri": uri,
                "max_epochs": 2, "experiment_name": "ddp", "registered_model_name": "ddp_model"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=wsr_med_test"]
    nodes = [subprocess.Popen(bundle_command(["train.json", "multi_gpu_train.json"], settings, torchrun),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    client, run = only_run(uri, "ddp")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_epoch=2.pt").is_file()
    assert client.get_latest_versions("ddp_model")
    # each rank validated half the cases; the temperature and threshold were fitted on all of them
    validation = json.loads((tmp_path / "run" / "datalist.json").read_text())["validation"]
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["n_cases"] == len(validation) > 1


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    from wsr_med.runs import latest_checkpoint

    torch.save({"x": torch.zeros(3)}, tmp_path / "checkpoint_epoch=2.pt")
    data = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(data[: len(data) // 2])  # a save cut short
    assert latest_checkpoint(tmp_path) == (tmp_path / "checkpoint_epoch=2.pt", 2)
    assert latest_checkpoint(tmp_path / "none") == (None, 0)


def test_metadata_verifies_against_the_current_schema():
    schema = Path(__file__).resolve().parents[2] / "shared" / "reference" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip("../shared/reference not present")
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["schema"].endswith("meta_schema_20240725.json")
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
                             "--filepath", str(schema)], capture_output=True, text=True)
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]


def test_workflows_are_property_clean_and_building_them_writes_nothing(trained, hospital, tmp_path, monkeypatch):
    """MONAI apps build a bundle's workflows to check their properties: nothing is written until run."""
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(tmp_path)
    common = {"meta_file": str(CONFIGS / "metadata.json"), "logging_file": str(CONFIGS / "logging.conf")}
    fresh = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", **common,
                           **{**TINY, "dataset_dir": str(hospital), "output_dir": str(tmp_path / "new"), "max_epochs": 1,
                              "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    fresh.initialize()
    assert fresh.check_properties() == []
    assert list(tmp_path.iterdir()) == []  # no run folder, no checkpoint folder, no MLflow store, no cache
    run = trained["settings"]
    workflows = {
        "evaluate": ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], workflow_type="infer",
                                   output_dir=run["output_dir"], dataset_dir=run["dataset_dir"], tracking_uri=run["tracking_uri"],
                                   num_workers=0, **common),
        "inference": ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer",
                                    output_dir=run["output_dir"], dataset_dir=str(tmp_path / "not_there"), **common),
    }
    for name, workflow in workflows.items():
        workflow.initialize()
        assert workflow.check_properties() == [], name
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Exception) as failure:  # a missing folder is an error when the workflow runs
        workflows["inference"].run()
    assert "not_there" in f"{failure.value} {failure.value.__cause__}"


def test_sigterm_marks_the_mlflow_run_killed_and_resume_says_so(tmp_path, hospital):
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**TINY, "dataset_dir": str(hospital), "output_dir": str(out), "tracking_uri": uri, "max_epochs": 200,
                "experiment_name": "killed", "registered_model_name": ""}
    proc = train_until_first_checkpoint(bundle_command(["train.json"], settings), out)
    proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends
    assert proc.wait(timeout=120) != 0
    client, run = only_run(uri, "killed")
    assert run.info.status == "KILLED"
    resumed = subprocess.run(bundle_command(["train.json"], {**settings, "max_epochs": 1 + max(
        int(p.stem.split("=")[1]) for p in (out / "checkpoints").glob("checkpoint_epoch=*.pt"))}), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was left KILLED by an interrupted training" in resumed.stdout + resumed.stderr
    assert only_run(uri, "killed")[1].info.status == "FINISHED"
