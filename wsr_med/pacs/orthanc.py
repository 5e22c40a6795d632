"""A throw-away Orthanc archive on 127.0.0.1 (Debian packages ``orthanc`` and ``orthanc-dicomweb``): a temporary
configuration with the DICOMweb plugin on, storage in a temporary folder, free ports, HTTP basic authentication.
For the tests and ``wsr-med bench pacs``; a real hospital points ``--dicomweb`` at its own archive.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

__all__ = ["LocalOrthanc", "ORTHANC", "DICOMWEB_PLUGIN", "orthanc_available"]

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> bool:
    return Path(ORTHANC).is_file() and Path(DICOMWEB_PLUGIN).is_file()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalOrthanc:
    """``with LocalOrthanc() as pacs:`` an Orthanc on ``pacs.dicomweb`` (``http://127.0.0.1:<port>/dicom-web``), user
    ``pacs.user`` / ``pacs.password``, C-STORE on ``pacs.aet@127.0.0.1:pacs.dicom_port``; stopped and deleted on exit.
    :meth:`stop` / :meth:`start` take it down and up again on the same storage and ports."""

    aet = "ORTHANC"
    user, password = "wsr", "test-only-secret"

    def __init__(self, folder: str | Path | None = None) -> None:
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="wsr_med_orthanc_")
        self.folder = Path(folder or self._tmp.name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.config = self.folder / "orthanc.json"
        self._configure()

    def _configure(self) -> None:
        """A configuration on two free ports."""
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "wsr_med-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomAet": self.aet, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True, "StableAge": 1, "HttpTimeout": 30, "ConcurrentJobs": 2,
        }
        self.config.write_text(json.dumps(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> str:
        """The credentials as :data:`wsr_med.pacs.archive.AUTH_ENV` reads them."""
        return f"{self.user}:{self.password}"

    def start(self, timeout_s: float = 30) -> "LocalOrthanc":
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start (see {self.folder / 'orthanc.log'})")
            try:
                if requests.get(f"{self.url}/system", auth=(self.user, self.password), timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s (see {self.folder / 'orthanc.log'})")

    def stop(self, graceful: bool = True) -> None:
        """Stop the archive: as an administrator would (it finishes what it is doing), or at once (``graceful=False``:
        an archive that vanishes mid-answer, as on a power cut)."""
        if self.process is not None and self.process.poll() is None:
            (self.process.terminate if graceful else self.process.kill)()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, files) -> list[str]:
        """Store DICOM files through Orthanc's REST API; the Orthanc ids of the stored instances."""
        ids = []
        for path in files:
            answer = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(),
                                   auth=(self.user, self.password), timeout=30)
            answer.raise_for_status()
            ids.append(answer.json()["ID"])
        return ids

    def get(self, path: str):
        answer = requests.get(f"{self.url}{path}", auth=(self.user, self.password), timeout=30)
        answer.raise_for_status()
        return answer.json()

    def __enter__(self) -> "LocalOrthanc":
        for attempt in range(3):  # a port found free may be taken by another process before Orthanc binds it
            try:
                return self.start()
            except RuntimeError:
                if attempt == 2:
                    raise
                self._configure()
        raise AssertionError("unreachable")

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
