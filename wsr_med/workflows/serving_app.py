"""The ASGI app ``wsr-med serve`` runs (one per uvicorn worker): MLflow's scoring server for the model at
``$_MLFLOW_SERVER_MODEL_PATH``, behind :class:`RequestGuard`."""

from __future__ import annotations

import json
import os

from mlflow.pyfunc import scoring_server

from wsr_med.workflows.serving import BODY_LIMIT_ENV

__all__ = ["RequestGuard", "app"]


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring server.

    * A request body above ``max_bytes`` answers 413 before it is parsed: by its ``Content-Length``, or by counting a
      chunked body as it arrives; no one can make the server hold a body of any size.
    * ``inputs`` / ``instances`` given as a list of rows become ``dataframe_records``: MLflow turns such rows into
      columns and refuses the whole request when one row lacks a key (or answers no rows), where the served model
      answers one row per input row, an error for a row without ``bytes``.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        body = f"request body over {self.max_bytes} bytes: send fewer or smaller scans per request".encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await self._refuse(send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = _rows_as_records(b"".join(chunks))
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
    """``{"inputs"|"instances": [row, ...]}`` -> ``{"dataframe_records": [row, ...]}`` (a row that is no object: ``{}``);
    anything else as it came."""
    if not body.lstrip().startswith(b"{") or (b'"inputs"' not in body[:64] and b'"instances"' not in body[:64]):
        return body
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    key = "inputs" if "inputs" in doc else "instances"
    rows = doc.get(key)
    if len(doc) != 1 or not isinstance(rows, list) or not any(isinstance(r, dict) for r in rows):
        return body
    return json.dumps({"dataframe_records": [r if isinstance(r, dict) else {} for r in rows]}).encode()


app = RequestGuard(scoring_server.init(scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])),
                int(os.environ[BODY_LIMIT_ENV]))
