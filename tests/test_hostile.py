"""Hostile inputs: nothing poisons a model, nothing identifies a patient, nothing is lost.

Every file is made at test time by :mod:`hostile_files`. One test per item of the hostile-input list in
docs/data.md ("what happens to bad input").
"""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile_files as hostile
from wsr_med.data import make_synthetic_folder, read_scan, scan_dataset, scan_folder, scan_manifest, scan_transforms
from wsr_med.data.csv_files import neutralise, unneutralise
from wsr_med.errors import WsrMedError
from wsr_med.metrics import classification_metrics, json_ready
from wsr_med.workflows import run_workflow

TINY = {"image_size": 64, "backbone_kwargs": {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]},
        "batch_size": 8, "num_workers": 0, "progress_bar": False, "max_epochs": 1}


def reasons_of(scan) -> dict[str, str]:
    return {row["file"]: row["reason"] for row in scan.bad_files}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A small export with every kind of hostile file beside good ones."""
    root = make_synthetic_folder(tmp_path_factory.mktemp("hostile") / "export", n_per_class=6, image_size=48)
    left = root / "left"
    hostile.nan_pixel_dicom(left / "nan.dcm")
    hostile.huge_slope_dicom(left / "slope.dcm")
    hostile.declared_huge_rle_dicom(left / "rle8.dcm")
    hostile.declared_huge_rle_dicom(left / "rle16.dcm", bits=16)
    hostile.png_header_only(left / "big.png", 13000, 13000)
    hostile.png_header_only(left / "bomb.png", 20000, 20000)
    hostile.constant_png(left / "constant.png")
    hostile.one_pixel_png(left / "one_pixel.png")
    hostile.multipage_tiff(left / "pages.tif")
    return root


def test_hostile_files_are_bad_files_with_their_reasons(export):
    reasons = reasons_of(scan_folder(export, num_workers=0))
    for name in ("nan.dcm", "slope.dcm"):
        assert "non-finite pixel values" in reasons[f"left/{name}"]
    assert "declares 65535x65535" in reasons["left/rle8.dcm"] and "4.0 GiB" in reasons["left/rle8.dcm"]
    assert "8.0 GiB" in reasons["left/rle16.dcm"]
    assert "above max_pixels" in reasons["left/big.png"]
    assert "decompression-bomb guard" in reasons["left/bomb.png"]
    assert "constant image" in reasons["left/constant.png"]
    assert "degenerate image (1x1" in reasons["left/one_pixel.png"]
    assert "multi-page image (3 pages)" in reasons["left/pages.tif"]
    kept = scan_folder(export, num_workers=0, reject_degenerate=False)
    assert {"left/constant.png", "left/one_pixel.png"} <= {i["image"] for i in kept.items}  # configurable


def test_scanning_bombs_keeps_memory_bounded(export):
    """The scan of the export (4 and 8 GB declared) runs in a child process whose peak memory is measured."""
    # the child's own peak (VmHWM, restarted in the child): ru_maxrss would carry the forking test process's peak
    code = ("import sys; from wsr_med.data import scan_folder; from wsr_med.pipelines.bench_heads import peak_rss_mib; "
            "peak_rss_mib(reset=True); scan_folder(sys.argv[1], num_workers=0); print(peak_rss_mib())")
    peak_mib = float(subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
    print(f"peak RSS of the scan: {peak_mib:.0f} MiB")
    assert peak_mib < 1024  # the interpreter with torch and MONAI is ~500 MiB; one decoded bomb alone is 4096


def test_non_finite_loss_stops_training_naming_the_batch(tmp_path):
    data = make_synthetic_folder(tmp_path / "data", n_per_class=8, image_size=48)
    out = tmp_path / "run"
    with pytest.raises(Exception) as failure:  # a learning rate that diverges at the first step: the second batch says so
        run_workflow("train", **TINY, dataset_dir=str(data), output_dir=str(out), learning_rate=1e30, test_fraction=0.0,
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registered_model_name="")
    error = str(failure.value.__cause__ or failure.value)
    assert "the loss is nan" in error or "the loss is inf" in error, error
    assert "left/case" in error or "right/case" in error  # the batch's files, relative to the dataset
    assert not list((out / "checkpoints").glob("*.pt")) and not (out / "model.pt").exists()


def test_nan_weights_are_never_the_best_model(tmp_path):
    from types import SimpleNamespace

    from wsr_med.handlers import BestModelSaver

    net = torch.nn.Linear(2, 2)
    saver = BestModelSaver(net, tmp_path)

    def epoch(n: int, auc: float) -> None:
        saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_auc": auc}, epoch=n)))

    epoch(1, float("nan"))  # undefined metric: a first model is kept ...
    epoch(2, 0.6)  # ... until one is measured
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    epoch(3, 0.9)  # NaN weights are never saved, whatever the metric says
    epoch(4, float("nan"))
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "model.pt", weights_only=True).values())


def test_damaged_cache_entries_are_rebuilt(tmp_path, caplog):
    data = make_synthetic_folder(tmp_path / "data", n_per_class=2, image_size=48, formats=("png",))
    items = [{**i, "image": str(data / i["image"])} for i in scan_folder(data, num_workers=0).items]
    fresh = [scan_dataset(items, scan_transforms(32), None)[i]["image"] for i in range(4)]
    cached = scan_dataset(items, scan_transforms(32), tmp_path / "cache")
    [cached[i] for i in range(4)]  # fill the cache
    entries = sorted((tmp_path / "cache").glob("*.cache"))
    assert len(entries) == 4
    overwritten = bytearray(entries[0].read_bytes())
    overwritten[-200:] = bytes(200)  # same size, other content
    entries[0].write_bytes(bytes(overwritten))
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # truncated
    entries[2].write_bytes(b"")
    caplog.set_level(logging.WARNING, "wsr_med")
    again = [scan_dataset(items, scan_transforms(32), tmp_path / "cache")[i]["image"] for i in range(4)]
    assert all((a - b).abs().max() <= 0.5 / 65535 + 1e-7 for a, b in zip(fresh, again))  # stored as uint16
    assert caplog.text.count("is damaged") == 3
    assert all(e.stat().st_size > 1000 for e in entries[:3])  # rebuilt


def test_evaluation_without_a_class_is_valid_json_and_says_so():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    metrics = classification_metrics(np.array([0, 1, 0, 1]), probs, ["a", "b", "c"], n_boot=50)
    assert metrics["absent_classes"] == ["c"] and metrics["auc"] == 1.0 and "no case of class c" in metrics["warnings"][0]
    binary = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), ["neg", "pos"], n_boot=50)
    text = json.dumps(json_ready(binary), allow_nan=False)
    assert json.loads(text)["auc"] is None and binary["absent_classes"] == ["neg"]


def test_manifest_that_is_not_utf8_names_the_line(tmp_path):
    data = make_synthetic_folder(tmp_path / "data", n_per_class=2, image_size=32, formats=("png",))
    manifest = hostile.non_utf8_manifest(tmp_path / "labels.csv", str(next(data.rglob("*.png")).relative_to(tmp_path)))
    with pytest.raises(WsrMedError, match="line 3 is not UTF-8"):
        scan_manifest(manifest, num_workers=0)


def test_csv_cells_are_neutralised():
    assert neutralise('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert [neutralise(v) for v in ("-0.5", "+1e-3", "@SUM(A1)", "\tx", "left")] == ["-0.5", "+1e-3", "'@SUM(A1)", "'\tx", "left"]
    assert unneutralise(neutralise("=1+2")) == "=1+2" and unneutralise("'quoted") == "'quoted"


def test_log_records_stay_one_line():
    from wsr_med.log_format import EscapingFormatter
    from wsr_med.workflows import parse_bundle

    record = logging.LogRecord("wsr_med", logging.WARNING, __file__, 1, "skipping %s", ("evil\nFAKE ERROR caf\udce9",), None)
    line = EscapingFormatter("%(message)s").format(record)
    assert line == "skipping evil\\x0aFAKE ERROR caf\\udce9"
    for workflow in ("train", "evaluate", "inference", "multi_gpu_train"):  # every workflow escapes first
        assert parse_bundle(workflow)["initialize"][0] == "$wsr_med.log_format.escape_log_records()", workflow


def test_patient_pseudonyms_are_keyed(tmp_path, monkeypatch):
    from wsr_med.data import hash_id, scan

    def pseudonym(**env: str) -> str:
        monkeypatch.delenv("WSR_MED_ID_KEY", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        scan._id_key.cache_clear()  # the key is read once per process
        return hash_id("SEC-000042")

    try:
        first = pseudonym(XDG_CONFIG_HOME=str(tmp_path / "config"))
        key_file = tmp_path / "config" / "wsr_med" / "id_key"
        assert key_file.stat().st_mode & 0o077 == 0 and len(key_file.read_text()) == 64
        assert pseudonym(XDG_CONFIG_HOME=str(tmp_path / "config")) == first  # stable on one installation
        assert pseudonym(XDG_CONFIG_HOME=str(tmp_path / "other")) != first  # another installation, another key
        shared = pseudonym(WSR_MED_ID_KEY="project-secret")
        assert shared == pseudonym(WSR_MED_ID_KEY="project-secret", XDG_CONFIG_HOME=str(tmp_path / "other")) != first
    finally:
        monkeypatch.undo()
        scan._id_key.cache_clear()


def test_two_processes_create_one_sqlite_store(tmp_path):
    code = "import sys; from wsr_med.tracking import check_reachable; check_reachable(sys.argv[1])"
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results


def test_outputs_that_cannot_be_written_are_refused_before_the_scan(tmp_path):
    data = make_synthetic_folder(tmp_path / "data", n_per_class=4, image_size=32)
    (tmp_path / "not_a_folder").write_text("")
    with pytest.raises(Exception) as failure:
        run_workflow("train", **TINY, dataset_dir=str(data), output_dir=str(tmp_path / "run"),
                     cache_dir=str(tmp_path / "not_a_folder"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "not_a_folder is not a folder" in str(failure.value.__cause__ or failure.value)
    assert not (tmp_path / "run" / "datalist.json").exists()  # refused before the scan


def test_predicting_a_folder_of_bad_files_writes_the_report_first(tmp_path, export):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("nan.dcm", "constant.png", "pages.tif"):
        shutil.copy(export / "left" / name, bad / name)
    with pytest.raises(WsrMedError, match="no valid scans") as failure:
        scan_folder(bad, labelled=False, num_workers=0, report=tmp_path / "predictions_bad_files.csv")
    assert "predictions_bad_files.csv" in str(failure.value)
    with open(tmp_path / "predictions_bad_files.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> dict:
    """Train, evaluate and predict on an export whose folder names are a patient, a formula, markup and mathtext."""
    from wsr_med.data import write_dicom

    home = tmp_path_factory.mktemp("names")
    root = home / "SMITH^JOHN_19700101"  # exports name folders after patients
    classes = ['=HYPERLINK("http:x")', "ward $\\x$", "<img src=x onerror=alert(1)>"]
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for n in range(6):
            image = rng.random((48, 48)) * 0.2
            image[c * 16:(c + 1) * 16, :] += 0.8
            write_dicom(folder / f"case{c}{n}_0.dcm", image, f"SEC-{c}{n:05d}")
    os.rename(root / classes[0] / "case00_0.dcm", os.fsencode(root / classes[0]) + b"/caf\xe9\nFAKE.dcm")
    settings = {**TINY, "max_epochs": 2, "dataset_dir": str(root), "output_dir": str(home / "run"),
                "tracking_uri": f"sqlite:///{home / 'mlflow.db'}", "experiment_name": "names",
                "registered_model_name": "names_model"}
    cwd = os.getcwd()
    os.chdir(home)  # MLflow's local artifacts go to ./mlruns
    try:
        run_workflow("train", **settings)
        run_workflow("evaluate", output_dir=settings["output_dir"], tracking_uri=settings["tracking_uri"],
                     dataset_dir=str(root), num_workers=0)
        run_workflow("inference", output_dir=settings["output_dir"], tracking_uri=settings["tracking_uri"],
                     dataset_dir=str(root), num_workers=0)
    finally:
        os.chdir(cwd)
    return {"home": home, "run": home / "run", "uri": settings["tracking_uri"], "classes": classes}


def test_hostile_class_names_reach_csv_plots_and_mlflow_safely(hostile_run):
    from mlflow import MlflowClient

    run = hostile_run["run"]
    with open(run / "eval" / "cases.csv", newline="") as f:
        labels = {row["label"] for row in csv.DictReader(f)}
    assert '\'=HYPERLINK("http:x")' in labels and not any(v.startswith("=") for v in labels)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and not any(r["predicted_class"].startswith(("=", "+", "@")) for r in rows)
    assert any("caf\\udce9\nFAKE" in r["path"] for r in rows)  # a non-UTF-8 name with a newline: read, written escaped
    for name in ("roc.png", "confusion_matrix.png"):
        assert (run / "eval" / name).stat().st_size > 1000  # mathtext in a class name did not stop the plots
    client = MlflowClient(hostile_run["uri"])
    metrics = client.get_run((run / "mlflow_run_id").read_text()).data.metrics
    assert "eval_all_auc" in metrics and any(k.startswith("eval_all_auc__img") for k in metrics)


def test_no_patient_identifier_or_path_reaches_mlflow(hostile_run):
    import mlflow
    from mlflow import MlflowClient

    from wsr_med.tracking import tracking_uri_context

    client = MlflowClient(hostile_run["uri"])
    run_id = (hostile_run["run"] / "mlflow_run_id").read_text()
    tracked = client.get_run(run_id)
    with mlflow.utils.file_utils.TempDir() as tmp:
        local = Path(client.download_artifacts(run_id, "", tmp.path()))
        with tracking_uri_context(hostile_run["uri"]):
            model = Path(mlflow.artifacts.download_artifacts((hostile_run["run"] / "mlflow_model_uri").read_text(),
                                                             dst_path=tmp.path("model")))
        texts = [p.read_text(errors="replace") for folder in (local, model) for p in folder.rglob("*")
                 if p.is_file() and p.suffix in (".json", ".yaml", ".txt", ".html", ".csv", "") and p.stat().st_size < 5e6]
    texts += [json.dumps(tracked.data.params), json.dumps(tracked.data.tags)]
    everything = "\n".join(texts)
    # MLflow's own artifact store (./mlruns) may appear; the dataset and the run folder may not
    for secret in ("SMITH", "JOHN", "19700101", "SEC-0", str(hostile_run["run"]) + "/", "FAKE"):  # FAKE: a file name
        assert secret not in everything, secret


def test_evaluating_a_folder_without_a_class(hostile_run, tmp_path):
    subset = tmp_path / "two_classes"
    for name in hostile_run["classes"][1:]:
        shutil.copytree(hostile_run["run"].parent / "SMITH^JOHN_19700101" / name, subset / name)
    run_workflow("evaluate", output_dir=str(hostile_run["run"]), tracking_uri=hostile_run["uri"], dataset_dir=str(subset),
                 num_workers=0)
    text = (hostile_run["run"] / "eval" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["absent_classes"] == [hostile_run["classes"][0]] and metrics["per_class"][hostile_run["classes"][0]]["auc"] is None
    assert "no case of class" in (hostile_run["run"] / "eval" / "report.html").read_text()


def test_bad_file_reasons_reach_mlflow_without_paths(tmp_path):
    from wsr_med.tracking import sanitised_report

    report = tmp_path / "bad_files.csv"
    report.write_text("file,reason\nSMITH/x.png,\"not a readable image (cannot identify '/data/SMITH^JOHN/x.png')\"\n")
    [row] = sanitised_report(report)
    assert "SMITH" not in json.dumps(row) and "<path>" in row["reason"]


def test_max_pixels_is_a_setting(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300), dtype=np.uint8)).save(tmp_path / "scan.png")
    assert read_scan(tmp_path / "scan.png")[0].shape == (1, 200, 300)
    with pytest.raises(Exception, match="above max_pixels"):
        read_scan(tmp_path / "scan.png", max_pixels=50_000)
    transform = scan_transforms(64, max_pixels=50_000)  # training and inference read with the same limit
    with pytest.raises(Exception) as failure:  # MONAI wraps a transform's error
        transform({"image": str(tmp_path / "scan.png")})
    assert "above max_pixels" in str(failure.value.__cause__)


def test_scans_unlike_the_training_data_are_flagged(tmp_path):
    """A model trained on ultrasound (US DICOM) is asked about a chest radiograph (CR) and a colour picture."""
    import pydicom
    from PIL import Image

    from wsr_med.data import write_dicom

    train = make_synthetic_folder(tmp_path / "us", n_per_class=8, image_size=48, formats=("dcm",))
    for path in train.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.Modality = "US"
        ds.save_as(path)
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(next((train / "left").glob("*.dcm")), new / "us_like_training.dcm")
    write_dicom(new / "chest.dcm", np.random.default_rng(0).random((48, 48)), "SEC-000001")  # modality DX
    ds = pydicom.dcmread(new / "chest.dcm")
    ds.Modality = "CR"
    ds.save_as(new / "chest.dcm")
    colour = np.full((40, 40, 3), 255, np.uint8)  # a white colour picture with a red square: nothing like a scan
    colour[10:20, 10:20] = (255, 0, 0)
    Image.fromarray(colour).save(new / "colour.png")
    # a training scan exported by another site as an 8-bit RGB picture: other channels, the same image to the network
    pixels = read_scan(next((train / "left").glob("*.dcm")), channels=1)[0][0]
    scaled = np.uint8(255 * (pixels - pixels.min()) / (pixels.max() - pixels.min()))
    Image.fromarray(np.stack([scaled] * 3, axis=-1)).save(new / "same_scan_in_rgb.png")
    settings = {**TINY, "dataset_dir": str(train), "output_dir": str(tmp_path / "run"),
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": ""}
    run_workflow("train", **settings)
    assert set(json.loads((tmp_path / "run" / "profile.json").read_text())["modalities"]) == {"US"}
    run_workflow("inference", output_dir=settings["output_dir"], tracking_uri=settings["tracking_uri"], dataset_dir=str(new),
                 num_workers=0)
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        flags = {row["path"]: row["unlike_training"] for row in csv.DictReader(f)}
    assert flags["us_like_training.dcm"] == ""
    assert "modality CR never seen in training (US)" in flags["chest.dcm"]
    assert "intensity mean" in flags["colour.png"] and "channel" not in flags["colour.png"]  # its look, not its channels
    assert flags["same_scan_in_rgb.png"] == ""
