"""The README walked as a new user walks it, through the installed ``wsr-med``: the test split is there by default,
the report says positive for what, how sure and on how many cases, a continued run retires its old evaluation,
registered versions tell themselves apart, Ctrl-C / SIGTERM is one line, and a small 3D model trains."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient

from test_cli import SMALL, WSR_MED, ok, refused, wsr_med

QUIET = ["num_workers=0", "progress_bar=false"]


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> dict:
    """The README's sequence with its defaults: train, evaluate the test split, evaluate the validation split."""
    home = tmp_path_factory.mktemp("walk")
    ok(wsr_med(home, "synth", "hospital", "--n-per-class", "12", "--image-size", "64"))
    ok(wsr_med(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/a", "--set", "image_size=64", SMALL,
               "max_epochs=2", "batch_size=8", "learning_rate=0.01", *QUIET))
    test = ok(wsr_med(home, "evaluate", "--output-dir", "runs/a", "--eval-split", "test"))
    test_metrics = json.loads((home / "runs/a/eval/metrics.json").read_text())
    ok(wsr_med(home, "evaluate", "--output-dir", "runs/a", "--eval-split", "validation"))
    return {"home": home, "run": home / "runs/a", "test": test, "test_metrics": test_metrics,
            "uri": f"sqlite:///{home / 'mlflow.db'}"}


def test_the_test_split_is_there_by_default(walked):
    datalist = json.loads((walked["run"] / "datalist.json").read_text())
    assert datalist["counts"]["test"] > 0 and json.loads((walked["run"] / "config.json").read_text())["settings"]["test_fraction"] == 0.2
    assert walked["test_metrics"]["split"] == "test" and walked["test_metrics"]["n"] == datalist["counts"]["test"]
    assert not any("optimistic" in w for w in walked["test_metrics"]["warnings"])


def test_a_run_without_a_test_split_names_the_flag(walked):
    home = walked["home"]
    ok(wsr_med(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/no_test", "--set", "image_size=64", SMALL,
               "max_epochs=1", "test_fraction=0", *QUIET))
    refused(wsr_med(home, "evaluate", "--output-dir", "runs/no_test", "--eval-split", "test"),
            "has no 'test' split", "--dataset-dir DIR --eval-split all")


def test_the_report_says_positive_for_what_how_sure_on_how_many(walked):
    eval_dir = walked["run"] / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    html = (eval_dir / "report.html").read_text()
    assert metrics["split"] == "validation" and metrics["positive_class"] == "right"
    warnings = " ".join(metrics["warnings"])
    # the validation split chose the checkpoint and the calibration; few cases: both said in metrics.json and on the page
    assert "validation cases" in warnings and "optimistic" in warnings
    assert f"only {metrics['n']} cases were evaluated" in warnings
    for warning in metrics["warnings"]:
        assert warning.replace("'", "&#x27;") in html
    for phrase in ("positive class", "sensitivity for right", "specificity (not right)", "PPV for right",
                   "Operating point (value [95% bootstrap CI]); positive: right",
                   "Confusion matrix at the run&#x27;s operating point", "Reliability before calibration"):
        assert phrase in html, phrase
    assert "%.000" not in html and "0.000%" not in html and "<figcaption>roc</figcaption>" not in html
    prevalence = 100 * metrics["per_class"]["right"]["prevalence"]
    assert f"<td>{prevalence:.1f}%</td>" in html


def test_an_exported_validation_evaluation_carries_the_caveat_and_its_code(walked):
    home = walked["home"]
    ok(wsr_med(home, "export-bundle", "--output-dir", "runs/a", "--bundle-dir", "exported/v1"))
    bundle = home / "exported/v1"
    readme = (bundle / "docs/README.md").read_text()
    performance = readme[readme.index("## Performance"):readme.index("## Commands")]
    assert "**Caveat:**" in performance and "optimistic" in performance
    assert "pip install ./source" in readme and "wsr_med==" not in readme
    # the code the bundle was made with builds as a package, offline
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(home / "wheel"), str(bundle / "source")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert [p.name for p in (home / "wheel").glob("wsr_med-*.whl")], built.stdout
    assert not list((bundle / "source").rglob("__pycache__")) and (bundle / "source/wsr_med/cli.py").is_file()


def test_continuing_retires_the_old_evaluation_and_versions_tell_themselves_apart(walked):
    home, run = walked["home"], walked["run"]
    before = (run / "eval" / "metrics.json").read_text()
    result = ok(wsr_med(home, "train", "--output-dir", "runs/a", "--set", "max_epochs=3"))
    assert not (run / "eval").exists() and (run / "eval.superseded-1" / "metrics.json").read_text() == before
    assert "moved to" in result.stdout + result.stderr and "eval.superseded-1" in result.stdout + result.stderr
    client = MlflowClient(walked["uri"])
    versions = sorted(client.search_model_versions("name='wsr_med-left-right'"), key=lambda v: int(v.version))
    assert len(versions) >= 2
    best = json.loads((run / "best.json").read_text())
    latest = versions[-1]
    assert latest.tags["best_val_auc"] == f"{best['value']:.4f}" and latest.tags["best_epoch"] == str(best["epoch"])
    assert latest.tags["collapsed"] in ("yes", "no") and "best validation AUC" in latest.description
    assert all("best_val_auc" in v.tags for v in versions)


