"""The error type for mistakes a user can fix: its message says what happened and what to do."""

from __future__ import annotations

__all__ = ["WsrMedError", "find_user_error"]


class WsrMedError(Exception):
    """Raised on purpose for a situation the user can fix (a finished run, a contradictory setting, a busy
    folder, a missing file); ``wsr-med`` prints its message as one line, without a traceback."""


def find_user_error(error: BaseException) -> WsrMedError | None:
    """The :class:`WsrMedError` behind ``error`` (MONAI wraps errors raised inside a bundle config), a full or
    read-only disk behind it (:func:`wsr_med.files.storage_error`), or None."""
    from wsr_med.files import storage_error

    seen, first = set(), error
    while error is not None and id(error) not in seen:
        if isinstance(error, WsrMedError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return storage_error(first)
