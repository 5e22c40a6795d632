"""Classify the studies of an archive (or a DICOM folder) and store the results as DICOM SRs in those studies.

Three threads, so that waiting for the archive overlaps with computing:

* the retriever walks the studies: their headers (WADO-RS metadata, no pixels), the selection (every instance left
  out is listed with its reason), then the chosen instances' bytes, a batch at a time, decoded with the run's
  preprocessing, into a queue of at most :data:`QUEUED_BATCHES` batches (memory: a few batches of scans; disk:
  nothing but a 3D series while it is read);
* this thread runs the network, applies the run's decision (:class:`wsr_med.workflows.TrainedModel`, as
  ``wsr-med predict`` does) and makes an SR per image (2D) or series (3D);
* the new results are stored ``batch_size`` at a time, one request under way while the network goes on; a result
  the destination already holds is not stored again.

Nothing goes into a patient's record that the model was not made for: instances are chosen by the selection rules
(default: the training profile's modalities; a model trained on files without a modality, PNG or JPEG, needs the
user's ``--select`` before it writes into an archive), wsr_med's own results are never classified
(:func:`wsr_med.pacs.results.own_result`), and an image that looks unlike the training data
(:func:`wsr_med.data.profile.unlike_training`, as ``wsr-med predict`` flags it) is classified and listed but gets no
result unless the user asks for it (``store_unlike_training``; its SR then says why).

One failed instance is listed (``<predictions>_skipped.csv``) and the rest go on; a study the archive refuses (HTTP
4xx/5xx after the retries) or answers past a bound (:class:`wsr_med.pacs.archive.Bounds`) is named in one line and the
others go on; an archive that does not answer at all stops the run in one line. The command then exits 1, and the same
command run again completes the rest.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import torch
from monai.transforms import Compose

from wsr_med.data.csv_files import write_csv
from wsr_med.data.profile import scan_profile, unlike_training
from wsr_med.data.readers import ScanReadError
from wsr_med.errors import WsrMedError
from wsr_med.networks import HeadEvidence, strongest_point, to_source_pixels
from wsr_med.pacs.archive import ArchiveError, Bounds, CStoreDestination, DicomWebArchive
from wsr_med.pacs.heatmaps import evidence_image
from wsr_med.pacs.results import UNLIKE_TRAINING, ClassCodes, ModelIdentity, classification_sr, own_result
from wsr_med.pacs.selection import Selection

__all__ = ["PacsSummary", "classify_studies", "SKIPPED_SUFFIX"]

logger = logging.getLogger(__name__)
SKIPPED_SUFFIX = "_skipped.csv"  # beside predictions.csv: every instance not classified, with its reason
QUEUED_BATCHES = 2  # retrieved batches waiting for the network at most
STORING, STORED, ALREADY = "storing", "stored", "already stored"
NOT_STORED_UNLIKE = f"not stored ({UNLIKE_TRAINING})"


@dataclass
class PacsSummary:
    """What a run did: rows of ``predictions.csv``, skipped instances, failed studies, and seconds per stage (the
    retriever's stages overlap the others)."""

    rows: list[list[str]] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)
    failed: list[tuple[str, str, bool]] = field(default_factory=list)  # (study, why, whether a rerun may complete it)
    n_studies: int = 0
    seconds: Counter = field(default_factory=Counter)
    files: tuple[Path, ...] = ()  # what the run wrote: the predictions and the skipped list

    @property
    def stored(self) -> int:
        return sum(row[-1] == STORED for row in self.rows)

    @property
    def already(self) -> int:
        return sum(row[-1] == ALREADY for row in self.rows)

    @property
    def unlike(self) -> int:
        return sum(bool(row[-2]) for row in self.rows)

    def fail(self, study: str, why: str, transient: bool = True) -> None:
        if study not in {s for s, _, _ in self.failed}:
            self.failed.append((study, why, transient))

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


@dataclass
class _Batch:
    """Retrieved and preprocessed instances of one study: ``items`` are ``(headers, image, unlike_training)``, one
    header for a 2D image, a series' headers for a 3D volume; ``held``: the SOPInstanceUIDs the destination holds for
    the study."""

    study: str
    held: set[str]
    items: list[tuple[list[pydicom.Dataset], torch.Tensor, str]]


