"""Talking to a DICOM archive: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over ``requests``, C-STORE through ``pynetdicom``,
and a folder; each with bounded retries and errors in one line.

An archive may be faulty or hostile, so every answer is bounded before it is believed (:class:`Bounds`): in bytes
(an instance: what its header declares plus :data:`~wsr_med.data.readers.HEADER_BYTES`, stored as it is, never
inflated here: a Deflated instance is inflated by wsr_med's bounded reader only; a DICOM JSON answer:
:attr:`Bounds.json_bytes`), in time (each request's whole answer within :attr:`Bounds.deadline_s`, not per read), in
count (series and instances per study, studies per query), in media type (JSON must be JSON, an instance a
``multipart/related`` DICOM part) and in encoding (no compressed answer is taken: wsr_med asks for none). An answer
past a bound fails its study in one line (:class:`ArchiveError`), the other studies go on.

Credentials never come from the command line nor the URL (a shell history and ``ps`` would show them): the environment
variable :data:`AUTH_ENV` holds ``user:password`` (HTTP basic) or ``Bearer <token>``, or :data:`AUTH_FILE_ENV` /
``--auth-file`` names a file holding the same text. They go into the HTTP session only (``requests`` drops them on a
redirect to another host); no log line, error or MLflow value holds them (errors name the study UID and the HTTP
status, never a URL with its query or a header).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import pydicom
import requests

from wsr_med.data.readers import HEADER_BYTES, ScanReadError, read_header
from wsr_med.errors import WsrMedError
from wsr_med.files import atomic_write

__all__ = ["AUTH_ENV", "AUTH_FILE_ENV", "ArchiveError", "Bounds", "DicomWebArchive", "DicomFolder", "FolderDestination",
           "CStoreDestination", "Retry", "http_session", "instance_limit", "to_bytes"]

logger = logging.getLogger(__name__)

AUTH_ENV = "WSR_MED_DICOMWEB_AUTH"  # "user:password" or "Bearer <token>"
AUTH_FILE_ENV = "WSR_MED_DICOMWEB_AUTH_FILE"  # a file holding the same
PAGE = 1000  # QIDO-RS results asked at a time
_CREDENTIALS_HINT = f"credentials go in {AUTH_ENV} ('user:password' or 'Bearer <token>') or a file named by --auth-file"
T = TypeVar("T")


@dataclass(frozen=True)
class Bounds:
    """What one archive answer may cost at most (see the module docstring).

    Attributes:
        deadline_s: seconds for a request's whole answer (``--archive-timeout``).
        json_bytes: bytes of one DICOM JSON answer (a page of search results, a series' metadata).
        studies: studies one query finds; series, instances: per study.
    """

    deadline_s: float = 300.0
    json_bytes: int = 32 * 2**20
    studies: int = 100_000
    series: int = 1_000
    instances: int = 50_000


class ArchiveError(WsrMedError):
    """An archive that could not be reached, refused a request or answered past a bound, after the retries: one line,
    no traceback. ``unreachable``: no answer at all (connection refused, timeout), so the next study would fail the same
    way; ``transient``: the same request may succeed later (the same command run again completes it)."""

    def __init__(self, message: str, unreachable: bool = False, transient: bool | None = None) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.transient = unreachable if transient is None else transient


class BadAnswer(Exception):
    """An answer that is not what DICOMweb promises, or past a :class:`Bounds` bound: never retried (it would not
    change)."""


@dataclass(frozen=True)
class Retry:
    """Bounded retries: ``attempts`` tries at most, waiting ``backoff_s`` * 2^k between them, each socket read given up
    after ``timeout_s`` (the whole answer: :attr:`Bounds.deadline_s`). Connection errors, read timeouts, 429 and 5xx
    are retried; other 4xx and bad answers are not (they would not change)."""

    attempts: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 60.0

    def run(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted into retried, final and foreign below
                failure = _failure(e)
                if failure is None:
                    raise
                reason, retry, unreachable = failure
                if not retry or attempt == self.attempts - 1:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise ArchiveError(f"{what}: {reason}{tries}", unreachable, transient=retry) from None
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _failure(error: Exception) -> tuple[str, bool, bool] | None:
    """(what went wrong in a few words, whether to try again, whether the archive is unreachable) for a network error
    or a bad answer; None for any other error."""
    if isinstance(error, BadAnswer):
        return str(error), False, False
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        reason = f"HTTP {status} {error.response.reason or ''}".strip()
        if status in (401, 403):
            reason += f": the archive refused the credentials ({_CREDENTIALS_HINT})"
        return reason, status == 429 or status >= 500, False
    if isinstance(error, requests.Timeout):
        return "no answer in time (timeout)", True, True
    if isinstance(error, requests.TooManyRedirects):
        return "the archive redirects without end", False, False
    if isinstance(error, requests.ConnectionError):
        return "archive unreachable (connection failed)", True, True
    if isinstance(error, (ConnectionError, TimeoutError)):
        return f"archive unreachable ({type(error).__name__})", True, True
    if isinstance(error, requests.RequestException):  # a damaged answer: chunked encoding, invalid headers...
        return f"the answer could not be read ({type(error).__name__})", False, False
    return None


def _credentials(auth_file: str | Path | None) -> str | None:
    path = auth_file or os.environ.get(AUTH_FILE_ENV)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or None
        except OSError as e:
            raise WsrMedError(f"{path}: the credentials file cannot be read ({e.strerror})") from None
    return os.environ.get(AUTH_ENV) or None


def http_session(auth_file: str | Path | None = None) -> requests.Session:
    """A ``requests`` session with the archive's credentials (see the module docstring)."""
    session = requests.Session()
    # pixel data hardly compresses and gzip costs the archive a core per transfer; an answer compressed anyway is
    # refused (a 1 MB gzip bomb inflates to GiBs)
    session.headers["Accept-Encoding"] = "identity"
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


def checked_url(url: str, option: str) -> str:
    """``url`` without a trailing ``/``; refused when it is not http(s) or carries credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WsrMedError(f"{option}: expected an http:// or https:// address of a DICOMweb service")
    if parts.username is not None or parts.password is not None:
        raise WsrMedError(f"{option}: credentials do not go in the address (the shell history and ps show it); "
                          f"{_CREDENTIALS_HINT}")
    return url.rstrip("/")


def header_of(json_dataset) -> pydicom.Dataset:
    """A DICOM JSON header (QIDO-RS, WADO-RS metadata) as a data set: bulk data (pixels) left out, values kept as the
    archive holds them (no warning for a value that breaks its VR: the SR copies only identifiers)."""
    import pydicom.config

    if not isinstance(json_dataset, dict):
        raise BadAnswer("the answer is not DICOM JSON (an item is not an object)")
    kept = {tag: value for tag, value in json_dataset.items()
            if not isinstance(value, dict) or ("BulkDataURI" not in value and "InlineBinary" not in value)}
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        return pydicom.Dataset.from_json(kept)
    except Exception as e:  # noqa: BLE001 - any malformed item: the answer is not DICOM JSON
        raise BadAnswer(f"the answer is not DICOM JSON ({type(e).__name__})") from None
    finally:
        pydicom.config.settings.reading_validation_mode = mode


def instance_limit(header: pydicom.Dataset) -> int:
    """The most bytes the instance of ``header`` may take: the pixels its header declares (uncompressed, every frame
    and sample) plus :data:`HEADER_BYTES`. The caller has checked the declared size against ``max_pixels``."""

    def number(keyword: str, fallback: int) -> int:
        try:
            return max(1, int(header.get(keyword) or fallback))
        except (TypeError, ValueError):
            return fallback

    pixels = number("Rows", 1) * number("Columns", 1) * number("NumberOfFrames", 1)
    per_pixel = min(number("SamplesPerPixel", 1), 4) * min(math.ceil(number("BitsAllocated", 16) / 8), 8)
    return pixels * per_pixel + HEADER_BYTES


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    """A data set as the bytes of a DICOM file (what the readers take), its transfer syntax kept."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _media(content_type: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=x`` -> (``multipart/related``, {type:..., boundary:...})."""
    kind, *params = content_type.split(";")
    found = {}
    for param in params:
        key, _, value = param.strip().partition("=")
        found[key.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), found


_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _path(*segments: str) -> str:
    """A DICOMweb path from its words and UIDs (``"studies", uid, "series"``); a UID that is none (an archive may
    answer ``../../admin``) is refused, so that no answer can steer a request elsewhere."""
    for segment in segments:
        if not (segment.isalpha() or (len(segment) <= 64 and _UID.fullmatch(segment))):
            raise BadAnswer(f"{segment[:80]!r} is not a DICOM UID")
    return "/" + "/".join(segments)


def _dicom_json(content_type: str, body: bytearray) -> list[pydicom.Dataset]:
    """The data sets of a QIDO-RS / WADO-RS metadata answer (empty for no content)."""
    if not body.strip():
        return []  # 204 No Content: nothing matches
    kind = _media(content_type)[0]
    if kind not in ("application/dicom+json", "application/json"):
        raise BadAnswer(f"the archive answered {kind or 'no media type'}, not DICOM JSON (is this a DICOMweb address?)")
    try:
        found = json.loads(body)
    except ValueError:
        raise BadAnswer("the answer is not valid JSON") from None
    if not isinstance(found, list):
        raise BadAnswer("the answer is not DICOM JSON (a list of data sets)")
    return [header_of(item) for item in found]


def _stow_failures(content_type: str, body: bytearray) -> list:
    """The instances a STOW-RS answer says were refused (FailedSOPSequence)."""
    try:
        reply = json.loads(body) if body.strip() else {}
    except ValueError:
        raise BadAnswer("the archive's answer to storing is not DICOM JSON") from None
    failed = reply.get("00081198") if isinstance(reply, dict) else None
    return (failed.get("Value") or []) if isinstance(failed, dict) else []


def _single_dicom_part(content_type: str, body: bytearray) -> bytes:
    """The DICOM file in a WADO-RS ``multipart/related`` answer (its first part), cut out of ``body`` in place."""
    kind, params = _media(content_type)
    if kind != "multipart/related" or not params.get("boundary"):
        raise BadAnswer(f"the instance came as {kind or 'no media type'}, not multipart/related DICOM")
    delimiter = b"--" + params["boundary"].encode("latin-1")
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    if head_end < 0:
        raise BadAnswer("the multipart answer holds no part")
    part_type = ""
    for line in bytes(body[start + len(delimiter):head_end]).decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-type":
            part_type = _media(value)[0]
    if part_type not in ("", "application/dicom"):
        raise BadAnswer(f"the instance came as {part_type}, not application/dicom")
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if end < 0:
        raise BadAnswer("the multipart answer is cut short (no closing boundary)")
    del body[end:]  # in place: the instance is never held twice
    del body[:head_end + 4]
    return bytes(body)


class DicomWebArchive:
    """A DICOMweb service (QIDO-RS / WADO-RS / STOW-RS) at ``url`` (e.g. ``http://pacs:8042/dicom-web``), every
    answer within ``bounds`` (see the module docstring)."""

    def __init__(self, url: str, auth_file: str | Path | None = None, retry: Retry = Retry(),
                 bounds: Bounds = Bounds(), option: str = "--dicomweb") -> None:
        self.url = checked_url(url, option)
        self.retry, self.bounds = retry, bounds
        self.session = http_session(auth_file)

    def _request(self, what: str, method: str, segments: tuple[str, ...], accept: str, limit: int,
                 parse: Callable[[str, bytearray], T], params: dict | None = None, body: bytes | None = None,
                 content_type: str | None = None) -> T:
        """``parse(media type, body)`` of one request to the path of ``segments`` (:func:`_path`), retried as
        :class:`Retry` says; the body read a piece at a time, refused past ``limit`` bytes or
        :attr:`Bounds.deadline_s` seconds. Every :class:`BadAnswer` becomes an :class:`ArchiveError` naming ``what``."""
        deadline_s = self.bounds.deadline_s

        def call() -> T:
            path = _path(*segments)
            deadline = time.monotonic() + deadline_s
            headers = {"Accept": accept, **({"Content-Type": content_type} if content_type else {})}
            timeout = (min(10.0, deadline_s), min(self.retry.timeout_s, deadline_s))
            with self.session.request(method, f"{self.url}{path}", params=params, data=body, headers=headers,
                                      stream=True, timeout=timeout) as answer:
                answer.raise_for_status()
                encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise BadAnswer(f"the archive sent a {encoding}-compressed answer, which wsr_med did not ask for")
                declared = answer.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise BadAnswer(f"the answer declares {_mib(int(declared))}, more than the {_mib(limit)} allowed")
                got = bytearray()
                while True:
                    if time.monotonic() > deadline:
                        raise BadAnswer(f"no complete answer within {deadline_s:g} s (--archive-timeout)")
                    piece = answer.raw.read1(1 << 20, decode_content=False)  # returns what has come, never waits for all
                    if not piece:
                        break
                    got += piece
                    if len(got) > limit:
                        raise BadAnswer(f"the answer passed the {_mib(limit)} allowed")
                return parse(answer.headers.get("Content-Type", ""), got)

        return self.retry.run(what, call)

    def _headers(self, what: str, segments: tuple[str, ...], params: dict | None = None) -> list[pydicom.Dataset]:
        return self._request(what, "GET", segments, "application/dicom+json", self.bounds.json_bytes, _dicom_json,
                             params)

    def find_studies(self, query: dict[str, str]) -> list[str]:
        """The StudyInstanceUIDs matching QIDO-RS filters (``{"Modality": "CR", "StudyDate": "20260101-20261231"}``);
        ``Modality`` is asked as the study attribute ``ModalitiesInStudy`` (a study holds several)."""
        filters = {("ModalitiesInStudy" if key == "Modality" else key): value for key, value in query.items()}
        return self._search("study search", "StudyInstanceUID", ("studies",), filters, self.bounds.studies, "studies")

    def _search(self, what: str, key: str, segments: tuple[str, ...], filters: dict, cap: int,
                counted: str) -> list[str]:
        """The ``key`` UIDs a QIDO-RS search at ``segments`` finds, a page at a time. Some archives ignore ``offset`` for
        some filters and answer the first page again: paging stops at a page that is short or brings nothing new (a
        client that pages until an empty answer loops forever there). More than ``cap``: refused, naming it."""
        found: dict[str, None] = {}
        while True:
            page = self._headers(what, segments, {**filters, "limit": PAGE, "offset": len(found)})
            new = [uid for uid in (str(h.get(key, "")) for h in page) if uid and uid not in found]
            found.update(dict.fromkeys(new))
            if len(found) > cap:
                raise ArchiveError(f"{what}: more than {cap} {counted} (the limit wsr_med reads)")
            if len(page) < PAGE or not new:
                return list(found)

    def study_headers(self, study: str) -> Iterator[list[pydicom.Dataset]]:
        """The headers of every instance of ``study``, a series at a time (WADO-RS metadata: no pixel data)."""
        series = self._search(f"study {study}", "SeriesInstanceUID", ("studies", study, "series"), {},
                              self.bounds.series, "series in the study")
        for uid in series:
            yield self._headers(f"study {study}", ("studies", study, "series", uid, "metadata"))

    def instance_bytes(self, header: pydicom.Dataset) -> bytes:
        """The instance of ``header`` as a DICOM file's bytes, in its stored transfer syntax (no transcoding, no
        inflating), at most :func:`instance_limit` bytes."""
        study, series, sop = (str(header.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                 "SOPInstanceUID"))
        return self._request(f"study {study}", "GET", ("studies", study, "series", series, "instances", sop),
                             'multipart/related; type="application/dicom"; transfer-syntax=*', instance_limit(header),
                             _single_dicom_part)

    # --- as a destination --------------------------------------------------------------------------------
    def holds(self, study: str) -> set[str]:
        """The SOPInstanceUIDs ``study`` holds (to leave out results already stored)."""
        return set(self._search(f"study {study}", "SOPInstanceUID", ("studies", study, "instances"),
                                {"includefield": "SOPInstanceUID"}, self.bounds.instances, "instances in the study"))

    def store(self, datasets: list[pydicom.Dataset]) -> None:
        """STOW-RS; a refused instance is an error (the archive stores each instance whole or not at all)."""
        studies = sorted({str(ds.StudyInstanceUID) for ds in datasets})
        one = studies[0] if len(studies) == 1 else None  # several: POST /studies, each instance filed by its own UID
        what = f"study {one}" if one else f"storing results of {len(studies)} studies"
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), to_bytes(ds))
                        for ds in datasets) + b"--%s--\r\n" % boundary.encode()
        failed = self._request(what, "POST", ("studies", one) if one else ("studies",), "application/dicom+json",
                               self.bounds.json_bytes, _stow_failures, body=body,
                               content_type=f'multipart/related; type="application/dicom"; boundary={boundary}')
        if failed:
            raise ArchiveError(f"{what}: the archive refused {len(failed)} of {len(datasets)} results")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