def _stopped(home: Path, args: list[str], started: str, sig: int, code: int, settle: float = 0.0) -> str:
    """``wsr-med <args>`` from ``home``, sent ``sig`` once its log shows ``started`` (then ``settle`` seconds); its log,
    after checking the exit code and that nothing was logged as an error."""
    log = home / f"{args[0]}-{sig}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(WSR_MED), *args], cwd=home, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 300
            while started not in log.read_text() and time.time() < deadline:
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(settle)
            process.send_signal(sig)
            assert process.wait(timeout=120) == code, log.read_text()[-3000:]
        finally:
            process.kill()
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    return text


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_stop_is_one_line(tmp_path, sig, code, said):
    ok(wsr_med(tmp_path, "synth", "hospital", "--n-per-class", "8", "--image-size", "64"))
    text = _stopped(tmp_path, ["train", "--dataset-dir", "hospital", "--output-dir", "runs/t", "--set", "image_size=64", SMALL,
                               "max_epochs=500", *QUIET], "Epoch[1] Complete", sig, code)
    assert f"wsr-med train: stopped by {said} (the run resumes from its last completed epoch" in text


def test_a_stopped_prediction_is_one_line(walked):
    """Ctrl-C while ``wsr-med predict`` runs (no MLflow tracker there): one line, exit 130, no ignite/MONAI traceback."""
    home = walked["home"]
    ok(wsr_med(home, "synth", "many", "--n-per-class", "200", "--image-size", "64", "--formats", "png"))
    text = _stopped(home, ["predict", "--output-dir", "runs/a", "--dataset-dir", "many", "--set", "num_workers=0",
                           "batch_size=1"], "valid scans", signal.SIGINT, 130, settle=1.0)  # settle: into the evaluator's loop
    assert "wsr-med predict: stopped by Ctrl-C" in text and "resumes" not in text


def test_calibration_that_failed_is_said_in_the_report():
    from wsr_med.handlers import EvaluationReporter

    reporter = EvaluationReporter(["a", "b"], "unused", eval_split="test")
    fine = {"fitted_on": "validation split, epoch 3", "temperature": 1.3, "ece_before": 0.05, "ece_after": 0.03}
    assert reporter._caveats(fine) == []
    caveats = reporter._caveats({**fine, "temperature": 20.0, "ece_before": 0.002, "ece_after": 0.030})
    assert len(caveats) == 2 and "stopped at its bound" in caveats[0] and "(0.002 → 0.030)" in caveats[1]
    assert "optimistic" in EvaluationReporter(["a", "b"], "unused", eval_split="validation")._caveats(fine)[0]


def _volumes(root: Path, n_per_class: int) -> Path:
    """A CSV manifest of small NIfTI volumes, two classes (a bright cube in a corner or not), splits given."""
    rng = np.random.default_rng(0)
    rows = []
    for label in ("absent", "present"):
        for i in range(n_per_class):
            volume = rng.normal(100, 10, (24, 24, 24)).astype(np.float32)
            if label == "present":
                volume[2:10, 2:10, 2:10] += 80
            name = f"{label}_{i}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / name)
            split = "train" if i < 5 else ("val" if i < 7 else "test")
            rows.append([name, label, f"{label}{i}", split])
    with open(root / "volumes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id", "split"], *rows])
    return root / "volumes.csv"


def test_a_small_3d_model(tmp_path):
    manifest = _volumes(tmp_path, 8)
    refused(wsr_med(tmp_path, "train", "--dataset-dir", str(manifest), "--output-dir", "runs/v16", "--set",
                    "spatial_dims=3", "image_size=16", SMALL, *QUIET),
            "image_size 16 is too small for backbone 'densenet121' in 3D", "the smallest image_size it takes is 29")
    assert not (tmp_path / "runs/v16").exists()
    # 10 training volumes in batches of 3: the last batch, of one volume, is dropped (BatchNorm cannot train on it)
    result = ok(wsr_med(tmp_path, "train", "--dataset-dir", str(manifest), "--output-dir", "runs/v", "--set",
                        "spatial_dims=3", "image_size=32", "batch_size=3", SMALL, "max_epochs=2", *QUIET))
    assert "nvImageCodec" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "runs/v/datalist.json").read_text())["counts"]["training"] == 10
    ok(wsr_med(tmp_path, "evaluate", "--output-dir", "runs/v", "--eval-split", "test"))
