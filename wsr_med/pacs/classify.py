"""Classify the studies of an archive (or a DICOM folder) and store the results as DICOM SRs in those studies.

A study at a time: its headers (WADO-RS metadata, no pixels), the selection, then the chosen instances retrieved and
classified a batch at a time (memory: one batch of scans; disk: nothing but a 3D series while it is read), an SR per
image (2D) or series (3D), stored unless the destination already holds it. The network, preprocessing and decision
are the run folder's (:class:`wsr_med.workflows.TrainedModel`), as for ``wsr-med predict``.

One failed instance is listed (``skipped.csv``) and the rest go on; a study the archive fails on (after the retries)
is named in one line with the HTTP status, and the others go on; the command then exits 1 with the count, and the
same command run again completes it (results already stored are not stored again).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import torch

from wsr_med.data.csv_files import write_csv
from wsr_med.data.readers import ScanReadError
from wsr_med.errors import WsrMedError
from wsr_med.pacs.archive import ArchiveError
from wsr_med.pacs.heatmaps import GradCamOverlay
from wsr_med.pacs.results import ClassCodes, ModelIdentity, classification_sr
from wsr_med.pacs.selection import Selection

__all__ = ["PacsSummary", "classify_studies", "SKIPPED_SUFFIX"]

logger = logging.getLogger(__name__)
SKIPPED_SUFFIX = "_skipped.csv"  # beside predictions.csv: every instance not classified, with its reason


@dataclass
class PacsSummary:
    """What a run did: rows of ``predictions.csv``, skipped instances, failed studies, and seconds per stage."""

    rows: list[list[str]] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    n_studies: int = 0
    seconds: Counter = field(default_factory=Counter)

    @property
    def stored(self) -> int:
        return sum(row[-1] == "stored" for row in self.rows)

    @property
    def already(self) -> int:
        return sum(row[-1] == "already stored" for row in self.rows)


class _Clock:
    def __init__(self, seconds: Counter) -> None:
        self.seconds = seconds

    def __call__(self, stage: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[stage] += time.perf_counter() - self.start

        return _Stage()


def _reason(error: Exception) -> str:
    while error.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
        error = error.__cause__
    if isinstance(error, ScanReadError):
        return f"unreadable: {error.summary}"
    return f"unreadable ({type(error).__name__})"  # the type only: messages may quote header values


def classify_studies(run_dir: str | Path, source, destination=None, studies: list[str] = (), query: dict | None = None,
                     select: str | Path | None = None, codes: str | Path | None = None,
                     predictions_file: str | Path | None = None, batch_size: int = 16,
                     device: str | torch.device = "cpu", max_pixels: int | None = None,
                     heatmaps: bool = False) -> PacsSummary:
    """Classify ``studies`` (or those ``query`` finds; a folder source: all) of ``source`` with the run's model and
    store an SR per result in ``destination`` (None: only ``predictions.csv``).

    Args:
        run_dir: the trained run folder.
        source: a :class:`wsr_med.pacs.archive.DicomWebArchive` or :class:`wsr_med.pacs.archive.DicomFolder`.
        destination: where SRs go: the archive itself, another DICOMweb archive, a
            :class:`~wsr_med.pacs.archive.CStoreDestination` or a :class:`~wsr_med.pacs.archive.FolderDestination`.
        studies, query: StudyInstanceUIDs, or QIDO-RS filters; neither: every study of a folder source.
        select: a selection rules file (:mod:`wsr_med.pacs.selection`); None: the training profile's modalities.
        codes: a class codes file (:class:`wsr_med.pacs.results.ClassCodes`).
        predictions_file: default: the run folder's ``predictions.csv``; the skipped instances go beside it.
        batch_size: instances retrieved and classified together (the memory bound).
        heatmaps: also store a Grad-CAM Secondary Capture per classified image (:mod:`wsr_med.pacs.heatmaps`; 2D).
    """
    from wsr_med.settings import default
    from wsr_med.workflows.model import TrainedModel

    for noisy in ("highdicom", "pynetdicom"):  # a line per copied module / association at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model = TrainedModel(run_dir)
    spatial_dims = int(model.settings["spatial_dims"])
    selection = Selection.from_file(select, spatial_dims) if select else \
        Selection.from_profile(model.run.training_profile(), spatial_dims)
    identity = ModelIdentity.of_run(model.run)
    class_codes = ClassCodes(model.classes, codes)
    network = model.network(device)
    if heatmaps and spatial_dims != 2:
        raise WsrMedError("--heatmaps draws on 2D images; this model classifies volumes")
    overlay = GradCamOverlay(network) if heatmaps else None
    transform = model.preprocessing(max_pixels or default("max_pixels"))
    decision = model.decision
    rule, thresholds = decision.rule(model.classes), decision.class_thresholds(model.classes)
    predictions_file = Path(predictions_file or model.run.predictions)
    summary = PacsSummary()
    clock = _Clock(summary.seconds)

    def classify(batch: list[tuple[list[pydicom.Dataset], torch.Tensor]], study: str, held: set[str]) -> None:
        images = torch.stack([image for _, image in batch]).to(device)
        with clock("network"), torch.no_grad():
            logits = network(images)
        calibrated = decision.probabilities(model.probabilities(logits))
        decided = decision.classes(calibrated)
        # the class a heat map explains: the decided one; multi-label, the most probable finding
        explained = calibrated.argmax(1) if model.multilabel else decided
        if overlay is not None:
            with clock("heatmap"):
                cams = overlay.maps(images, list(explained))
        results = []
        with clock("SR"), warnings.catch_warnings():
            # a one-part PatientName ("PID-0002") is copied as the archive holds it
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            for n, ((headers, image), probs, called) in enumerate(zip(batch, calibrated, decided)):
                try:
                    made = [classification_sr(headers, model.classes, probs, called, rule, thresholds,
                                              model.multilabel, identity, class_codes)]
                    if overlay is not None:
                        made.append(overlay.secondary_capture(headers[0], image.cpu().numpy(), cams[n],
                                                              model.classes[int(explained[n])], identity))
                except Exception as e:  # noqa: BLE001 - a source header highdicom refuses: listed, the rest go on
                    for header in headers:
                        skip(header, f"no SR could be made from its header ({type(e).__name__})")
                    continue
                new = [d for d in made if destination is not None and d.SOPInstanceUID not in held]
                results += new
                answer = ("|".join(c for c, v in zip(model.classes, called) if v) or "none") if model.multilabel \
                    else model.classes[int(called)]
                first = headers[0]
                status = "storing" if new else ("already stored" if destination is not None else "not stored")
                summary.rows.append([str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                                     str(first.SOPInstanceUID) if spatial_dims == 2 else f"{len(headers)} instances",
                                     answer, *[f"{p:.9g}" for p in probs], rule, str(made[0].SOPInstanceUID),
                                     str(made[1].SOPInstanceUID) if len(made) > 1 else "", status])
        if results:
            with clock("store"):
                destination.store(results)  # after a failure here the caller marks the study's unstored rows
            for row in summary.rows:
                if row[-1] == "storing":
                    row[-1] = "stored"

    def skip(header: pydicom.Dataset, why: str) -> None:
        summary.skipped.append([str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
                                str(header.get("SOPInstanceUID", "")), str(header.get("Modality", "") or ""), why])

    def image(raw: bytes | str) -> torch.Tensor:
        with clock("decode"):
            out = torch.as_tensor(transform({"image": raw})["image"], dtype=torch.float32)
        if not torch.isfinite(out).all():
            raise ScanReadError("<instance>", "the scan holds non-finite values")
        return out

    for name, why in getattr(source, "unreadable", []):  # a folder's files that are not DICOM
        summary.skipped.append(["", "", "", "", f"{why}: {name}"])
    with clock("query"):
        uids = list(studies) or source.find_studies(query or {})
    summary.n_studies = len(uids)
    if not uids:
        logger.warning("no study matches %s", "the query" if query else "the folder")
    for n_study, study in enumerate(uids, 1):
        first_row = len(summary.rows)
        try:
            with clock("query"):
                held = destination.holds(study) if destination is not None else set()
                series_headers = list(source.study_headers(study))
            for headers in series_headers:
                chosen = []
                for header in headers:
                    why = selection.reason(header)
                    if why:
                        skip(header, why)
                    else:
                        chosen.append(header)
                if spatial_dims == 3:
                    if chosen:
                        _classify_series(chosen, source, image, classify, skip, study, held, clock)
                    continue
                for start in range(0, len(chosen), batch_size):
                    batch = []
                    for header in chosen[start:start + batch_size]:
                        with clock("retrieve"):
                            raw = source.instance_bytes(header)
                        try:
                            batch.append(([header], image(raw)))
                        except Exception as e:  # noqa: BLE001 - one bad instance is listed, the rest go on
                            skip(header, _reason(e))
                    if batch:
                        classify(batch, study, held)
        except ArchiveError as e:
            for row in summary.rows[first_row:]:
                if row[-1] == "storing":
                    row[-1] = "not stored (the study failed)"
            summary.failed.append((study, str(e)))
            if e.unreachable:  # every other study would wait for the same retries: stop here, the rerun goes on
                summary.failed += [(other, "not tried (the archive was unreachable)") for other in uids[n_study:]]
                logger.error("%s (study %d of %d); stopping: the results so far are stored, the same command run "
                             "again completes the rest", e, n_study, len(uids))
                break
            logger.error("%s (study %d of %d; the others go on)", e, n_study, len(uids))
        else:
            logger.info("study %d of %d done", n_study, len(uids))
    _write(predictions_file, model.classes, model.multilabel, summary)
    return summary


def _classify_series(headers, source, image, classify, skip, study, held, clock) -> None:
    """A 3D model: the series' chosen instances written to a temporary folder, read as one volume, classified."""
    with tempfile.TemporaryDirectory(prefix="wsr_med_series_") as folder:
        for n, header in enumerate(headers):
            with clock("retrieve"):
                Path(folder, f"{n:05d}.dcm").write_bytes(source.instance_bytes(header))
        try:
            volume = image(folder)
        except Exception as e:  # noqa: BLE001 - the series is listed, the rest go on
            for header in headers:
                skip(header, _reason(e))
            return
    classify([(headers, volume)], study, held)


def _write(predictions_file: Path, classes: list[str], multilabel: bool, summary: PacsSummary) -> None:
    answer = "findings" if multilabel else "predicted_class"
    write_csv(predictions_file, ["study_uid", "series_uid", "sop_instance_uid", answer, *[f"prob_{c}" for c in classes],
                                 "decision_rule", "sr_uid", "heatmap_uid", "sr"], summary.rows)
    skipped = predictions_file.with_name(predictions_file.stem + SKIPPED_SUFFIX)
    failed = [[study, "", "", "", f"study failed: {why}"] for study, why in summary.failed]
    write_csv(skipped, ["study_uid", "series_uid", "sop_instance_uid", "modality", "reason"], summary.skipped + failed)
    reasons = Counter(row[-1].split(" (")[0] for row in summary.skipped)
    logger.info("%d classified, %d SRs stored, %d already there, %d skipped%s -> %s, %s", len(summary.rows),
                summary.stored, summary.already, len(summary.skipped),
                f" ({'; '.join(f'{n} {r}' for r, n in reasons.most_common(5))})" if reasons else "",
                predictions_file, skipped.name)