class _Stopped(Exception):
    pass


def _reason(error: Exception) -> str:
    while error.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
        error = error.__cause__
    if isinstance(error, ScanReadError):
        return f"unreadable: {error.summary}"
    return f"unreadable ({type(error).__name__})"  # the type only: messages may quote header values


def _skip_row(header: pydicom.Dataset, why: str) -> list[str]:
    return [str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
            str(header.get("SOPInstanceUID", "")), str(header.get("Modality", "") or ""), why]


class _Retriever(threading.Thread):
    """Walks ``studies`` of ``source`` and puts ``("skip", row)``, ``("batch", _Batch)``, ``("done", study, n)``,
    ``("failed", study, n, ArchiveError)`` and finally ``("end",)`` on :attr:`out`."""

    def __init__(self, source, destination, studies: list[str], selection: Selection, model: ModelIdentity,
                 spatial_dims: int, batch_size: int, summary: PacsSummary, decode, bounds: Bounds) -> None:
        super().__init__(daemon=True, name="wsr_med-retriever")
        self.source, self.destination, self.studies, self.decode = source, destination, studies, decode
        self.selection, self.model, self.spatial_dims, self.batch_size = selection, model, spatial_dims, batch_size
        self.summary, self.bounds = summary, bounds
        self.out: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self.stop = threading.Event()

    def put(self, message: tuple) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(message, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped

    def run(self) -> None:
        try:
            for n, study in enumerate(self.studies, 1):
                try:
                    self._study(study)
                except ArchiveError as e:
                    self.put(("failed", study, n, e))
                    if e.unreachable:
                        return
                else:
                    self.put(("done", study, n))
        except _Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it in the main thread
            self.out.put(("error", e))
            return
        finally:
            if not self.stop.is_set():
                self.out.put(("end",))

    def _study(self, study: str) -> None:
        timed = self.summary.timed
        with timed("query"):
            series = list(self.source.study_headers(study))
            if not series:  # a mistyped --study UID: said, not passed over as a study with nothing to classify
                raise ArchiveError(f"study {study}: not found in the archive")
            n_instances = sum(len(headers) for headers in series)
            if len(series) > self.bounds.series or n_instances > self.bounds.instances:
                raise ArchiveError(f"study {study}: {len(series)} series, {n_instances} instances: more than the "
                                   f"{self.bounds.series} series or {self.bounds.instances} instances wsr_med reads")
            # the archive the results go back to lists them among the study's own instances: no extra query
            held = {str(h.SOPInstanceUID) for headers in series for h in headers} if self.destination is self.source \
                else self.destination.holds(study) if self.destination is not None else set()
        for headers in series:
            chosen = []
            for header in headers:
                why = own_result(header, self.model) or self.selection.reason(header)
                if why:
                    self.put(("skip", _skip_row(header, why)))
                else:
                    chosen.append(header)
            if not chosen:
                continue
            if self.spatial_dims == 3:  # a series is one volume: its files in a folder the reader takes
                with tempfile.TemporaryDirectory(prefix="wsr_med_series_") as folder:
                    for k, header in enumerate(chosen):
                        with timed("retrieve"):
                            Path(folder, f"{k:05d}.dcm").write_bytes(self.source.instance_bytes(header))
                    items = self._decoded([(chosen, folder)])
                if items:
                    self.put(("batch", _Batch(study, held, items)))
                continue
            for start in range(0, len(chosen), self.batch_size):
                retrieved = []
                for header in chosen[start:start + self.batch_size]:
                    with timed("retrieve"):
                        retrieved.append(([header], self.source.instance_bytes(header)))
                items = self._decoded(retrieved)
                if items:
                    self.put(("batch", _Batch(study, held, items)))

    def _decoded(self, retrieved: list) -> list[tuple[list[pydicom.Dataset], torch.Tensor, str]]:
        """The retrieved instances (or series folders) through the run's preprocessing; one that fails is listed."""
        items = []
        for headers, raw in retrieved:
            try:
                items.append((headers, *self.decode(raw)))
            except Exception as e:  # noqa: BLE001 - one bad instance (series) is listed, the rest go on
                for header in headers:
                    self.put(("skip", _skip_row(header, _reason(e))))
        return items


def classify_studies(run_dir: str | Path, source, destination=None, studies: list[str] = (), query: dict | None = None,
                     select: str | Path | None = None, codes: str | Path | None = None,
                     predictions_file: str | Path | None = None, batch_size: int = 16,
                     device: str | torch.device = "cpu", max_pixels: int | None = None,
                     heatmaps: bool = False, store_unlike_training: bool = False,
                     bounds: Bounds = Bounds()) -> PacsSummary:
    """Classify ``studies`` (or those ``query`` finds; a folder source: all) of ``source`` with the run's model and
    store an SR per result in ``destination`` (None: only the predictions file).

    Args:
        run_dir: the trained run folder.
        source: a :class:`wsr_med.pacs.archive.DicomWebArchive` or :class:`wsr_med.pacs.archive.DicomFolder`.
        destination: where SRs go: the archive itself, another DICOMweb archive, a
            :class:`~wsr_med.pacs.archive.CStoreDestination` or a :class:`~wsr_med.pacs.archive.FolderDestination`.
        studies, query: StudyInstanceUIDs, or QIDO-RS filters; neither: every study of a folder source.
        select: a selection rules file (:mod:`wsr_med.pacs.selection`); None: the training profile's modalities.
        codes: a class codes file (:class:`wsr_med.pacs.results.ClassCodes`).
        predictions_file: default: the run folder's ``pacs_predictions.csv``; the skipped instances go beside it.
        batch_size: instances retrieved, classified and stored together (the memory bound).
        heatmaps: also store an evidence-map Secondary Capture per classified image (:mod:`wsr_med.pacs.heatmaps`; 2D).
        store_unlike_training: store results for images unlike the training data too (their SRs say so).
        bounds: what the source's answers may cost (a folder's headers and files are read within the same).

    Raises:
        WsrMedError: before anything is written, for a model that knows no modality going into an archive without
            ``select``, or settings that do not fit the model.
    """
    from wsr_med.settings import default
    from wsr_med.workflows.model import TrainedModel

    for noisy in ("highdicom", "pynetdicom"):  # a line per copied module / association at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model = TrainedModel(run_dir)
    spatial_dims = int(model.settings["spatial_dims"])
    if heatmaps and spatial_dims != 2:
        raise WsrMedError("--heatmaps draws on 2D images; this model classifies volumes")
    trained = model.run.training_profile()
    into_archive = isinstance(destination, (DicomWebArchive, CStoreDestination))
    if into_archive and not select and not (trained or {}).get("modalities"):
        raise WsrMedError("this model was trained on files without a DICOM modality (PNG, JPEG...): say which images "
                          "it is made for with --select RULES.json (e.g. {\"Modality\": [\"US\"]}) before its results "
                          "go into an archive")
    max_pixels = int(max_pixels or default("max_pixels"))
    selection = Selection.from_file(select, spatial_dims, max_pixels) if select else \
        Selection.from_profile(trained, spatial_dims, max_pixels)
    identity = ModelIdentity.of_run(model.run)
    class_codes = ClassCodes(model.classes, codes)
    network = model.network(device)
    image_size = int(model.settings["image_size"])
    transform = model.preprocessing(max_pixels)
    reader, rest = transform.transforms[0].loader, Compose(transform.transforms[1:])  # read, then the rest
    percentiles = model.settings["intensity_percentiles"]
    decision = model.decision
    rule, thresholds = decision.rule(model.classes), decision.class_thresholds(model.classes)
    predictions_file = Path(predictions_file or model.run.pacs_predictions)
    summary = PacsSummary()
    waiting: list[tuple[list[str], list[pydicom.Dataset]]] = []  # (row, its new DICOM objects) not yet stored

    def image(raw) -> tuple[torch.Tensor, str]:
        """The preprocessed image and why it looks unlike the training data ("" when it does not), as predict says."""
        with summary.timed("decode"):
            array, meta = reader.read(raw)
            unlike = unlike_training(scan_profile(array, meta, percentiles), trained) if trained else ""
            out = torch.as_tensor(rest({"image": torch.from_numpy(array)})["image"], dtype=torch.float32)
        if not torch.isfinite(out).all():
            raise ScanReadError("<instance>", "the scan holds non-finite values")
        return out, unlike

    def classify(batch: _Batch) -> None:
        decoded = batch.items
        images = torch.stack([image for _, image, _ in decoded]).to(device)
        with summary.timed("network"):
            evidence = HeadEvidence(network, images)
        calibrated = decision.probabilities(model.probabilities(evidence.logits))
        decided = decision.classes(calibrated)
        with summary.timed("evidence"):
            found = _evidence(evidence, calibrated, decided, model.classes, model.multilabel) if spatial_dims == 2 \
                else [{} for _ in decoded]
        with summary.timed("SR"):
            for (headers, pixels, unlike), probs, called, maps in zip(decoded, calibrated, decided, found):
                kept = not unlike or store_unlike_training
                first = headers[0]
                regions = {name: to_source_pixels(strongest_point(m, image_size), (int(first.Rows), int(first.Columns)),
                                                  image_size)[::-1] for name, m in maps.items()}  # (column, row)
                try:
                    made = [classification_sr(headers, model.classes, probs, called, rule, thresholds,
                                              model.multilabel, identity, class_codes, unlike, regions or None)]
                    if heatmaps:
                        name, strongest = next(iter(maps.items()))
                        made.append(evidence_image(first, pixels.cpu().numpy(), strongest, name, identity))
                except Exception as e:  # noqa: BLE001 - a source header highdicom refuses: listed, the rest go on
                    summary.skipped += [_skip_row(h, f"no SR could be made from its header ({type(e).__name__})")
                                        for h in headers]
                    continue
                new = [d for d in made if destination is not None and kept and str(d.SOPInstanceUID) not in batch.held]
                answer = ("|".join(c for c, v in zip(model.classes, called) if v) or "none") if model.multilabel \
                    else model.classes[int(called)]
                status = STORING if new else NOT_STORED_UNLIKE if not kept else \
                    ALREADY if destination is not None else "not stored"
                where = "; ".join(f"{name}: {column:.0f},{row:.0f}" for name, (column, row) in regions.items())
                row = [str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                       str(first.SOPInstanceUID) if spatial_dims == 2 else f"{len(headers)} instances", answer,
                       *[f"{p:.9g}" for p in probs], rule, where, str(made[0].SOPInstanceUID) if kept else "",
                       str(made[1].SOPInstanceUID) if kept and len(made) > 1 else "", unlike, status]
                summary.rows.append(row)
                if not kept:
                    summary.skipped += [_skip_row(h, f"{UNLIKE_TRAINING} ({unlike}): classified, no result stored "
                                                     "(--store-unlike-training stores it)") for h in headers]
                if new:
                    waiting.append((row, new))

    storing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsr_med-store")
    in_flight: list = []  # the one store request under way: (future, its rows)

    def settle() -> None:
        """Wait for the store request under way; mark its rows; an archive that is gone is raised here."""
        if not in_flight:
            return
        future, sent = in_flight.pop()
        try:
            future.result()
        except ArchiveError as e:
            for row in sent:
                row[-1] = "not stored (the archive failed)"
                summary.fail(row[0], str(e), e.transient)
            if e.unreachable:
                raise
            logger.error("%s (the others go on)", e)
        else:
            for row in sent:
                row[-1] = STORED
            logger.info("results stored for %d instances (%d in all so far)", len(sent), summary.stored)

    def store() -> None:
        """Send the waiting results in one request, in the background (the network goes on meanwhile): one request
        under way at a time, so at most two batches of results are held."""
        settle()
        if not waiting:
            return
        objects = [d for _, made in waiting for d in made]

        def send() -> None:
            with summary.timed("store"):
                destination.store(objects)

        in_flight.append((storing.submit(send), [row for row, _ in waiting]))
        waiting.clear()

    for name, why in getattr(source, "unreadable", []):  # a folder's files that are not DICOM
        summary.skipped.append(["", "", "", "", f"{why}: {name}"])
    with summary.timed("query"):
        uids = list(dict.fromkeys(studies)) or source.find_studies(query or {})
    summary.n_studies = len(uids)
    if not uids:
        logger.warning("no study matches %s", "the query" if query else "the folder")
    retriever = _Retriever(source, destination, uids, selection, identity, spatial_dims, batch_size, summary, image,
                           bounds)
    retriever.start()
    finished: set[str] = set()
    try:
        while True:
            message = retriever.out.get()
            kind = message[0]
            if kind == "end":
                store()
                settle()
                break
            if kind == "error":
                raise message[1]
            if kind == "skip":
                summary.skipped.append(message[1])
            elif kind == "batch":
                classify(message[1])
                if len(waiting) >= batch_size:
                    store()
            elif kind == "done":
                finished.add(message[1])
                logger.info("study %d of %d classified", message[2], len(uids))
            elif kind == "failed":
                _, study, n, error = message
                summary.fail(study, str(error), error.transient)
                if error.unreachable:
                    raise error
                logger.error("%s (study %d of %d; the others go on)", error, n, len(uids))
    except ArchiveError as e:  # unreachable: every other request would wait for the same retries
        retriever.stop.set()
        try:
            settle()  # the request under way, if any, ends stored or not: its rows say which
        except ArchiveError:
            pass
        for row in summary.rows:
            if row[-1] == STORING:
                row[-1] = "not stored (the archive failed)"
        unstored = {row[0] for row in summary.rows if row[-1] not in (STORED, ALREADY)}
        for study in uids:
            if study not in finished or study in unstored:
                summary.fail(study, "not done (the archive was unreachable)")
        logger.error("%s; stopping: the results so far are stored, the same command run again completes the rest", e)
    finally:
        retriever.stop.set()
        storing.shutdown(wait=True)  # a request under way ends (whole or refused) before the files are written
        summary.files = _write(predictions_file, model.classes, model.multilabel, summary)
    return summary


def _evidence(evidence: HeadEvidence, calibrated, decided, classes: list[str], multilabel: bool) -> list[dict]:
    """Per image, class name -> its contribution map: the decided class; multi-label, each present finding (the
    likeliest one when none is), the likeliest first (it is the one a heat map shows)."""
    n = len(calibrated)
    if not multilabel:
        maps = evidence.maps([int(k) for k in decided], against_mean=True)  # a softmax decides on differences
        return [{classes[int(k)]: maps[i]} for i, k in enumerate(decided)]
    wanted = [sorted((k for k in range(len(classes)) if decided[i][k]), key=lambda k: -calibrated[i][k])
              or [int(calibrated[i].argmax())] for i in range(n)]
    by_finding = {k: evidence.maps([k] * n) for k in sorted({k for ks in wanted for k in ks})}
    return [{classes[k]: by_finding[k][i] for k in ks} for i, ks in enumerate(wanted)]


def _write(predictions_file: Path, classes: list[str], multilabel: bool, summary: PacsSummary) -> tuple[Path, Path]:
    """The predictions file and the skipped list beside it; returns both."""
    answer = "findings" if multilabel else "predicted_class"
    write_csv(predictions_file, ["study_uid", "series_uid", "sop_instance_uid", answer, *[f"prob_{c}" for c in classes],
                                 "decision_rule", "evidence_region", "sr_uid", "heatmap_uid", "unlike_training", "sr"],
              summary.rows)
    skipped = predictions_file.with_name(predictions_file.stem + SKIPPED_SUFFIX)
    failed = [[study, "", "", "", f"study failed: {why}"] for study, why, _ in summary.failed]
    write_csv(skipped, ["study_uid", "series_uid", "sop_instance_uid", "modality", "reason"], summary.skipped + failed)
    reasons = Counter(row[-1].split(" (")[0] for row in summary.skipped)
    logger.info("%d classified (%d unlike the training data), results stored for %d, already there for %d, %d skipped%s",
                len(summary.rows), summary.unlike, summary.stored, summary.already, len(summary.skipped),
                f" ({'; '.join(f'{n} {r}' for r, n in reasons.most_common(5))})" if reasons else "")
    return predictions_file, skipped
