"""The real operator against kmock's Kubernetes emulator, for the tests and `bench/operator_scale.py`.

Like `kopf.testing`: the emulator serves HTTP in the caller's event loop, kopf runs in its own thread
(it cancels tasks it did not start), and the helpers poll the emulator's objects with short timeouts.
A test double: it lives under tests/ and needs the dev dependencies (kmock); no product module imports it.

The emulator stores what it is sent and fills in no metadata; `Emulator` adds what a real API server
would (uid, generation, creationTimestamp), because owner references and the indexes need uids, and
server-side apply with field managers (server_side_apply.py), which the operator writes its children with.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import attrs
import kmock
import kopf
import kubernetes
import server_side_apply as ssa
import yaml
from eventually import POLL_SECONDS, eventually

from kvpilot.operator.handlers import build_registry
from kvpilot.operator.hub import Hub
from kvpilot.operator.kube import APPLY_PATCH, Kube
from kvpilot.operator.main import AUTOSCALE_SECONDS, RESYNC_SECONDS, configure
from kvpilot.operator.reconcile import OperatorContext
from kvpilot.operator.resources import CHILD_RESOURCES, LLMDEPLOYMENTS, PODS, SECRETS, Resource
from kvpilot.operator.spec import API_GROUP

NAMESPACE = "ml"
START_TIMEOUT_SECONDS = 20.0
T = TypeVar("T")
RESOURCES = {LLMDEPLOYMENTS.kind: LLMDEPLOYMENTS, SECRETS.kind: SECRETS, PODS.kind: PODS, **CHILD_RESOURCES}


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server does with metadata: uid, generation, creationTimestamp
    and a name from generateName on create; a new resourceVersion on every write, checked when a write
    names one (a merge patch carrying metadata.resourceVersion, a JSON patch's `test` op: 409 / 422).
    Lists report the latest resourceVersion and a watch from it skips the objects the list returned
    (kmock alone replays them all, so kopf would handle each object twice from a stale copy).
    Server-side apply (`application/apply-patch+yaml`) with field managers, force and conflicts, and the
    field ownership of other writes, in `metadata.managedFields` (see server_side_apply.py).

    `keep_history = False` forgets each request once answered: kmock matches every request against its
    whole history (quadratic), which a benchmark's thousands of requests cannot afford. Tests keep it
    for assertions and for fault injection by slices (`emulator[...][:1] << 500`)."""

    keep_history = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self._latest = 0
        self._writes = asyncio.Lock()
        self._refusals: list[Refusal] = []

    def refuse(self, method: str, plural: str, name: str, status: int = 500, times: int = 1) -> None:
        """Fail the next `times` such requests *without* acting on them, as a real API server does
        (kmock's own injected errors come after it has stored the write)."""
        self._refusals.append(Refusal(method.upper(), plural, name, status, times))

    def _refused(self, request: kmock.Request) -> Refusal | None:
        name = request.name or (request.data or {}).get("metadata", {}).get("name")
        for refusal in self._refusals:
            if (refusal.times > 0 and refusal.method == request.method.value.upper()
                    and request.resource is not None and refusal.plural == request.resource.plural
                    and refusal.name == name):
                refusal.times -= 1
                return refusal
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        original = request
        try:
            if refusal := self._refused(request):
                raise kmock.KubernetesError(refusal.status, "Refused", f"refused by the test ({refusal.status})")
            if request.resource is None or request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
                return await super()._handle(request)
            async with self._writes:  # check-then-write must not interleave
                created_by_apply = False
                if request.headers.get("Content-Type", "").startswith(APPLY_PATCH):
                    request, created_by_apply = self._server_side_apply(request)
                    # kmock's reactions match requests in its history: the translated one takes its place.
                    index = next(i for i, seen in enumerate(self._requests) if seen is original)
                    self._requests[index] = request
                else:
                    self._record_update(request)
                self._stamp(request)
                response = await super()._handle(request)
                if created_by_apply:
                    response.set_status(201)  # as the API server answers an apply that created the object
                return response
        finally:
            if not self.keep_history:
                index = next(i for i, seen in enumerate(self._requests) if seen in (original, request))
                del self._requests[index]

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _server_side_apply(self, request: kmock.Request) -> tuple[kmock.Request, bool]:
        """An apply as a plain create or merge patch the store understands (server_side_apply.py)."""
        manager = request.params.get("fieldManager")
        if not manager:
            raise kmock.KubernetesError(422, "Invalid", "PATCH of type apply requires fieldManager")
        applied = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text)
        live = self._stored(request)
        try:
            result = ssa.apply(live, applied, manager, force=request.params.get("force") == "true")
        except ssa.Conflict as err:
            raise kmock.KubernetesError(409, "Conflict", f"Apply failed with conflicts: {err}") from None
        if live is None:
            result["metadata"].setdefault("namespace", request.namespace)
            return attrs.evolve(request, action=kmock.action.CREATE, method="POST", data=result), True
        return attrs.evolve(request, data=ssa.diff_patch(live, result)), False

    def _record_update(self, request: kmock.Request) -> None:
        """A create or merge patch of an object (not a subresource): the fields it changes move to its
        manager (`?fieldManager=`, else the client's name from its User-Agent), in managedFields."""
        if request.subresource is not None or not isinstance(request.data, dict):
            return  # JSON patches (kopf's own annotations and finalizers) are not tracked
        manager = request.params.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]
        live = self._stored(request) if request.action == kmock.action.UPDATE else None
        if request.action == kmock.action.UPDATE and live is None:
            return  # the emulator answers 404
        after = ssa.merge_patch(live or {}, request.data)
        request.data.setdefault("metadata", {})["managedFields"] = ssa.record_update(live, after, manager)

    async def _serve_list(self, request: kmock.Request) -> Any:
        answer = await super()._serve_list(request)
        answer["metadata"]["resourceVersion"] = str(self._latest)
        return answer

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else None
        async for event in super()._serve_watch(request):
            replayed = (isinstance(event, dict) and event.get("type") == "ADDED" and since_version is not None
                        and int(event["object"].get("metadata", {}).get("resourceVersion", 0)) <= since_version)
            if not replayed:
                yield event

    def _stamp(self, request: kmock.Request) -> None:
        self._latest = next(self._versions)
        version = str(self._latest)
        if request.action == kmock.action.CREATE:
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=version,
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the emulator answers 404
        current = self.objects[key].raw.get("metadata", {})
        if isinstance(request.data, list):  # JSON patch
            for op in request.data:
                if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" \
                        and op.get("value") != current.get("resourceVersion"):
                    raise kmock.KubernetesError(422, "Invalid", "the resourceVersion test failed")
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            return
        meta = request.data.setdefault("metadata", {})
        if meta.get("resourceVersion") not in (None, current.get("resourceVersion")):
            raise kmock.KubernetesError(409, "Conflict", "the object has been modified; read it again")
        meta["resourceVersion"] = version
        if "spec" in request.data and request.subresource in (None, "scale"):
            meta["generation"] = current.get("generation", 1) + 1


