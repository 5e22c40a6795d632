"""PACS speed: instances retrieved from a DICOMweb archive, classified and stored back as SRs, against
``wsr-med predict`` on the same files on disk, in one run.

    wsr-med bench pacs                            # 64 generated DICOM radiographs, 256 px, a small network at 128 px
    wsr-med bench pacs --n-instances 200 --image-size 512

In one run: a generated folder of single-frame DICOM files (one study each), a small model trained for one epoch on it,
a throw-away Orthanc on 127.0.0.1 (:class:`wsr_med.pacs.orthanc.LocalOrthanc`) loaded with the files. Then, timed in
this process: ``predict`` on the folder (the bundle's inference workflow, as ``wsr-med predict`` runs it), and the
archive path (QIDO-RS query, WADO-RS retrieval, decoding, network, SR, STOW-RS), whose seconds per stage are printed.
Prints instances/s both ways and their ratio (goal: the archive path >= 0.7x predict on disk).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

SMALL = {"init_features": 16, "growth_rate": 8, "block_config": [2, 2, 2, 2]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-instances", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated radiographs")
    parser.add_argument("--model-size", type=int, default=128, help="the network's input size")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each way (the best is kept)")
    args = parser.parse_args(argv)

    from wsr_med.data import make_synthetic_folder
    from wsr_med.pacs import DicomWebArchive, classify_studies
    from wsr_med.pacs.archive import AUTH_ENV
    from wsr_med.pacs.orthanc import LocalOrthanc, orthanc_available
    from wsr_med.workflows.bundle import BUNDLE, run_workflow

    if not orthanc_available():
        raise SystemExit("wsr-med bench pacs needs Orthanc: apt-get install orthanc orthanc-dicomweb")
    logging.getLogger("wsr_med").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="wsr_med_bench_pacs_") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_folder(tmp / "data", n_per_class=args.n_instances // 2, image_size=args.image_size,
                                     n_classes=2, formats=("dcm",), seed=0)
        files = sorted(data.rglob("*.dcm"))
        run = tmp / "run"
        run_workflow("train", BUNDLE, dataset_dir=str(data), output_dir=str(run), image_size=args.model_size,
                     backbone_kwargs=SMALL, max_epochs=1, batch_size=16, tracking_uri="none", progress_bar=False)
        with LocalOrthanc(tmp / "orthanc") as pacs:
            pacs.upload(files)
            os.environ[AUTH_ENV] = pacs.auth
            disk, archive, stages = [], [], None
            for repeat in range(args.repeats):
                start = time.perf_counter()
                run_workflow("inference", BUNDLE, dataset_dir=str(data), output_dir=str(run),
                             predictions_file=str(tmp / f"disk_{repeat}.csv"), tracking_uri="none")
                disk.append(time.perf_counter() - start)
                start = time.perf_counter()
                source = DicomWebArchive(pacs.dicomweb)
                summary = classify_studies(run, source, source, query={"Modality": "DX"},
                                           predictions_file=tmp / f"archive_{repeat}.csv")
                archive.append(time.perf_counter() - start)
                if repeat == 0:
                    stored_first, stages = summary.stored, summary.seconds
                    if summary.stored != len(files):
                        raise SystemExit(f"expected {len(files)} SRs stored, got {summary.stored}")
            # the repeats find the SRs already stored (what a rerun does): the first run is the one that stores
            print(f"{len(files)} DICOM instances ({args.image_size} px, one study each), model at {args.model_size} px, "
                  f"{os.cpu_count()} CPU cores")
            print(f"  predict on disk (wsr-med predict):         {len(files) / min(disk):7.1f} instances/s")
            print(f"  archive -> classify -> SR -> STOW-RS:      {len(files) / archive[0]:7.1f} instances/s "
                  f"({stored_first} SRs stored)")
            print(f"  archive again (SRs already there):         {len(files) / min(archive[1:] or archive):7.1f} instances/s")
            print(f"  ratio archive / disk: {min(disk) / archive[0]:.2f}x (goal >= 0.7x)")
            total = sum(stages.values())
            print("  where the archive run's time goes: " + ", ".join(
                f"{stage} {seconds:.2f} s ({seconds / total:.0%})" for stage, seconds in stages.most_common()))
