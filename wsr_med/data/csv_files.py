"""CSV files written by wsr_med: atomic, safe to open in a spreadsheet, whatever the file and class names hold.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to Excel and
LibreOffice (a class folder named ``=HYPERLINK(...)`` would become a live link in ``predictions.csv``). Such
text cells get a leading apostrophe (OWASP's CSV-injection rule); numbers such as ``-0.5`` are left as they
are. A program reading the file back strips one leading ``'`` from text cells that start with ``'`` followed
by one of those characters (:func:`unneutralise`). File names that are not valid UTF-8 are written with
backslash escapes (``caf\\xe9.png``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from wsr_med.files import atomic_path

__all__ = ["neutralise", "unneutralise", "write_csv"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def neutralise(cell) -> str:
    """The cell as text, with a leading ``'`` when a spreadsheet would read it as a formula."""
    text = str(cell)
    if text.startswith(_FORMULA_START) and not _is_number(text):
        return "'" + text
    return text


def unneutralise(text: str) -> str:
    """Undo :func:`neutralise` on a cell read back from a wsr_med CSV."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write ``header`` and ``rows`` to ``path`` under a temporary name, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow([neutralise(h) for h in header])
        writer.writerows([neutralise(c) for c in row] for row in rows)
    return path
