"""Prometheus metrics with vLLM's names, so dashboards, KEDA triggers, prometheus-adapter rules and
the Gateway API Inference Extension's endpoint picker work unchanged; plus kvpilot's memory figures.

Engine state (queue, KV blocks, token counters) is read from `engine.stats()` at scrape time, so
the numbers are never stale; per-request latencies are observed by the server as requests finish.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvpilot.runtime.contract import KV_USAGE_METRIC, KV_USAGE_METRIC_OLD, RUNNING_METRIC, WAITING_METRIC
from kvpilot.runtime.engine.outputs import HostTierStats
from kvpilot.runtime.memory.nvml import nvml

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0)


@dataclass(frozen=True)
class MemoryFigures:
    """Bytes per part: what the plan predicted and what the process really holds."""

    planned: dict[str, int]
    measured: dict[str, int]


class _EngineCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], object], memory: Callable[[], MemoryFigures],
                 gpu_memory: Callable[[], list[tuple[int, int, int]]]) -> None:
        self.model_name, self.stats, self.memory, self.gpu_memory = model_name, stats, memory, gpu_memory

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats()
        yield self._gauge(RUNNING_METRIC, "Requests in the running batch.", s.num_running)
        yield self._gauge(WAITING_METRIC, "Requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge(KV_USAGE_METRIC, "Fraction of KV-cache blocks in use (0..1).", s.kv_cache_usage)
        yield self._gauge(KV_USAGE_METRIC_OLD, "Same as vllm:kv_cache_usage_perc (older name, read by "
                          "the Gateway API Inference Extension).", s.kv_cache_usage)
        yield self._gauge("kvpilot:kv_blocks_total", "KV-cache blocks allocated at start-up.", s.num_kv_blocks)
        yield self._gauge("kvpilot:kv_blocks_free", "KV-cache blocks free now.", s.num_free_kv_blocks)
        yield self._counter("vllm:num_preemptions", "Sequences preempted (recomputed or swapped).", s.num_preemptions)
        yield self._counter("kvpilot:num_swap_preemptions", "Preempted sequences swapped to the host KV tier "
                            "instead of recomputed.", s.num_swap_preemptions)
        yield self._counter("vllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield self._counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield self._counter("kvpilot:prefill_tokens_computed", "Prompt tokens run through the model (prefix-cache "
                            "and host-tier hits are not).", s.prefill_tokens_total)
        if s.host is not None:
            yield from self._host_tier(s.host)
        figures = self.memory()
        for kind, values in (("planned", figures.planned), ("measured", figures.measured)):
            family = GaugeMetricFamily(f"kvpilot:memory_{kind}_bytes",
                                       f"Bytes per part of memory, {kind} (per GPU, or the host on CPU).",
                                       labels=["model_name", "part"])
            for part, value in values.items():
                family.add_metric([self.model_name, part], value)
            yield family
        gpus = self.gpu_memory()
        if gpus:  # absent on CPU: no figure is better than a made-up one
            used = GaugeMetricFamily("kvpilot:gpu_memory_used_bytes", "GPU memory in use (pynvml).", labels=["gpu"])
            total = GaugeMetricFamily("kvpilot:gpu_memory_total_bytes", "GPU memory (pynvml).", labels=["gpu"])
            for index, used_bytes, total_bytes in gpus:
                used.add_metric([str(index)], used_bytes)
                total.add_metric([str(index)], total_bytes)
            yield used
            yield total


    def _host_tier(self, h: HostTierStats) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The host KV tier, with vLLM's KV-offloading names where vLLM has one."""
        yield self._gauge("vllm:kv_offload_cpu_cache_usage_perc", "Fraction of host KV tier blocks in use (0..1).",
                          h.usage)
        yield self._gauge("kvpilot:host_kv_blocks_total", "Host KV tier blocks allocated at start-up.", h.num_blocks)
        yield self._gauge("kvpilot:host_kv_blocks_used", "Host KV tier blocks holding a prefix block or a swapped "
                          "sequence's block.", h.num_used_blocks)
        moved = CounterMetricFamily("vllm:kv_offload_total_bytes", "KV bytes copied between the GPU pool and the "
                                    "host tier.", labels=["model_name", "transfer_type"])
        moved.add_metric([self.model_name, "GPU_to_CPU"], h.bytes_to_host)
        moved.add_metric([self.model_name, "CPU_to_GPU"], h.bytes_to_gpu)
        yield moved
        blocks = CounterMetricFamily("kvpilot:host_kv_blocks_copied", "KV blocks copied to (spill, swap_out) and "
                                     "from (restore, swap_in) the host tier.", labels=["model_name", "kind"])
        for kind, value in (("spill", h.spilled_blocks), ("restore", h.restored_blocks),
                            ("swap_out", h.swapped_out_blocks), ("swap_in", h.swapped_in_blocks)):
            blocks.add_metric([self.model_name, kind], value)
        yield blocks
        yield self._counter("vllm:external_prefix_cache_queries", "Prompt tokens looked up in the host KV tier "
                            "(those the GPU prefix cache missed).", h.cache_queries)
        yield self._counter("vllm:external_prefix_cache_hits", "Prompt tokens restored from the host KV tier.",
                            h.cache_hits)


class ServerMetrics:
    """One registry per server (no process globals), so tests can run several servers at once."""

    def __init__(self, model_name: str, stats: Callable[[], object], memory: Callable[[], MemoryFigures],
                 gpu_memory: Callable[[], list[tuple[int, int, int]]]) -> None:
        disable_created_metrics()  # the *_created series double the scrape and no dashboard reads them
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats, memory, gpu_memory))
        labels = ["model_name"]
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       [*labels, "finished_reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=REQUEST_BUCKETS, registry=self.registry)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting before the first schedule.",
                               labels, buckets=REQUEST_BUCKETS, registry=self.registry)

    def observe_request(self, finish_reason: str, arrival: float, first_token: float | None,
                        token_times: list[float], finished: float, queue_seconds: float | None) -> None:
        m = self.model_name
        self.request_success.labels(m, finish_reason).inc()
        self.e2e.labels(m).observe(finished - arrival)
        if first_token is not None:
            self.ttft.labels(m).observe(first_token - arrival)
        for earlier, later in itertools.pairwise(token_times):
            self.itl.labels(m).observe(later - earlier)
        if queue_seconds is not None:
            self.queue.labels(m).observe(queue_seconds)


def gpu_memory_info() -> list[tuple[int, int, int]]:
    """(index, used, total) bytes per GPU from pynvml; empty without an NVIDIA GPU."""
    with nvml() as pynvml:
        if pynvml is None:
            return []
        out = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            out.append((index, int(info.used), int(info.total)))
        return out
