"""`kvpilot operator`: kopf running the LLMDeployment handlers.

Namespace scoping (`--namespace`, repeatable, globs allowed; none: every namespace), a liveness
endpoint for the pod's probe and Prometheus metrics (see metrics.py), each bound where
`--liveness-address`/`--liveness-port` and `--metrics-address`/`--metrics-port` say, and kopf peering
so only one of several operator replicas acts (`--peering NAME`: each replica takes a random priority;
the others stand by until its peering record expires). Without `--peering` the operator runs
standalone, which is what a user starting it by hand wants, and says so at start.

kopf and the Kubernetes client load when the operator runs, not when `kvpilot` builds its parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvpilot.operator.render import DEFAULT_PROMETHEUS_URL, MANAGED_BY
from kvpilot.operator.spec import DEFAULT_IMAGE

if TYPE_CHECKING:
    import kopf

ANNOTATION_PREFIX = "kvpilot.io"  # kopf's progress and last-handled-spec annotations live here
FINALIZER = "kvpilot.io/finalizer"
# Every interface by default: in a pod, the kubelet's probe and Prometheus reach it at the pod's IP.
DEFAULT_BIND_ADDRESS = "0.0.0.0"
DEFAULT_LIVENESS_PORT = 8080
LIVENESS_PATH = "/healthz"
# The safety net behind the watches: a drift whose restore failed (the API was down when the child
# event came) is put back within this long. A no-op resync costs no API call.
RESYNC_SECONDS = 300.0
# How often the pods' KV-cache use is read (and, in autoscaling mode operator, replicas decided): the
# HPA controller's default sync period.
AUTOSCALE_SECONDS = 15.0
# Sync handlers run in kopf's thread pool; the Kubernetes client's pool matches it (kube.py).
HANDLER_THREADS = 32
# The runtime image for specs that name none; the Helm chart sets it (pinned by digest).
RUNTIME_IMAGE_ENV = "KVPILOT_RUNTIME_IMAGE"
# Unique enough that two replicas never tie (a tie pauses both, by kopf's rule).
PRIORITY_RANGE = (1, 2**31 - 1)


@dataclass
class OperatorConfig:
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    peering: str | None = None  # None: standalone, for a single replica
    priority: int | None = None  # None: random
    liveness_address: str = DEFAULT_BIND_ADDRESS
    liveness_port: int | None = DEFAULT_LIVENESS_PORT  # None: no liveness endpoint
    metrics_address: str = DEFAULT_BIND_ADDRESS
    metrics_port: int | None = None  # None: no metrics endpoint
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    resync_seconds: float = RESYNC_SECONDS
    autoscale_seconds: float = AUTOSCALE_SECONDS
    runtime_image: str = field(default_factory=lambda: os.environ.get(RUNTIME_IMAGE_ENV, DEFAULT_IMAGE))
    log_format: str = "full"  # kopf's: plain, full, or json (one object per line, for log pipelines)
    verbose: bool = False

    @property
    def liveness_url(self) -> str | None:
        """kopf's liveness endpoint, as the URL kopf takes."""
        if self.liveness_port is None:
            return None
        host = f"[{self.liveness_address}]" if ":" in self.liveness_address else self.liveness_address
        return f"http://{host}:{self.liveness_port}{LIVENESS_PATH}"


class QuietHeartbeats(logging.Filter):
    """Drops kopf's "Timer 'autoscale' succeeded." line, logged after every tick of every object, and
    "Handler 'child-deployments' succeeded.", logged after every event of every child (each status
    update of a rolling Deployment): heartbeats, not decisions. The handlers log what they decide (a
    scale, a restored drift); a failure is still logged by kopf."""

    def __init__(self, timer_ids: tuple[str, ...], event_handler_ids: tuple[str, ...]) -> None:
        super().__init__()
        self.heartbeats = ({f"Timer {timer_id!r} succeeded." for timer_id in timer_ids}
                           | {f"Handler {handler_id!r} succeeded." for handler_id in event_handler_ids})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage() in self.heartbeats)


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """kopf's settings for this operator (the tests and the benchmark use the same ones)."""
    import kopf

    from kvpilot.operator.handlers import CHILD_HANDLER_IDS, TIMER_IDS
    from kvpilot.operator.resources import CHILD_RESOURCES

    # Progress and the last-handled spec in annotations under our prefix; status stays ours alone
    # (the CRD's structural schema would prune kopf's status fields anyway).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    settings.posting.reporting_component = MANAGED_BY
    # The handlers post one Event per decision themselves; kopf would post every log line again.
    settings.posting.loggers = False
    objects_logger = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietHeartbeats) for f in objects_logger.filters):
        objects_logger.addFilter(QuietHeartbeats(TIMER_IDS, CHILD_HANDLER_IDS))
    settings.execution.max_workers = HANDLER_THREADS
    for child in CHILD_RESOURCES.values():  # list and watch only our children, server-side
        settings.watching.label_selectors[child.group, child.plural] = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    return settings


