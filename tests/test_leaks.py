"""Nothing leaks, nothing bursts: the served model as an attacker calls it, what leaves with a model, hostile
compressed DICOM measured in a child process, and a full disk (a real tmpfs), through the installed ``wsr-med``.

The served model runs as a user starts it: ``wsr-med serve`` in a shell whose PATH does not hold the environment's
``bin/`` (a user who has not activated it), on 127.0.0.1.
"""

import base64
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pytest
from mlflow import MlflowClient

import hostile_files
from test_cli import SMALL, WSR_MED, ok, refused, wsr_med
from wsr_med.pipelines.bench_serve import process_memory_mib
from wsr_med.tracking import tracking_uri_context

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A run trained and registered through the entry point, then exported as a bundle."""
    home = tmp_path_factory.mktemp("leaks")
    ok(wsr_med(home, "synth", "hospital", "--n-per-class", "8", "--image-size", "64"))
    ok(wsr_med(home, "train", "--dataset-dir", "hospital", "--output-dir", "runs/a", "--set", "image_size=64", SMALL,
               "max_epochs=1", "batch_size=8", "num_workers=0", "progress_bar=false", "registered_model_name=leaky"))
    ok(wsr_med(home, "export-bundle", "--output-dir", "runs/a", "--bundle-dir", "shared/bundle_v1"))
    return {"home": home, "run": home / "runs/a", "uri": f"sqlite:///{home / 'mlflow.db'}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``wsr-med serve`` started from a plain shell (PATH without the environment's bin/), on a free port."""

    def __init__(self, home: Path, *options: str, model: str = "models:/leaky/1") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
        self.process = subprocess.Popen([str(WSR_MED), "serve", "-m", model, "--port", str(self.port), *options],
                                        cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"wsr-med serve exited: {self.process.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("wsr-med serve did not start")

    def post(self, body: bytes | dict, timeout: float = 120) -> tuple[int, str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def answer(self, body: dict) -> list[dict]:
        status, text = self.post(body)
        assert status == 200, text[:2000]
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the answer: not JSON"))["predictions"]

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(trained):
    """Served with bytes only, as by default."""
    s = Server(trained["home"])
    yield s
    s.stop()


def test_paths_are_off_by_default_and_bytes_answer_like_predict(trained, server, tmp_path):
    scan = next((trained["home"] / "hospital" / "left").glob("*.dcm"))
    rows = server.answer({"dataframe_records": [{"bytes": b64(scan)}, {"path": str(scan)}, {"path": "/etc/passwd"}]})
    assert rows[0]["error"] == "" and rows[0]["predicted_class"] in ("left", "right")
    assert rows[1]["error"] == "row 1: paths are not accepted by this server: send the scan's bytes"
    assert rows[2]["error"] == "row 2: paths are not accepted by this server: send the scan's bytes"
    assert rows[1]["prob_left"] is None and rows[1]["predicted_class"] == ""


def test_path_roots_answer_the_same_for_every_path_outside(trained, tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    scan = next((trained["home"] / "hospital" / "left").glob("*.dcm"))
    shutil.copy(scan, root / "scan.dcm")
    (root / "escape").symlink_to("/etc/passwd")
    server = Server(trained["home"], "--path-root", str(root))
    try:
        probes = [str(root / "scan.dcm"), "/etc/passwd", str(scan), str(root / ".." / "allowed" / ".." / scan.name),
                  str(root / "missing.dcm"), str(root / "escape"), "/", "scan.dcm", str(root)]
        rows = server.answer({"dataframe_records": [{"path": p} for p in probes]})
    finally:
        server.stop()
    assert rows[0]["error"] == "" and rows[0]["prob_left"] is not None
    answers = {row["error"].split(": ", 1)[1] for row in rows[1:]}
    assert answers == {"path not available on this server"}, answers


def test_strict_json_one_row_per_input_in_every_shape(trained, server):
    scan = b64(next((trained["home"] / "hospital" / "right").glob("*.png")))
    shapes = [{"dataframe_records": [{"bytes": scan}, {"bytes": "not base64!"}, {}]},
              {"dataframe_split": {"columns": ["bytes"], "data": [[scan], ["AAAA"], [None]]}},
              {"inputs": [{"bytes": scan}, {"bytes": "AAAA"}, {"other": 1}]},
              {"instances": [{"bytes": scan}, {"bytes": "AAAA"}, {"path": None}]}]
    for body in shapes:
        rows = server.answer(body)
        assert len(rows) == 3, (list(body), rows)
        assert rows[0]["error"] == "" and rows[1]["error"] and rows[2]["error"], (list(body), rows)
        assert rows[1]["prob_left"] is None and rows[1]["predicted_class"] == ""


def test_every_shape_of_row_answers_one_row_and_a_malformed_body_a_short_400(trained, server):
    for body, n in (({"inputs": ["/etc/passwd"]}, 1), ({"dataframe_records": [{}]}, 1), ({"inputs": [[1, 2]]}, 1),
                    ({"instances": [None, "x"]}, 2), ({"dataframe_split": {"columns": [], "data": [[], []]}}, 2)):
        rows = server.answer(body)
        assert len(rows) == n, (body, rows)
        assert all(r["error"].endswith("give 'bytes' (base64 of the scan file)") for r in rows), (body, rows)
    malformed = b'{"dataframe_records": [{"bytes": "' + b"A" * 2**20 + b'"'  # cut short: no closing brackets
    status, text = server.post(malformed)
    assert status == 400 and len(text) < 300 and "AAAA" not in text and "not JSON" in text, text[:300]


def test_concurrent_large_requests_peak_about_as_one(trained):
    """Three requests at the body limit at once: the server's peak grows about as much as for one of them alone (the
    bodies wait for their share of one budget), and every request is answered."""
    import concurrent.futures

    server = Server(trained["home"], "--max-request-mib", "24")
    try:
        blob = base64.b64encode(np.random.default_rng(0).bytes(5 * 2**20)).decode()  # not a scan: answered quickly
        body = json.dumps({"dataframe_records": [{"bytes": blob}] * 4}).encode()
        server.answer({"dataframe_records": [{"bytes": blob}]})  # warm: the first request's allocations are not counted
        base = process_memory_mib(server.process.pid, reset=True)[1]
        status, _ = server.post(body)
        one = process_memory_mib(server.process.pid)[0] - base
        base = process_memory_mib(server.process.pid, reset=True)[1]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            statuses = [status for status, _ in pool.map(server.post, [body] * 3)]
        three = process_memory_mib(server.process.pid)[0] - base
    finally:
        server.stop()
    print(f"server peak growth: one request {one:.0f} MiB, three at once {three:.0f} MiB")
    assert status == 200 and statuses == [200] * 3
    assert three < 1.25 * one, (one, three)  # without the budget: about 1.7 x one


def test_errors_quote_no_header_value(trained, server, tmp_path):
    bad = hostile_files.text_in_rescale_slope_dicom(tmp_path / "slope.dcm", "DOE^JOHN")
    (row,) = server.answer({"dataframe_records": [{"bytes": b64(bad)}]})
    assert row["error"] == "row 0: RescaleSlope is not a number"
    assert "DOE" not in json.dumps(row)


def test_request_bounds(trained, server):
    scan = b64(next((trained["home"] / "hospital" / "right").glob("*.png")))
    rows = server.answer({"dataframe_records": [{"bytes": scan}] * 66})
    assert len(rows) == 66 and all(r["error"] == "" for r in rows[:64])
    assert rows[64]["error"] == "row 64: over the 64 rows a request may hold"
    # a 400 MiB body announced: refused on its Content-Length, before any of it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n{" % (400 * 2**20))
        reply = b""
        while b"request body over" not in reply and (chunk := connection.recv(4096)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"request body over" in reply, reply


def test_rows_past_the_deadline_answer_timeout(trained):
    """The registered model in this process, with a deadline already past: no row is computed, each says so."""
    import dataclasses

    import mlflow.pyfunc
    import pandas as pd

    with tracking_uri_context(trained["uri"]):
        model = mlflow.pyfunc.load_model("models:/leaky/1")
    classifier = model.unwrap_python_model()
    scan = b64(next((trained["home"] / "hospital" / "right").glob("*.png")))
    assert classifier.predict(None, pd.DataFrame([{"bytes": scan}]))["error"][0] == ""
    classifier.limits = dataclasses.replace(classifier.limits, timeout_s=0)
    answer = classifier.predict(None, pd.DataFrame([{"bytes": scan}] * 3))
    assert list(answer["error"]) == ["row 0: timeout", "row 1: timeout", "row 2: timeout"]
    assert answer["prob_left"].isna().all()


def test_hostile_compressed_dicom_is_refused_with_bounded_memory(tmp_path):
    """Per format, in a child process whose peak memory is measured: every file is refused before its claimed
    size is allocated (a 1 MB Deflated DICOM inflating to 1 GiB, JPEG and JPEG 2000 frames claiming 30000x30000
    inside a 64x64 DICOM)."""
    files = [hostile_files.deflated_bomb_dicom(tmp_path / "deflated.dcm"),
             hostile_files.lying_jpeg_dicom(tmp_path / "jpeg.dcm"),
             hostile_files.lying_jpeg2000_dicom(tmp_path / "j2k.dcm")]
    assert all(f.stat().st_size < 10 * 2**20 for f in files)
    code = ("import sys; from wsr_med.data import read_scan; from wsr_med.data.readers import ScanReadError; "
            "from wsr_med.pipelines.bench_heads import peak_rss_mib\n"
            "peak_rss_mib(reset=True)\n"
            "try:\n    read_scan(sys.argv[1]); print('accepted')\n"
            "except ScanReadError as e:\n    print(e.summary)\n"
            "print(peak_rss_mib())")
    for path in files:
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout.split("\n")
        print(path.name, out)
        assert "refused before" in out[0], (path.name, out)
        assert float(out[1]) < 900, (path.name, out)  # the interpreter with torch and MONAI is ~500 MiB
    honest = hostile_files.deflated_dicom(tmp_path / "honest.dcm")
    from wsr_med.data import read_scan

    assert read_scan(honest)[0].shape == (1, 64, 64)


def test_nothing_identifying_leaves_with_a_model(trained, tmp_path):
    """Every exported and logged artifact, grepped for this test's folders, the checkout, the environment and the user."""
    secrets = {str(trained["home"]), str(CHECKOUT), str(Path(sys.executable).parent.parent), getpass.getuser() + "/",
               "/" + getpass.getuser(), "/tmp/"}
    secrets = {s.encode() for s in secrets if len(s) > 3}

    def leaks(folder: Path) -> dict:
        found = {}
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                if path.name == "MLmodel":  # MLflow's own record of where its artifact store is (here: this test's)
                    data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"artifact_path: "))
                hits = [s.decode() for s in secrets if s in data]
                if hits:
                    found[str(path.relative_to(folder))] = hits
        return found

    assert leaks(trained["home"] / "shared" / "bundle_v1") == {}
    client = MlflowClient(trained["uri"])
    run_id = (trained["run"] / "mlflow_run_id").read_text()
    download = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(download))
    for model in client.search_logged_models([client.get_run(run_id).info.experiment_id]):
        for key in ("mlflow.user", "mlflow.source.name", "mlflow.source.git.repoURL"):
            assert model.tags.get(key, "") in ("", "wsr_med"), (model.name, key, model.tags.get(key))
        with tracking_uri_context(trained["uri"]):
            target = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                              dst_path=str(tmp_path / model.name)))
        assert (target / "MLmodel").is_file() and leaks(target) == {}, model.name
    assert leaks(download) == {}
    import torch

    exported = torch.jit.load(trained["home"] / "shared" / "bundle_v1" / "models" / "model.ts")
    reference = torch.jit.script(exported)  # loads and runs without its debug entries
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(exported(x), reference(x))


