"""The ASGI app ``wsr-med serve`` runs (one per uvicorn worker): MLflow's scoring server for the model at
``$_MLFLOW_SERVER_MODEL_PATH``, behind :class:`RequestGuard`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

from mlflow.pyfunc import scoring_server

from wsr_med.workflows.serving import BODY_LIMIT_ENV

__all__ = ["RequestGuard", "app"]


class _ByteBudget:
    """Bytes of request bodies the server holds at once: a request waits for its share, and gives it back when its
    answer is sent."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def held(self, n: int):
        n = min(n, self.total)
        async with self.changed:
            await self.changed.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            async with self.changed:
                self.free += n
                self.changed.notify_all()


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring server.

    * A request body above ``max_bytes`` answers 413 before it is parsed: by its ``Content-Length``, or by counting a
      chunked body as it arrives; no one can make the server hold a body of any size.
    * Bodies share one budget of ``max_bytes`` (:class:`_ByteBudget`): a request's body is read once its declared size
      (a chunked one: ``max_bytes``) is free, and its share is held until its answer is sent. Concurrent large requests
      are therefore answered one after another, and the peak memory of N at the limit is about that of one; small
      requests pass beside them.
    * A body that is not JSON answers a short 400 naming where it breaks, never echoing it (MLflow's own answer quotes
      the whole body).
    * ``inputs`` / ``instances`` given as a list of rows become ``dataframe_records``, each row that is no object
      ``{}``: MLflow turns such rows into columns and refuses the whole request when one row lacks a key (or answers no
      rows), where the served model answers one row per input row, an error for a row without ``bytes``.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = _ByteBudget(max_bytes)

    @staticmethod
    async def _answer(send, status: int, text: str) -> None:
        body = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"request body over {self.max_bytes} bytes: send fewer or smaller scans per request"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._answer(send, 413, too_large)
        async with self.budget.held(int(length) if length is not None else self.max_bytes):
            chunks, received = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                received += len(chunks[-1])
                if received > self.max_bytes:
                    return await self._answer(send, 413, too_large)
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            chunks.clear()  # the body is held once from here on
            try:
                body = _rows_as_records(body)
            except ValueError as e:
                return await self._answer(send, 400, f"the request body is not JSON: {e}")
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
            await self.app({**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}, replay, send)


def _rows_as_records(body: bytes) -> bytes:
    """The rows of any request shape (``dataframe_records``, ``dataframe_split``, ``inputs``, ``instances``) as
    ``{"dataframe_records": [row, ...]}`` in which every row names ``bytes`` (``null`` when it did not; a row that is no
    object: ``{"bytes": null}``): MLflow's schema enforcement drops the rows of a frame with no column, so that it would
    answer fewer rows than were sent. ``dataframe_records`` that need none of this, and anything else, as they came.

    Raises:
        ValueError: the body is not JSON (the message says where it breaks, without quoting it).
    """
    try:
        doc = json.loads(body)
    except ValueError as e:
        message = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{message}{where}") from None
    if not isinstance(doc, dict) or len(doc) != 1:
        return body
    (shape, value), = doc.items()
    if shape in ("inputs", "instances", "dataframe_records") and isinstance(value, list):
        rows = value
    elif shape == "dataframe_split" and isinstance(value, dict) and isinstance(value.get("data"), list):
        columns = value.get("columns") if isinstance(value.get("columns"), list) else []
        rows = [dict(zip(columns, r)) if isinstance(r, list) else r for r in value["data"]]
    else:
        return body
    records = [{**r, "bytes": r.get("bytes")} if isinstance(r, dict) else {"bytes": None} for r in rows]
    if shape == "dataframe_records" and records == rows:
        return body  # as MLflow takes it: not written again
    return json.dumps({"dataframe_records": records}).encode()


app = RequestGuard(scoring_server.init(scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])),
                int(os.environ[BODY_LIMIT_ENV]))
