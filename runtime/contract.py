"""What a runtime pod promises the outside world: how it starts, where it listens, the probe paths
and the metrics the operator, the chart's adapter rules and KEDA read. The runtime serves these and
the operator renders and reads these: one source, so the two cannot drift apart."""

from __future__ import annotations

ENTRYPOINT = ("python", "-m", "kvpilot.runtime")  # then `serve` and Plan.engine_options() as flags
HTTP_PORT = 8000  # OpenAI API, /health, /ready and /metrics share one port
HEALTH_PATH = "/health"  # liveness and start-up: the engine is alive
READY_PATH = "/ready"  # readiness: 503 while draining after SIGTERM
METRICS_PATH = "/metrics"

# vLLM's names, so existing dashboards, KEDA triggers and adapter rules work unchanged.
KV_USAGE_METRIC = "vllm:kv_cache_usage_perc"
KV_USAGE_METRIC_OLD = "vllm:gpu_cache_usage_perc"  # vLLM's name before the rename; still exported
RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"
MEMORY_MEASURED_METRIC = "kvpilot:memory_measured_bytes"  # labelled part = weights, kv_cache, activations, other