def test_path_ids_are_keyed(tmp_path, monkeypatch):
    from wsr_med.data import scan
    from wsr_med.runs import path_id

    scan._id_key.cache_clear()
    monkeypatch.setenv("WSR_MED_ID_KEY", "one")
    first = path_id("/home/someone/data")
    scan._id_key.cache_clear()
    monkeypatch.setenv("WSR_MED_ID_KEY", "two")
    assert path_id("/home/someone/data") != first
    scan._id_key.cache_clear()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (CI runs as root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_a_rerun_completes(trained, tiny_disk, tmp_path):
    home = trained["home"]
    filler = tiny_disk / "filler"
    # the run folder on the small disk, 64 KiB left (a checkpoint of this tiny network is ~100 KiB); the data and
    # the MLflow store elsewhere
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 64 * 2**10))
    args = ("train", "--dataset-dir", "hospital", "--output-dir", str(tiny_disk / "run"), "--set", "image_size=64", SMALL,
            "max_epochs=1", "batch_size=8", "num_workers=0", "progress_bar=false", "registered_model_name=disk")
    result = wsr_med(home, *args)
    refused(result, "no space left", str(tiny_disk))
    assert "Traceback" not in result.stdout + result.stderr  # ignite's and MONAI's own logs of it included
    assert not list(tiny_disk.rglob("*.tmp")) and not list(tiny_disk.rglob(".*.tmp"))
    for path in (tiny_disk / "run").rglob("*.json"):
        assert path.stat().st_size > 0, path
    client = MlflowClient(trained["uri"])
    statuses = [r.info.status for r in client.search_runs([client.get_experiment_by_name("wsr_med").experiment_id])]
    assert "RUNNING" not in statuses, statuses
    filler.unlink()
    ok(wsr_med(home, *args))
    assert (tiny_disk / "run" / "model.pt").is_file()


