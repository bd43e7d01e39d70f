"""Fixtures of the operator tests: a local stand-in for the HF hub."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from llmd_cases import TINY_CONFIG


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    return dict(TINY_CONFIG)

@dataclass
class HubFile:
    body: Any
    token: str | None = None  # gated: answer 401 unless this bearer token comes along
    status: int = 200


@dataclass
class FakeHub:
    """Serves `files` at `{url}/{org}/{name}/resolve/{revision}/{file}` like the HF hub does (a real HTTP
    server on 127.0.0.1: the tests never reach the internet)."""

    url: str
    files: dict[str, HubFile] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def serve(self, repo: str, filename: str, body: Any, revision: str = "main", **kw: Any) -> None:
        self.files[f"/{repo}/resolve/{revision}/{filename}"] = HubFile(body, **kw)


@contextmanager
def serve_hub() -> Iterator[FakeHub]:
    hub = FakeHub(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            hub.requests.append((self.path, auth))
            entry = hub.files.get(self.path)
            error_code = None  # the hub says why in X-Error-Code, which huggingface_hub reads
            if entry is None:
                status, body, error_code = 404, {"error": "Entry not found"}, "EntryNotFound"
            elif entry.token and auth != f"Bearer {entry.token}":
                status, body, error_code = 401, {"error": "gated"}, "GatedRepo"
            else:
                status, body = entry.status, entry.body
            payload = json.dumps(body).encode()
            self.send_response(status)
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with serve_hub() as hub:
        yield hub


@pytest.fixture(scope="module")
def module_hub() -> Iterator[FakeHub]:
    """One hub for a module's tests (each serves its own repo names)."""
    with serve_hub() as hub:
        yield hub