class DicomFolder:
    """A local folder of DICOM files as a source: headers grouped by study and series (read within bounds:
    :func:`wsr_med.data.readers.read_header`), bytes from the files (at most :func:`instance_limit`)."""

    def __init__(self, root: str | Path, bounds: Bounds = Bounds()) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise WsrMedError(f"{root}: not a folder")
        self.bounds = bounds
        self.files: dict[str, dict[str, list[pydicom.Dataset]]] = {}
        self.unreadable: list[tuple[str, str]] = []  # (file relative to the root, why)
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            try:
                header = read_header(path)
                study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
                header.SOPInstanceUID  # noqa: B018 - a file without it cannot be referenced
            except (ScanReadError, AttributeError) as e:  # any unreadable file is listed, the rest go on
                why = e.summary if isinstance(e, ScanReadError) else f"not a readable DICOM file (no {e.name})"
                self.unreadable.append((str(path.relative_to(self.root)), why))
                continue
            header.filename = str(path)
            self.files.setdefault(study, {}).setdefault(series, []).append(header)

    def find_studies(self, query: dict[str, str]) -> list[str]:
        return sorted(self.files)

    def study_headers(self, study: str) -> Iterator[list[pydicom.Dataset]]:
        yield from self.files.get(study, {}).values()

    def instance_bytes(self, header: pydicom.Dataset) -> bytes:
        path = Path(header.filename)
        size, limit = path.stat().st_size, instance_limit(header)
        if size > limit:
            raise ArchiveError(f"study {header.StudyInstanceUID}: {path.name} holds {_mib(size)}, more than the "
                               f"{_mib(limit)} its header allows")
        return path.read_bytes()


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