def test_the_pseudonym_key_is_never_left_empty(tiny_disk):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tiny_disk)}
    env.pop("WSR_MED_ID_KEY", None)
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 32))  # room for a folder's entry, not for a key
    code = "from wsr_med.data.scan import hash_id; hash_id('x')"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    key = tiny_disk / "wsr_med" / "id_key"
    assert failed.returncode != 0 and not key.exists(), failed.stderr[-500:]
    (tiny_disk / "filler").unlink()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert len(key.read_text()) == 64


def test_export_refuses_the_run_folder_and_a_bad_version(trained):
    home = trained["home"]
    refused(wsr_med(home, "export-bundle", "--output-dir", "runs/a", "--bundle-dir", "runs/a/bundle"), "inside the run folder")
    refused(wsr_med(home, "export-bundle", "--output-dir", "runs/a", "--bundle-dir", "b2", "--version", "1.0"),
            "not a semantic version")
    assert not (home / "runs/a/bundle").exists() and not (home / "b2").exists()


def test_predict_warns_while_the_run_trains(trained):
    """Another process holds the run's training lock (as a training does) while predict runs."""
    code = (f"import fcntl, time; f = open({str(trained['run'] / '.lock')!r}, 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = ok(wsr_med(trained["home"], "predict", "--output-dir", "runs/a", "--dataset-dir", "hospital/left"))
    finally:
        holder.kill()
    assert "is still training" in result.stdout + result.stderr
