"""Files that are whole or absent, and a full disk said in one line.

Every file wsr_med writes for a user (metrics, reports, the run's settings, keys, CSV files) goes through
:func:`atomic_write` or :func:`atomic_path`: the content is written under a temporary name in the same folder,
flushed, then renamed over the target, so that a crash or a full disk leaves the old file or none, never a
truncated one, and the temporary file is removed on failure. :func:`storage_error` finds a full or read-only
disk behind any error (MONAI and ignite wrap them) and turns it into a :class:`~wsr_med.errors.WsrMedError`
naming the folder.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsr_med.errors import WsrMedError

__all__ = ["DiskFull", "atomic_path", "atomic_write", "storage_error"]

# errno values meaning "this location cannot take more data": no space, quota exceeded, read-only file system
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


class DiskFull(WsrMedError):
    """A write failed because the device is full, over quota or read-only; the message names the folder."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


@contextmanager
def atomic_path(path: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block ends without error it becomes ``path``.

    Args:
        path: the file to write.
        exclusive: never replace an existing ``path`` (the rename is a hard link, which fails if it exists):
            of two processes creating the same file, one wins and the other's content is dropped.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename: a crash leaves the old file, not an empty new one
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, content: str | bytes, exclusive: bool = False, mode: int | None = None) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` through :func:`atomic_path`; ``mode`` sets the permissions."""
    path = Path(path)
    with atomic_path(path, exclusive) as tmp:
        data = content.encode("utf-8") if isinstance(content, str) else content
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)  # less the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return path


def read_json_object(path: str | Path, what: str, shape: str) -> dict:
    """A user's JSON file that must hold an object: its content, or one line naming the file, ``what`` it should hold
    and its expected ``shape``."""
    import json

    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WsrMedError(f"{path}: not a readable JSON file of {what} ({type(e).__name__})") from None
    if not isinstance(content, dict):
        raise WsrMedError(f"{path}: expected {shape}")
    return content


def storage_error(error: BaseException) -> DiskFull | None:
    """A :class:`DiskFull` for the full, over-quota or read-only disk behind ``error`` (its cause/context chain),
    naming the folder that could not be written; None when the error is something else."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DiskFull):
            return error
        code = getattr(error, "errno", None)
        if code is None and isinstance(error, RuntimeError):  # torch.save wraps the OS error in its own text
            text = str(error)
            code = next((c for c, words in _STORAGE_ERRNOS.items() if words in text.lower() or os.strerror(c) in text), None)
        if code in _STORAGE_ERRNOS:
            filename = getattr(error, "filename", None)
            where = f"the folder {Path(str(filename)).parent}" if filename else "an output folder"
            return DiskFull(f"cannot write to {where}: {_STORAGE_ERRNOS[code]} on the device. Free space (or choose "
                            "another --output-dir) and run the same command again: it goes on from where it stopped.", code)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
