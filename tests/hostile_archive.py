"""A small HTTP server posing as a DICOMweb archive that misbehaves, one way per study (the study UID says which), so
that one ``wsr-med predict --dicomweb`` run meets every misbehaviour at once and must still finish the good study.

Modes (``HostileArchive.study(mode)`` gives the study UID of each):

* ``good``: a valid study of one instance (the DICOM file given).
* ``bomb``: a valid header, the instance a 1 MB Deflated DICOM inflating to GiBs.
* ``big_json``: the series search answers JSON without end (no Content-Length).
* ``big_multipart``: the instance answer declares 10 GiB.
* ``trickle``: the instance answer comes one byte every half second.
* ``endless``: every page of the series search brings 1,000 new series.
* ``html``: the series search answers an HTML page.
* ``wrong_media``: the instance comes as ``application/octet-stream``.
* ``cut_multipart``: the instance's multipart answer has no closing boundary.
* ``steering``: the series search answers a series "UID" that is a path (``../../system``).
* ``redirect``: every request is redirected to the same server under another host name (``localhost``); the server
  records which requests carried an ``Authorization`` header.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom

MODES = ("good", "bomb", "big_json", "big_multipart", "trickle", "endless", "html", "wrong_media", "cut_multipart",
         "steering", "redirect")
ROOT = "1.2.826.0.1.3680043.10.543"
BOUNDARY = "hostile-boundary"


def _metadata(ds: pydicom.Dataset) -> dict:
    """The DICOM JSON of ``ds``'s header (what WADO-RS metadata answers), pixel data left out."""
    header = pydicom.Dataset()
    for element in ds:
        if element.tag != 0x7FE00010 and element.tag.group != 0x0009:
            header.add(element)
    return header.to_json_dict()


class HostileArchive:
    """``with HostileArchive(good_file, bomb_file) as archive:`` a hostile DICOMweb service on ``archive.url``."""

    def __init__(self, good: Path, bomb: Path) -> None:
        self.files = {"good": Path(good).read_bytes(), "bomb": Path(bomb).read_bytes()}
        self.headers = {mode: pydicom.dcmread(Path(good), stop_before_pixels=True) for mode in MODES}
        self.authorized: list[tuple[str, bool]] = []  # (host the request was sent to, whether it carried credentials)
        self.paths: list[str] = []  # every path asked for
        for mode, header in self.headers.items():
            header.StudyInstanceUID, header.SeriesInstanceUID = self.study(mode), f"{self.study(mode)}.1"
            header.SOPInstanceUID = f"{self.study(mode)}.1.1"
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                archive.authorized.append((self.headers.get("Host", "").split(":")[0],
                                           "Authorization" in self.headers))
                archive.paths.append(self.path)
                try:
                    archive.answer(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"

    @staticmethod
    def study(mode: str) -> str:
        return f"{ROOT}.{MODES.index(mode) + 1}"

    def __enter__(self) -> "HostileArchive":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- answers ---------------------------------------------------------------------------------------------
    def answer(self, request: BaseHTTPRequestHandler) -> None:
        parts = request.path.split("?")[0].strip("/").split("/")  # dicom-web/studies/S/series[/X/metadata|instances/I]
        study = parts[2] if len(parts) > 2 else ""
        mode = next((m for m in MODES if self.study(m) == study), "")
        host = request.headers.get("Host", "").split(":")[0]
        if mode == "redirect" and host == "127.0.0.1":
            request.send_response(302)
            request.send_header("Location", f"http://localhost:{self.port}{request.path}")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        if not mode:
            return self._send(request, 404, "application/dicom+json", b"[]")
        header = self.headers[mode]
        if parts[-1] == "series":
            if mode == "big_json":
                return self._endless_json(request)
            if mode == "html":
                return self._send(request, 200, "text/html", b"<html><body>Welcome to the portal</body></html>")
            if mode == "steering":
                page = [{"0020000E": {"vr": "UI", "Value": ["../../system"]}}]
                return self._send(request, 200, "application/dicom+json", json.dumps(page).encode())
            if mode == "endless":
                offset = int(dict(p.split("=") for p in request.path.split("?")[1].split("&")).get("offset", 0))
                page = [{"0020000E": {"vr": "UI", "Value": [f"{study}.{offset + k + 1}"]}} for k in range(1000)]
                return self._send(request, 200, "application/dicom+json", json.dumps(page).encode())
            return self._send(request, 200, "application/dicom+json", json.dumps([_metadata(header)]).encode())
        if parts[-1] == "metadata":
            return self._send(request, 200, "application/dicom+json", json.dumps([_metadata(header)]).encode())
        body = self.files["bomb" if mode == "bomb" else "good"]
        multipart = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body
                     + f"\r\n--{BOUNDARY}--\r\n".encode())
        media = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        if mode == "big_multipart":
            request.send_response(200)
            request.send_header("Content-Type", media)
            request.send_header("Content-Length", str(10 * 2**30))
            request.end_headers()
            request.wfile.write(multipart)
            return
        if mode == "trickle":
            request.send_response(200)
            request.send_header("Content-Type", media)
            request.send_header("Content-Length", str(len(multipart)))
            request.end_headers()
            for byte in multipart:
                request.wfile.write(bytes([byte]))
                request.wfile.flush()
                time.sleep(0.5)
            return
        if mode == "wrong_media":
            return self._send(request, 200, "application/octet-stream", body)
        if mode == "cut_multipart":
            return self._send(request, 200, media, multipart[:-len(f"\r\n--{BOUNDARY}--\r\n")])
        return self._send(request, 200, media, multipart)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, media: str, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Type", media)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    @staticmethod
    def _endless_json(request: BaseHTTPRequestHandler) -> None:
        """JSON that never ends (the connection closes when the client gives up)."""
        request.send_response(200)
        request.send_header("Content-Type", "application/dicom+json")
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(b"[")
        item = json.dumps({"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}).encode() + b","
        block = item * (2**20 // len(item))
        for _ in range(2048):  # 2 GiB at most
            request.wfile.write(block)
