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
    """`config.api_key` is read per request (the server's config object, shared by reference)."""

    def __init__(self, app: ASGIApp, config) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api_key = self.config.api_key
        if scope["type"] != "http" or not api_key or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode(errors="replace").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     "authentication_error", [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over `config.max_body_bytes`: by Content-Length up front; a body sent without
    one (chunked) is read here, up to the limit, and replayed to the app."""

    def __init__(self, app: ASGIApp, config) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.config.max_body_bytes
        message = f"request body exceeds the limit of {max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > max_bytes:
                return await _send_error(send, 413, message, "invalid_request_error")
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > max_bytes:
                return await _send_error(send, 413, message, "invalid_request_error")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later reads wait for the disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
