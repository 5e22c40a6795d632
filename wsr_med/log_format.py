"""Log records that stay one line each: control characters in messages are escaped.

A file name with a newline (legal on Linux) would otherwise forge a log line of its own (log injection);
file and class names reach messages in the scan, the reports and the errors. The bundle's workflows call
:func:`escape_log_records` first (MONAI refuses formatter classes in ``logging.conf``), and ``wsr-med``
formats with :class:`EscapingFormatter`; tracebacks keep their lines.
"""

from __future__ import annotations

import logging
import re
import sys

__all__ = ["EscapingFormatter", "escape_control", "escape_log_records", "quiet_stop"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """``text`` with every control character as ``\\xNN`` and the undecodable bytes of non-UTF-8 file names as
    ``\\udcNN`` (they cannot be written to a UTF-8 stream as they are)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class EscapingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` that escapes control characters in the message."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_control(record.message)
        return super().formatMessage(record)


class _NoBestTrainingLoss(logging.Filter):
    """Drops MONAI's "Got new best metric of train_loss" (the training loss is tracked, not a result to announce)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Got new best metric of train_loss")


_STOP = {"requested": False}  # set by quiet_stop: from then on the process is only unwinding


def _stopping() -> bool:
    return _STOP["requested"] or isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))


class _NoInterruptTraceback(logging.Filter):
    """While a Ctrl-C or SIGTERM unwinds a workflow: drops what ignite and MONAI log as errors on the way out ("Engine run
    is terminating due to exception: 143") and the tracebacks of anything interrupted (a database write cut short by the
    signal), keeping warnings as one line: stopping is not an error, and ``wsr-med`` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, SystemExit)):
            return False
        if not _stopping():
            return True
        if record.levelno >= logging.ERROR:
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_stop() -> None:
    """Before a Ctrl-C / SIGTERM unwinds a workflow: no handler of any logger prints the error records ignite and
    MONAI log on the way out (their loggers have handlers of their own, made after :func:`escape_log_records`)."""
    _STOP["requested"] = True
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if not any(isinstance(f, _NoInterruptTraceback) for f in handler.filters):
            handler.addFilter(_NoInterruptTraceback())


def _without_user_error_traceback(make_record):
    """A log record factory around ``make_record`` that drops the traceback of a user error (a full disk, a
    :class:`~wsr_med.errors.WsrMedError`): ignite and MONAI log the exception that ends a run with its traceback
    (``logger.exception``, on handlers of their own), where ``wsr-med`` says it in one line (``--debug`` still shows
    it)."""

    def record(*args, **kwargs) -> logging.LogRecord:
        made = make_record(*args, **kwargs)
        if made.levelno > logging.DEBUG and made.exc_info and made.exc_info[1] is not None:
            from wsr_med.errors import find_user_error

            if find_user_error(made.exc_info[1]) is not None:
                made.exc_info, made.exc_text = None, None
        return made

    record.wsr_med = True
    return record


def escape_log_records() -> None:
    """wsr_med's log policy for a workflow: every handler of the root logger formats with an
    :class:`EscapingFormatter` (its own format kept), the trainer does not announce a "best" training loss, and no
    logger prints the traceback of a user error (:func:`_without_user_error_traceback`)."""
    if not getattr(logging.getLogRecordFactory(), "wsr_med", False):
        logging.setLogRecordFactory(_without_user_error_traceback(logging.getLogRecordFactory()))
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, EscapingFormatter):
            old = handler.formatter or logging.Formatter()
            handler.setFormatter(EscapingFormatter(old._fmt, old.datefmt))
        if not any(isinstance(f, _NoBestTrainingLoss) for f in handler.filters):
            handler.addFilter(_NoBestTrainingLoss())