def run(config: OperatorConfig, stop_flag: threading.Event | None = None) -> None:
    import kopf

    from kvpilot.operator.handlers import build_registry
    from kvpilot.operator.hub import Hub
    from kvpilot.operator.kube import Kube
    from kvpilot.operator.reconcile import OperatorContext

    # kopf's formatter prefixes each object's lines with [namespace/name] (or adds fields, in json).
    kopf.configure(verbose=config.verbose, log_format=kopf.LogFormat[config.log_format.upper()], log_prefix=True)
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # a line per API call is noise at any level
    registry = build_registry(config.resync_seconds, config.autoscale_seconds)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    context = OperatorContext(kube=Kube.from_environment(), hub=Hub(), prometheus_url=config.prometheus_url,
                              runtime_image=config.runtime_image)
    priority = config.priority if config.priority is not None else random.randint(*PRIORITY_RANGE)
    log = logging.getLogger("kvpilot.operator")
    if config.peering is None:
        log.warning("standalone: this operator acts alone, with no peering; run exactly one replica "
                    "(several replicas need --peering NAME and kopf's KopfPeering CRDs)")
    else:
        log.warning(f"peering {config.peering!r} (priority {priority}): nothing is handled until the "
                    f"KopfPeering object {config.peering!r} exists (kopf's peering CRDs, which the chart "
                    "installs); --standalone for a single replica")
    metrics_server = None
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(config.metrics_port, addr=config.metrics_address,
                                              registry=context.metrics.registry)
        log.info(f"metrics at http://{config.metrics_address}:{config.metrics_port}/metrics")
    try:
        kopf.run(registry=registry, settings=configure(kopf.OperatorSettings()), memo=kopf.Memo(operator=context),
                 namespaces=config.namespaces, clusterwide=not config.namespaces,
                 standalone=config.peering is None, peering_name=config.peering, priority=priority,
                 liveness_endpoint=config.liveness_url, stop_flag=stop_flag)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        context.kube.close()


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the LLMDeployment operator",
                       description="Reconcile LLMDeployments: plan, render and apply their children.")
    p.add_argument("-n", "--namespace", action="append", default=[], dest="namespaces",
                   help="watch this namespace (repeatable; globs like 'ml-*' allowed); default: all")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--peering", help="share this kopf peering object with other replicas (needs kopf's "
                                        "KopfPeering CRDs; the chart installs them); default: standalone")
    mode.add_argument("--standalone", action="store_true", help="no peering, for exactly one replica (the default)")
    p.add_argument("--priority", type=int, help="peering priority; default: random")
    p.add_argument("--liveness-address", default=DEFAULT_BIND_ADDRESS,
                   help=f"bind the liveness endpoint ({LIVENESS_PATH}) to this address; default: %(default)s")
    p.add_argument("--liveness-port", type=int, default=DEFAULT_LIVENESS_PORT,
                   help="liveness endpoint port; 0: none; default: %(default)s")
    p.add_argument("--metrics-address", default=DEFAULT_BIND_ADDRESS,
                   help="bind the Prometheus metrics endpoint (/metrics) to this address; default: %(default)s")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port; default: none")
    p.add_argument("--prometheus-url", default=DEFAULT_PROMETHEUS_URL, help="Prometheus for KEDA triggers")
    p.add_argument("--resync-seconds", type=float, default=RESYNC_SECONDS,
                   help="full reconcile of every LLMDeployment this often, behind the watches")
    p.add_argument("--autoscale-seconds", type=float, default=AUTOSCALE_SECONDS,
                   help="read the pods' KV-cache use (and scale, in autoscaling mode operator) this often")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    p.add_argument("--verbose", action="store_true", help="debug logs (kopf's included)")
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    run(OperatorConfig(namespaces=args.namespaces, peering=args.peering, priority=args.priority,
                       liveness_address=args.liveness_address, liveness_port=args.liveness_port or None,
                       metrics_address=args.metrics_address, metrics_port=args.metrics_port,
                       prometheus_url=args.prometheus_url, resync_seconds=args.resync_seconds,
                       autoscale_seconds=args.autoscale_seconds,
                       log_format=args.log_format, verbose=args.verbose))
    return 0
