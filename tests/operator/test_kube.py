"""kube.py over real HTTP: the emulator for create-or-patch and discovery, raw sockets for network faults."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from kvpilot.operator import kube as kube_module
from kvpilot.operator.kube import CHILD_RESOURCES, ApiFault, Kube
from kvpilot.operator.merge import LAST_APPLIED
from kvpilot.operator.testing import Emulated, emulated_cluster

# On the async tests only: the sync ones below would each draw a warning.
on_module_loop = pytest.mark.asyncio(loop_scope="module")
SERVICES = CHILD_RESOURCES["Service"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster() -> AsyncIterator[Emulated]:
    async with emulated_cluster(optional_apis=False) as emulated:
        yield emulated


def service(name: str, selector: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ml"},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": 8000}]}}


@on_module_loop
async def test_create_then_unchanged_then_patched(cluster: Emulated):
    kube = cluster.kube
    outcome, live = await asyncio.to_thread(kube.apply, service("a", {"app": "x", "gpu": "h100"}), None)
    assert outcome == "created" and LAST_APPLIED in live["metadata"]["annotations"]
    assert (await asyncio.to_thread(kube.apply, service("a", {"app": "x", "gpu": "h100"}), live))[0] == "unchanged"

    await cluster.patch("Service", "a", {"metadata": {"annotations": {"team": "ml"}}})  # someone else's field
    live = cluster.get("Service", "a")
    outcome, patched = await asyncio.to_thread(kube.apply, service("a", {"app": "x"}), live)
    assert outcome == "patched"
    assert patched["spec"]["selector"] == {"app": "x"}  # the key we stopped rendering is gone
    assert patched["metadata"]["annotations"]["team"] == "ml"  # theirs stays


@on_module_loop
async def test_a_stale_cache_costs_one_read_not_a_failure(cluster: Emulated):
    await asyncio.to_thread(cluster.kube.apply, service("b", {"app": "y"}), None)
    assert (await asyncio.to_thread(cluster.kube.apply, service("b", {"app": "y"}), None))[0] == "unchanged"
    assert (await asyncio.to_thread(cluster.kube.apply, service("b", {"app": "z"}), None))[0] == "patched"
    assert cluster.get("Service", "b")["spec"]["selector"] == {"app": "z"}


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
    kube = Kube.for_url(silent_server)
    with pytest.raises(ApiFault, match="Timeout") as err:
        kube.get(SERVICES, "ml", "x")
    assert err.value.retryable and err.value.status is None
    kube.close()


def test_refused_connections_are_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kube = Kube.for_url(f"http://127.0.0.1:{port}")
    kube.api.configuration.retries = 0  # urllib3 would otherwise retry the connect itself first
    with pytest.raises(ApiFault) as err:
        kube.get(SERVICES, "ml", "x")
    assert err.value.retryable
    kube.close()
