"""ASGI middleware: bearer API key (401) and request body size limit (413), both in OpenAI's error shape."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvpilot.runtime.contract import HEALTH_PATH, METRICS_PATH, READY_PATH
from kvpilot.runtime.server.protocol import error_json

OPEN_PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH)  # probes and scrapes carry no key


async def _send_error(send: Send, status: int, message: str, kind: str, headers: list | None = None) -> None:
    body = json.dumps(error_json(status, message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_key or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode(errors="replace").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     "authentication_error", [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes`. The bytes actually received are counted (a Content-Length is
    a claim, not a limit: a chunked body may follow it), and a request framed both ways is refused,
    as the HTTP spec allows and vLLM does. The body is read here, up to the limit, and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return await _send_error(send, 400, "a request may not carry both Content-Length and "
                                                "Transfer-Encoding: chunked", "invalid_request_error")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, message, "invalid_request_error")
        chunks, received, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            received += len(chunks[-1])
            more = msg.get("more_body", False)
            if received > self.max_bytes:
                return await _send_error(send, 413, message, "invalid_request_error")
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later reads wait for the disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
