"""kube.py over real HTTP: the emulator for reads, errors and discovery, raw sockets for network faults
(applying is in test_server_side_apply.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from kube_emulator import Emulated, emulated_cluster, kube_for_url

from kvpilot.operator import kube as kube_module
from kvpilot.operator.kube import ApiFault
from kvpilot.operator.resources import CHILD_RESOURCES

on_module_loop = pytest.mark.asyncio(loop_scope="module")  # async tests only: sync ones get no asyncio mark
SERVICES = CHILD_RESOURCES["Service"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster() -> AsyncIterator[Emulated]:
    async with emulated_cluster(optional_apis=False) as emulated:
        yield emulated


@on_module_loop
async def test_missing_objects_and_discovery(cluster: Emulated):
    kube = cluster.kube
    assert await asyncio.to_thread(kube.get, SERVICES, "ml", "nope") is None
    assert await asyncio.to_thread(kube.serves, "apps/v1")
    assert not await asyncio.to_thread(kube.serves, "leaderworkerset.x-k8s.io/v1")
    assert await asyncio.to_thread(kube.secret_value, "ml", "nope", "HF_TOKEN") is None


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True), (409, True),
                                                   (422, False), (403, False)])
@on_module_loop
async def test_http_errors_say_whether_a_retry_can_help(cluster: Emulated, status, retryable):
    name = f"faulty-{status}"  # a reaction's slice counts every matching request, so one path per case
    cluster.emulator["get", f"/api/v1/namespaces/ml/services/{name}"][:1] << status << {
        "kind": "Status", "code": status, "message": f"injected {status}"}
    with pytest.raises(ApiFault, match=f"HTTP {status}: injected {status}") as err:
        await asyncio.to_thread(cluster.kube.get, SERVICES, "ml", name)
    assert (err.value.status, err.value.retryable) == (status, retryable)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: a hung API server."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_timeouts_are_retryable(silent_server: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(kube_module, "REQUEST_TIMEOUT", (1.0, 0.2))
    kube = kube_for_url(silent_server)
    with pytest.raises(ApiFault, match="Timeout") as err:
        kube.get(SERVICES, "ml", "x")
    assert err.value.retryable and err.value.status is None
    kube.close()


def test_refused_connections_are_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kube = kube_for_url(f"http://127.0.0.1:{port}")
    kube.api.configuration.retries = 0  # urllib3 would otherwise retry the connect itself first
    with pytest.raises(ApiFault) as err:
        kube.get(SERVICES, "ml", "x")
    assert err.value.retryable
    kube.close()
