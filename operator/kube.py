"""The operator's one Kubernetes client: plain REST on dicts, and server-side apply.

Built once at start-up on the official client's `ApiClient` (auth, TLS, connection pool) and shared
by every handler thread. Objects stay dicts end to end: the typed models cost a deserialisation per
call and would drop fields of CRD kinds (LeaderWorkerSet, ScaledObject, ServiceMonitor).

`apply` writes children with server-side apply under the field manager `kvpilot-operator`, forcing
conflicts (the operator owns what it renders; someone who edits those fields by hand gets them put
back). The API server removes fields the operator stopped applying and leaves fields others own
(an HPA's replicas, a webhook's sidecar) alone. To skip the call when nothing changed, each applied
object carries a digest of itself: the live object holds what we would apply when it contains every
field and the digest matches (containment alone cannot see a field we stopped rendering).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

import kubernetes
import urllib3

from kvpilot.operator.resources import SECRETS, Resource, resource_of

# (connect, read) seconds: a write to a healthy API server takes milliseconds; one that takes
# longer is retried by the caller rather than holding a handler thread.
REQUEST_TIMEOUT = (5.0, 30.0)
# Handler threads share one connection pool; kopf runs up to this many sync handlers at once.
CONNECTION_POOL_SIZE = 32
# How long an answer to "does the cluster serve this API group?" is trusted: CRDs come and go rarely.
DISCOVERY_TTL_SECONDS = 60.0
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # a JSON body is YAML too
FIELD_MANAGER = "kvpilot-operator"
APPLIED_DIGEST = "kvpilot.io/applied-digest"

ApplyAction = Literal["created", "patched", "unchanged"]  # what `Kube.apply` did


class ApiFault(Exception):
    """A failed API call. `retryable`: conflicts, throttling, 5xx and timeouts; the caller backs off."""

    def __init__(self, message: str, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api
        self._discovery: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: its service account; elsewhere: the current kubeconfig context."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=config)
        return cls.for_configuration(config)

    @classmethod
    def for_configuration(cls, config: kubernetes.client.Configuration) -> Kube:
        config.connection_pool_maxsize = CONNECTION_POOL_SIZE
        return cls(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        self.api.close()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: list[tuple[str, str]] | None = None) -> Any:
        """One API call; the decoded JSON answer, None for 404, ApiFault for every other failure."""
        return self._call(method, path, body, content_type, query)[1]

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
              query: list[tuple[str, str]] | None = None) -> tuple[int, Any]:
        """`request`, with the HTTP status of the answer."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        what = f"{method} {path}"
        try:
            _, url, headers, data, _ = self.api.param_serialize(method, path, query_params=query, header_params=headers,
                                                                body=body, auth_settings=["BearerToken"])
            response = self.api.call_api(method, url, header_params=headers, body=data,
                                         _request_timeout=REQUEST_TIMEOUT)
            payload = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiFault(f"{what}: {type(err).__name__}: {err}", None, retryable=True) from None
        if response.status == 404:
            return 404, None
        if not 200 <= response.status < 300:
            try:
                message = json.loads(payload).get("message", "")
            except (ValueError, AttributeError):
                message = payload[:200].decode(errors="replace")
            retryable = response.status in (409, 429) or response.status >= 500
            raise ApiFault(f"{what}: HTTP {response.status}: {message}", response.status, retryable)
        return response.status, json.loads(payload) if payload else {}

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", resource.path(namespace, name))

    def list(self, resource: Resource, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """The objects carrying all of `labels`. The selector goes to the API server and is checked here
        too (an API emulator may ignore it)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = (self.request("GET", resource.path(namespace), query=[("labelSelector", selector)]) or {}).get(
            "items") or []
        return [obj for obj in items if labels.items() <= (obj.get("metadata", {}).get("labels") or {}).items()]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", resource_of(obj).path(obj["metadata"]["namespace"]), obj)

    def patch(self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any],
              subresource: str | None = None) -> dict[str, Any] | None:
        return self.request("PATCH", resource.path(namespace, name, subresource), patch, MERGE_PATCH)

    def delete(self, resource: Resource, namespace: str, name: str) -> None:
        self.request("DELETE", resource.path(namespace, name), {"propagationPolicy": "Background"})

    def serves(self, api_version: str) -> bool:
        """Whether the cluster serves an API group/version (a CRD is installed), cached for a minute."""
        with self._lock:
            checked_at, answer = self._discovery.get(api_version, (-DISCOVERY_TTL_SECONDS, False))
        if time.monotonic() - checked_at < DISCOVERY_TTL_SECONDS:
            return answer
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        answer = self.request("GET", path) is not None
        with self._lock:
            self._discovery[api_version] = (time.monotonic(), answer)
        return answer

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        secret = self.get(SECRETS, namespace, name)
        value = ((secret or {}).get("data") or {}).get(key)
        return base64.b64decode(value).decode().strip() if value else None

    def apply(self, desired: Mapping[str, Any],
              live: Mapping[str, Any] | None) -> tuple[ApplyAction, Mapping[str, Any]]:
        """Server-side apply `desired`; nothing when `live` (the caller's cached copy, None: not seen)
        already holds it. Returns what was done and the object as the cluster now holds it."""
        desired = with_digest(desired)
        if live is not None and contains(desired, live):
            return "unchanged", live
        resource, meta = resource_of(desired), desired["metadata"]
        status, applied = self._call("PATCH", resource.path(meta["namespace"], meta["name"]), desired, APPLY_PATCH,
                                     query=[("fieldManager", FIELD_MANAGER), ("force", "true")])
        if applied is None:
            raise ApiFault(f"{desired['kind']} {meta['name']}: not found while applying it", 404, retryable=True)
        return ("created" if status == 201 else "patched"), applied


def contains(desired: Any, live: Any) -> bool:
    """Every field of `desired` is in `live` with the same value (lists: same length, item by item).

    An empty map or list in `desired` matches an absent field: the API server drops empty values."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(contains(value, live[key]) if key in live else value in ({}, [])
                   for key, value in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(map(contains, desired, live))
    return desired == live


def with_digest(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` with a digest of itself in the APPLIED_DIGEST annotation (canonical JSON: stable)."""
    out = copy.deepcopy(dict(obj))
    meta = out.setdefault("metadata", {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_DIGEST}
    record = {**out, "metadata": {**meta, "annotations": annotations}}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    meta["annotations"] = {**annotations, APPLIED_DIGEST: hashlib.sha256(canonical).hexdigest()[:32]}
    return out
