"""Serving speed: the registered model through ``wsr-med serve`` (REST) vs the same model called in-process.

    wsr-med bench serve                     # 64 generated scans, a small network at 128 px
    wsr-med bench serve --image-size 224 --n-scans 64

In one run: train a small model for one epoch on a generated folder (registered in a temporary SQLite
store), load the registered model in this process, start ``wsr-med serve --path-root <data>`` on 127.0.0.1, then send
the same 64 scans in requests of 1 and of 16 scans, both ways: as base64 bytes (what a remote client sends;
about 0.7 MB of JSON per 512 px 16-bit scan) and as paths (a client on the server's machine).
Prints images/s per way and batch size, their ratio (target: REST >= 0.7x in-process at batch 16), and the
p50 / p95 latency of one-scan requests.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-scans", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=128, help="the network's input size")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the scans per measurement (best kept)")
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
        mlflow.set_tracking_uri(uri)
        os.environ[PATH_ROOTS_ENV] = str(data)  # in-process, paths under the data folder, as the server allows them
        model = mlflow.pyfunc.load_model(model_uri)
        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        server = subprocess.Popen([sys.executable, "-m", "wsr_med.cli", "serve", "-m", model_uri, "--port", str(port),
                                   "--path-root", str(data)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}/invocations"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("wsr-med serve did not start")
                time.sleep(0.5)
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
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
