"""A wheel, installed non-editable, carries everything: the bundle, the pipelines, the demo, from any folder.

The wheel goes into a fresh virtual environment that reuses this environment's installed dependencies
(a ``.pth`` line to its site-packages; the editable ``wsr_med`` of this checkout is not visible there,
as ``.pth`` files of an added path are not processed), so nothing is downloaded.
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", REPO], tmp)
    wheel = next((tmp / "dist").glob("wsr_med-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "wsr_med_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "-q", wheel], tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return {"venv": venv, "cwd": elsewhere, "site": site}


def test_installed_package_is_not_the_checkout(installed):
    where = run([installed["venv"] / "bin" / "python", "-c", "import wsr_med; print(wsr_med.__file__)"], installed["cwd"]).stdout
    assert where.startswith(str(installed["site"])), where


def test_bundle_path_points_into_the_installed_package(installed):
    bundle = Path(run([installed["venv"] / "bin" / "wsr-med", "bundle-path"], installed["cwd"]).stdout.strip())
    assert str(bundle).startswith(str(installed["site"]))
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "metadata.json", "logging.conf"):
        assert (bundle / "configs" / name).is_file(), name


def test_demo_runs_from_the_wheel(installed):
    result = run([installed["venv"] / "bin" / "wsr-med", "demo", "--set", "max_epochs=1"],
                 installed["cwd"])
    demo = installed["cwd"] / "runs" / "demo"
    for name in ("model.pt", "config.json", "eval/metrics.json", "eval/report.html", "predictions.csv"):
        assert (demo / name).is_file(), name
    assert json.loads((demo / "eval" / "metrics.json").read_text())["n"] > 0
    assert "runs/demo/predictions.csv" in result.stdout
    again = run([installed["venv"] / "bin" / "wsr-med", "demo", "--set", "max_epochs=1"], installed["cwd"])
    assert "runs/demo holds an earlier demo: this one goes to runs/demo-2" in again.stdout
    assert (installed["cwd"] / "runs" / "demo-2" / "predictions.csv").is_file()
    assert json.loads((demo / "eval" / "metrics.json").read_text())["n"] > 0  # the first demo is left as it was


def test_pipelines_run_from_the_wheel(installed):
    """A real step of the study pipeline from the wheel: a study's grid, parent run and (empty) summary."""
    result = run([installed["venv"] / "bin" / "wsr-med", "ablate", "--dataset-dir", "runs/demo/new_scans", "--output-dir",
                  "study", "--heads", "gap", "wise", "--folds", "2", "--summary-only"], installed["cwd"])
    grid = json.loads((installed["cwd"] / "study" / "grid.json").read_text())
    assert grid["heads"] == ["gap", "wise"] and grid["folds"] == 2
    assert len((installed["cwd"] / "study" / "parent_run_id").read_text().strip()) == 32
    assert "study wall time this invocation" in result.stdout
    for command in (["bench", "heads", "--help"], ["bench", "io", "--help"], ["bench", "batchnorm", "--help"]):
        assert "usage" in run([installed["venv"] / "bin" / "wsr-med", *command], installed["cwd"]).stdout
