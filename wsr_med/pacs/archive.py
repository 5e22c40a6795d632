"""Talking to a DICOM archive: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) through ``dicomweb-client``, C-STORE through
``pynetdicom``, and a folder; each with bounded retries and errors in one line.

Credentials never come from the command line (a shell history and ``ps`` would show them): the environment
variable :data:`AUTH_ENV` holds ``user:password`` (HTTP basic) or ``Bearer <token>``, or :data:`AUTH_FILE_ENV` /
``--auth-file`` names a file holding the same text. They go into the HTTP session only; no log line, error or
MLflow value holds them (errors name the study UID and the HTTP status, never a URL with its query or a header).
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pydicom
import requests

from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write

__all__ = ["AUTH_ENV", "AUTH_FILE_ENV", "ArchiveError", "DicomWebArchive", "DicomFolder", "FolderDestination",
           "CStoreDestination", "Retry", "http_session", "to_bytes"]

logger = logging.getLogger(__name__)

AUTH_ENV = "WSR_MED_DICOMWEB_AUTH"  # "user:password" or "Bearer <token>"
AUTH_FILE_ENV = "WSR_MED_DICOMWEB_AUTH_FILE"  # a file holding the same
PAGE = 1000  # QIDO-RS results asked at a time
MAX_RESULTS = 1_000_000  # studies, series or instances one search returns at most (memory bound)
T = TypeVar("T")


class ArchiveError(WsrMedError):
    """An archive that could not be reached or refused a request, after the retries: one line, no traceback.
    ``unreachable``: no answer at all (connection refused, timeout), so the next study would fail the same way."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class Retry:
    """Bounded retries: ``attempts`` tries at most, waiting ``backoff_s`` * 2^k between them, each request given up
    after ``timeout_s``. Connection errors, timeouts, 429 and 5xx are retried; other 4xx are not (they would not
    change)."""

    attempts: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 60.0

    def run(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted into retried, final and foreign below
                reason, retry = _failure(e)
                if reason is None:
                    raise
                if not retry or attempt == self.attempts - 1:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    unreachable = not isinstance(e, requests.HTTPError)
                    raise ArchiveError(f"{what}: {reason}{tries}", unreachable) from None
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _failure(error: Exception) -> tuple[str | None, bool]:
    """(what went wrong in a few words, whether to try again) for a network error; (None, False) for any other."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        return f"HTTP {status} {error.response.reason or ''}".strip(), status == 429 or status >= 500
    if isinstance(error, requests.Timeout):
        return "no answer in time (timeout)", True
    if isinstance(error, requests.ConnectionError):
        return "archive unreachable (connection failed)", True
    if isinstance(error, (ConnectionError, TimeoutError)):
        return f"archive unreachable ({type(error).__name__})", True
    return None, False


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """Every request of the session gets a timeout (dicomweb-client sets none)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def send(self, request, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or self.timeout_s
        return super().send(request, **kwargs)


def _credentials(auth_file: str | Path | None) -> str | None:
    path = auth_file or os.environ.get(AUTH_FILE_ENV)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or None
        except OSError as e:
            raise WsrMedError(f"{path}: the credentials file cannot be read ({e.strerror})") from None
    return os.environ.get(AUTH_ENV) or None


def http_session(auth_file: str | Path | None = None, timeout_s: float = Retry.timeout_s) -> requests.Session:
    """A ``requests`` session with the archive's credentials (see the module docstring) and a timeout per request."""
    session = requests.Session()
    # pixel data hardly compresses and gzip costs the archive a core per transfer: bytes as stored
    session.headers["Accept-Encoding"] = "identity"
    session.mount("http://", _TimeoutAdapter(timeout_s))
    session.mount("https://", _TimeoutAdapter(timeout_s))
    secret = _credentials(auth_file)
    if secret:
        if secret.lower().startswith("bearer "):
            session.headers["Authorization"] = secret  # the header only; requests never logs it
        elif ":" in secret:
            user, password = secret.split(":", 1)
            session.auth = (user, password)
        else:
            raise WsrMedError(f"the archive credentials ({AUTH_ENV} or the credentials file) must read "
                              "'user:password' or 'Bearer <token>'")
    return session


def header_of(json_dataset: dict) -> pydicom.Dataset:
    """A DICOM JSON header (QIDO-RS, WADO-RS metadata) as a data set: bulk data (pixels) left out, values kept as the
    archive holds them (no warning for a value that breaks its VR: the SR copies only identifiers)."""
    import pydicom.config

    kept = {tag: value for tag, value in json_dataset.items()
            if "BulkDataURI" not in value and "InlineBinary" not in value}
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        return pydicom.Dataset.from_json(kept)
    finally:
        pydicom.config.settings.reading_validation_mode = mode


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    """A retrieved data set as the bytes of a DICOM file (what the readers take), its transfer syntax kept."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class DicomWebArchive:
    """A DICOMweb service (QIDO-RS / WADO-RS / STOW-RS) at ``url`` (e.g. ``http://pacs:8042/dicom-web``)."""

    def __init__(self, url: str, auth_file: str | Path | None = None, retry: Retry = Retry()) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.retry = retry
        self.client = DICOMwebClient(url, session=http_session(auth_file, retry.timeout_s))
        self.client.set_http_retry_params(retry=False)  # one retry policy, ours (its own waits up to 5 x 10 s per call)
        # dicomweb-client logs each request's URL at INFO/DEBUG; a URL may carry query values
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

    def find_studies(self, query: dict[str, str]) -> list[str]:
        """The StudyInstanceUIDs matching QIDO-RS filters (``{"Modality": "CR", "StudyDate": "20260101-20261231"}``);
        ``Modality`` is asked as the study attribute ``ModalitiesInStudy`` (a study holds several)."""
        filters = {("ModalitiesInStudy" if key == "Modality" else key): value for key, value in query.items()}
        return self._search("study search", "StudyInstanceUID",
                            lambda **page: self.client.search_for_studies(search_filters=filters, **page))

    def _search(self, what: str, key: str, search) -> list[str]:
        """The ``key`` UIDs a QIDO-RS ``search`` finds, a page at a time. Some archives ignore ``offset`` for some
        filters and answer the first page again: paging stops at a page that is short or brings nothing new (a
        client that pages until an empty answer loops forever there), and at :data:`MAX_RESULTS`."""
        found: dict[str, None] = {}
        while len(found) < MAX_RESULTS:
            page = self.retry.run(what, lambda: search(limit=PAGE, offset=len(found)))
            new = [uid for uid in (str(header_of(item).get(key, "")) for item in page) if uid and uid not in found]
            found.update(dict.fromkeys(new))
            if len(page) < PAGE or not new:
                break
        return list(found)

    def study_headers(self, study: str) -> Iterator[list[pydicom.Dataset]]:
        """The headers of every instance of ``study``, a series at a time (WADO-RS metadata: no pixel data)."""
        series = self._search(f"study {study}", "SeriesInstanceUID",
                              lambda **page: self.client.search_for_series(study, **page))
        for uid in series:
            metadata = self.retry.run(f"study {study}", lambda: self.client.retrieve_series_metadata(study, uid))
            yield [header_of(m) for m in metadata]

    def instance_bytes(self, header: pydicom.Dataset) -> bytes:
        """The instance of ``header`` as a DICOM file's bytes, in its stored transfer syntax (no transcoding)."""
        study, series, sop = header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID
        dataset = self.retry.run(f"study {study}", lambda: self.client.retrieve_instance(
            study, series, sop, media_types=(("application/dicom", "*"),)))
        return to_bytes(dataset)

    # --- as a destination --------------------------------------------------------------------------------
    def holds(self, study: str) -> set[str]:
        """The SOPInstanceUIDs ``study`` holds (to leave out results already stored)."""
        return set(self._search(f"study {study}", "SOPInstanceUID", lambda **page: self.client.search_for_instances(
            study, fields=["SOPInstanceUID"], **page)))

    def store(self, datasets: list[pydicom.Dataset]) -> None:
        """STOW-RS; a refused instance is an error (the archive stores each instance whole or not at all)."""
        studies = sorted({str(ds.StudyInstanceUID) for ds in datasets})
        one = studies[0] if len(studies) == 1 else None  # several: POST /studies, each instance filed by its own UID
        what = f"study {one}" if one else f"storing results of {len(studies)} studies"
        answer = self.retry.run(what, lambda: self.client.store_instances(datasets, one))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise ArchiveError(f"{what}: the archive refused {len(failed)} of {len(datasets)} results")


class DicomFolder:
    """A local folder of DICOM files as a source: headers grouped by study and series, bytes from the files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise WsrMedError(f"{root}: not a folder")
        self.files: dict[str, dict[str, list[pydicom.Dataset]]] = {}
        self.unreadable: list[tuple[str, str]] = []  # (file relative to the root, why)
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
                header.SOPInstanceUID  # noqa: B018 - a file without it cannot be referenced
            except Exception as e:  # noqa: BLE001 - any unreadable file is listed, the rest go on
                self.unreadable.append((str(path.relative_to(self.root)),
                                        f"not a readable DICOM file ({type(e).__name__})"))
                continue
            header.filename = str(path)
            self.files.setdefault(study, {}).setdefault(series, []).append(header)

    def find_studies(self, query: dict[str, str]) -> list[str]:
        return sorted(self.files)

    def study_headers(self, study: str) -> Iterator[list[pydicom.Dataset]]:
        yield from self.files.get(study, {}).values()

    def instance_bytes(self, header: pydicom.Dataset) -> bytes:
        return Path(header.filename).read_bytes()


class FolderDestination:
    """Results written as ``DIR/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (whole files, never half-written)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise WsrMedError(f"{root}: not a folder")

    def holds(self, study: str) -> set[str]:
        return {p.stem for p in (self.root / study).glob("*.dcm")}

    def store(self, datasets: list[pydicom.Dataset]) -> None:
        for ds in datasets:  # the folders are made by the first result: a refused command leaves nothing
            folder = self.root / str(ds.StudyInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{ds.SOPInstanceUID}.dcm", to_bytes(ds))


class CStoreDestination:
    """A DICOM application entity reached with C-STORE (``AE@host:port``), through pynetdicom."""

    def __init__(self, address: str, calling_ae: str = "WSR_MED", retry: Retry = Retry()) -> None:
        try:
            ae_title, hostport = address.split("@", 1)
            host, port = hostport.rsplit(":", 1)
            self.ae_title, self.host, self.port = ae_title, host, int(port)
        except ValueError:
            raise WsrMedError(f"--c-store {address!r}: expected AE_TITLE@host:port") from None
        self.calling_ae = calling_ae
        self.retry = retry

    def holds(self, study: str) -> set[str]:
        return set()  # C-STORE of an instance the archive holds replaces it or is ignored: nothing is added

    def store(self, datasets: list[pydicom.Dataset]) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        study = datasets[0].StudyInstanceUID

        def send() -> None:
            ae = AE(ae_title=self.calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.retry.timeout_s
            for context in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
                ae.add_requested_context(context)
            assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
            if not assoc.is_established:
                raise ConnectionError("association refused or not established")
            try:
                for ds in datasets:
                    status = assoc.send_c_store(ds)
                    code = getattr(status, "Status", None)
                    if code is None:
                        raise ConnectionError("no C-STORE answer")
                    if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                        raise ArchiveError(f"study {study}: C-STORE refused (status 0x{code:04X})")
            finally:
                assoc.release()

        self.retry.run(f"study {study}", send)