@dataclass
class Refusal:
    method: str
    plural: str
    name: str
    status: int
    times: int


def kube_for_url(url: str) -> Kube:
    """The operator's client for a plain-HTTP API endpoint with no auth (the emulator)."""
    return Kube.for_configuration(kubernetes.client.Configuration(host=url))


def _declare(emulator: kmock.KubernetesEmulator, resource: Resource, subresources: set[str]) -> None:
    emulator.resources[f"{resource.api_version}/{resource.plural}"] = kmock.ResourceInfo(
        kind=resource.kind, singular=resource.kind.lower(), namespaced=True, subresources=subresources,
        verbs={"list", "watch", "get", "create", "patch", "update", "delete"})


@dataclass
class Emulated:
    """A running operator and its emulated cluster, with helpers that speak the tests' language."""

    emulator: Emulator
    kube: Kube
    namespace: str = NAMESPACE
    operator: OperatorContext | None = None  # set while `running_operator` runs one on this cluster

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the running operator's metrics (0 when it has none yet)."""
        assert self.operator is not None, "no operator runs on this cluster"
        return self.operator.metrics.registry.get_sample_value(name, labels) or 0.0

    def _key(self, resource: Resource, name: str) -> tuple[kmock.resource, str, str]:
        return kmock.resource(resource.group, resource.version, resource.plural), self.namespace, name

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object as the emulator holds it now (a copy), or None."""
        key = self._key(RESOURCES[kind], name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return copy.deepcopy(self.emulator.objects[key].raw)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The Kubernetes Events posted about the LLMDeployment `name`."""
        return [copy.deepcopy(obj.raw) for (resource, namespace, _), obj in self.emulator.objects.items()
                if resource.plural == "events" and namespace == self.namespace and not obj.deleted
                and obj.raw.get("involvedObject", {}).get("name") == name]

    def children(self, name: str) -> dict[str, dict[str, Any]]:
        found = {kind: self.get(kind, name) for kind in CHILD_RESOURCES}
        return {kind: obj for kind, obj in found.items() if obj is not None}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.emulator.request(method, path, json=body, headers=headers) as response:
            if response.status >= 300:
                raise AssertionError(f"{method} {path}: HTTP {response.status}: {await response.text()}")
            return await response.json()

    async def create(self, obj: dict[str, Any]) -> Any:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["namespace"] = self.namespace
        return await self._call("POST", RESOURCES[obj["kind"]].path(self.namespace), obj)

    async def patch(self, kind: str, name: str, patch: dict[str, Any], subresource: str | None = None) -> Any:
        return await self._call("PATCH", RESOURCES[kind].path(self.namespace, name, subresource), patch)

    async def delete(self, kind: str, name: str) -> Any:
        return await self._call("DELETE", RESOURCES[kind].path(self.namespace, name))

    async def eventually(self, probe: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
        """tests/eventually.py's `eventually`, kept here so a test reads `cluster.eventually(...)`."""
        return await eventually(probe, timeout, what)


@asynccontextmanager
async def emulated_cluster(*, service_monitors: bool = False, optional_apis: bool = True,
                           namespace: str = NAMESPACE, keep_history: bool = True) -> AsyncIterator[Emulated]:
    """An emulated API server with the LLMDeployment CRD and the built-in kinds.

    `optional_apis`: it also serves LeaderWorkerSet and KEDA; `service_monitors`: and
    prometheus-operator's ServiceMonitor."""
    async with Emulator() as emulator, kmock.Server(emulator):
        emulator.keep_history = keep_history
        emulator.resources.load_bundled()
        _declare(emulator, LLMDEPLOYMENTS, {"status", "scale"})
        optional = {"LeaderWorkerSet": optional_apis, "ScaledObject": optional_apis,
                    "ServiceMonitor": service_monitors}
        for kind, resource in CHILD_RESOURCES.items():
            if optional.get(kind, True) and resource.group not in ("", "apps", "policy", "autoscaling"):
                _declare(emulator, resource, {"status"})
        kube = kube_for_url(str(emulator.url).rstrip("/"))
        try:
            yield Emulated(emulator, kube, namespace)
        finally:
            kube.close()


@asynccontextmanager
async def running_operator(cluster: Emulated, *, hub_endpoint: str | None = None,
                           resync_seconds: float = RESYNC_SECONDS,
                           autoscale_seconds: float = AUTOSCALE_SECONDS) -> AsyncIterator[Emulated]:
    """The operator (kopf, our handlers and settings) watching the cluster's namespace, in a thread."""
    url = str(cluster.emulator.url).rstrip("/")
    registry = build_registry(resync_seconds, autoscale_seconds)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True, default_namespace=cluster.namespace)

    settings = configure(kopf.OperatorSettings())
    settings.scanning.disabled = True  # the emulator answers namespace listing with 500
    settings.watching.reconnect_backoff = POLL_SECONDS
    watched = kmock.resource(API_GROUP, LLMDEPLOYMENTS.version, LLMDEPLOYMENTS.plural)
    watches_before = len(list(cluster.emulator[kmock.action.WATCH, watched]))
    stop, ready = threading.Event(), threading.Event()
    cluster.operator = OperatorContext(kube=cluster.kube, hub=Hub(hub_endpoint))
    memo = kopf.Memo(operator=cluster.operator)
    thread = threading.Thread(target=kopf.run, daemon=True, name="kopf", kwargs=dict(
        registry=registry, settings=settings, memo=memo, namespaces=[cluster.namespace], standalone=True,
        stop_flag=stop, ready_flag=ready))
    thread.start()
    try:
        await asyncio.to_thread(ready.wait, START_TIMEOUT_SECONDS)
        await cluster.eventually(lambda: len(list(cluster.emulator[kmock.action.WATCH, watched])) > watches_before,
                                 START_TIMEOUT_SECONDS, "kopf watches LLMDeployments")
        yield cluster
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, START_TIMEOUT_SECONDS)
        cluster.operator = None


@asynccontextmanager
async def emulated_operator(*, hub_endpoint: str | None = None, service_monitors: bool = False,
                            optional_apis: bool = True, resync_seconds: float = RESYNC_SECONDS,
                            autoscale_seconds: float = AUTOSCALE_SECONDS, namespace: str = NAMESPACE,
                            keep_history: bool = True) -> AsyncIterator[Emulated]:
    """`emulated_cluster` with `running_operator` on it."""
    async with emulated_cluster(service_monitors=service_monitors, optional_apis=optional_apis,
                                namespace=namespace, keep_history=keep_history) as cluster, \
            running_operator(cluster, hub_endpoint=hub_endpoint, resync_seconds=resync_seconds,
                             autoscale_seconds=autoscale_seconds):
        yield cluster
