"""Serving speed: the registered model through ``wsr-med serve`` (REST) vs the same model called in-process.

    wsr-med bench serve                     # 64 generated scans, a small network at 128 px
    wsr-med bench serve --image-size 224 --n-scans 64

In one run: train a small model for one epoch on a generated folder (registered in a temporary SQLite
store), load the registered model in this process, start ``wsr-med serve --path-root <data>`` on 127.0.0.1, then send
the same 64 scans in requests of 1 and of 16 scans, both ways: as base64 bytes (what a remote client sends;
about 0.7 MB of JSON per 512 px 16-bit scan) and as paths (a client on the server's machine).
Prints images/s per way and batch size, their ratio (target: REST >= 0.7x in-process at batch 16), and the
p50 / p95 latency of one-scan requests.

    wsr-med bench serve --memory                       # the server's peak memory at 64, 96 and 256 MiB per request
    wsr-med bench serve --memory --max-request-mib 64

With ``--memory``: for each ``--max-request-mib``, a server started with it gets one request at its limit (random bytes
that are no scan: the body, not the decoding, is measured), then three such requests at once; prints the server's
idle resident memory, its peak for one and for three (VmHWM, reset between), and the ratio of the growths (target:
three at once grow about as one, ratio <= 1.25).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from wsr_med.pacs.orthanc import free_port

SMALL = {"init_features": 16, "growth_rate": 8, "block_config": [2, 2, 2, 2]}


def _post(url: str, records: list[dict]) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps({"dataframe_records": records}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["predictions"]


def _timed(call, batches: list[list[dict]]) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        call(batch)
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies


def _start_server(model_uri: str, uri: str, *options: str) -> tuple[subprocess.Popen, str]:
    """``wsr-med serve`` of ``model_uri`` on a free port, once it answers ``/ping``; returns it and its base URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([sys.executable, "-m", "wsr_med.cli", "serve", "-m", model_uri, "--port", str(port),
                               *options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                _stop(server)
                raise RuntimeError("wsr-med serve did not start")
            time.sleep(0.5)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def process_memory_mib(pid: int, reset: bool = False) -> tuple[float, float]:
    """(peak, current) resident memory of process ``pid`` in MiB; ``reset`` starts a new peak from now."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024, int(status["VmRSS"].split()[0]) / 1024


def _post_body(url: str, body: bytes) -> int:
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _memory(model_uri: str, uri: str, limits: list[float]) -> None:
    """The ``--memory`` measurement (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    print("| --max-request-mib | body (MiB) | idle (MiB) | one request: peak (MiB) | three at once: peak (MiB) | "
          "growth three / one |")
    print("|---|---|---|---|---|---|")
    for mib in limits:
        server, url = _start_server(model_uri, uri, "--max-request-mib", f"{mib:g}")
        try:
            rows = 16
            blob = base64.b64encode(np.random.default_rng(0).bytes(int(mib * 0.97 * 2**20 / rows))).decode()
            body = json.dumps({"dataframe_records": [{"bytes": blob}] * rows}).encode()
            _post_body(url, json.dumps({"dataframe_records": [{"bytes": blob}]}).encode())  # warm-up
            _, idle = process_memory_mib(server.pid, reset=True)
            statuses = [_post_body(url, body)]
            one, _ = process_memory_mib(server.pid)
            _, before = process_memory_mib(server.pid, reset=True)
            with ThreadPoolExecutor(3) as pool:
                statuses += list(pool.map(lambda b: _post_body(url, b), [body] * 3))
            three, _ = process_memory_mib(server.pid)
        finally:
            _stop(server)
        if statuses != [200] * 4:
            raise RuntimeError(f"the server answered {statuses}")
        print(f"| {mib:g} | {len(body) / 2**20:.0f} | {idle:.0f} | {one:.0f} | {three:.0f} | "
              f"{(three - before) / max(one - idle, 1):.2f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-scans", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=128, help="the network's input size")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the scans per measurement (best kept)")
    parser.add_argument("--memory", action="store_true", help="measure the server's peak memory instead of its speed")
    parser.add_argument("--max-request-mib", type=float, nargs="+", default=[64, 96, 256],
                        help="with --memory: the limits measured")
    args = parser.parse_args(argv)
    import mlflow
    import pandas as pd

    from wsr_med.data import make_synthetic_folder
    from wsr_med.workflows import run_workflow
    from wsr_med.workflows.serving import PATH_ROOTS_ENV

    work = Path(tempfile.mkdtemp(prefix="wsr_bench_serve_"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    server = None
    try:
        data = make_synthetic_folder(work / "data", n_per_class=max(args.n_scans // 2, 8), image_size=512, seed=3)
        run_workflow("train", dataset_dir=str(data), output_dir=str(work / "run"), tracking_uri=uri, image_size=args.image_size,
                     backbone_kwargs=SMALL, max_epochs=1, batch_size=16, num_workers=0, progress_bar=False,
                     experiment_name="bench_serve", registered_model_name="bench_serve")
        scans = sorted(p for p in data.rglob("*") if p.is_file())[: args.n_scans]
        by_kind = {"bytes": [{"bytes": base64.b64encode(p.read_bytes()).decode()} for p in scans],
                   "path": [{"path": str(p)} for p in scans]}
        records = by_kind["bytes"]
        model_uri = "models:/bench_serve/1"
        if args.memory:
            return _memory(model_uri, uri, args.max_request_mib)
        mlflow.set_tracking_uri(uri)
        os.environ[PATH_ROOTS_ENV] = str(data)  # in-process, paths under the data folder, as the server allows them
        model = mlflow.pyfunc.load_model(model_uri)
        server, base = _start_server(model_uri, uri, "--path-root", str(data))
        url = f"{base}/invocations"
        _post(url, records[:2])  # warm-up: first request loads lazily
        model.predict(pd.DataFrame(records[:2]))
        print(f"{len(records)} scans (512 px, DICOM and PNG); network: small DenseNet at {args.image_size} px; "
              f"best of {args.repeats} passes\n")
        print("| input | batch | in-process img/s | REST img/s | REST / in-process | REST p50 / p95 latency per request (ms) |")
        print("|---|---|---|---|---|---|")
        for kind, size in (("bytes", 1), ("bytes", 16), ("path", 1), ("path", 16)):
            batches = [by_kind[kind][i:i + size] for i in range(0, len(records), size)]
            local = min(_timed(lambda b: model.predict(pd.DataFrame(b)), batches)[0] for _ in range(args.repeats))
            runs = [_timed(lambda b: _post(url, b), batches) for _ in range(args.repeats)]
            rest, latencies = min(runs, key=lambda r: r[0])
            p50, p95 = (1000 * np.quantile(latencies, q) for q in (0.5, 0.95))
            print(f"| {kind} | {size} | {len(records) / local:.1f} | {len(records) / rest:.1f} | {local / rest:.2f} | "
                  f"{p50:.0f} / {p95:.0f} |", flush=True)
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
