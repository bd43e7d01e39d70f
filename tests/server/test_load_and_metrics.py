"""Concurrency, client disconnects and the Prometheus metrics of a live server."""

from __future__ import annotations

import asyncio

import httpx
from eventually import eventually_sync
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL, NUM_KV_BLOCKS

VLLM_NAMES = {
    "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:num_requests_running",
    "vllm:num_requests_waiting", "vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens",
    "vllm:request_success", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
}
KVPILOT_NAMES = {"kvpilot:kv_blocks_total", "kvpilot:kv_blocks_free", "kvpilot:memory_planned_bytes",
                 "kvpilot:memory_measured_bytes"}


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{metric family name: {sorted label items (+ sample name): value}}."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(family.name, {})[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, family: str, sample: str | None = None, **labels: str) -> float:
    key = (sample or family, *sorted({"model_name": MODEL, **labels}.items()))
    return metrics[family][key]


async def _stream(client, index: int, disconnect: bool, usage_seen: list[float], url: str) -> str | None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Count from {index} to {index + 40}."}],
        max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks, reason = 0, None
    async for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
        if chunks == 4:
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"{url}/metrics")).text
            usage_seen += [s.value for f in text_string_to_metric_families(text)
                           if f.name == "vllm:kv_cache_usage_perc" for s in f.samples]
            if disconnect:
                await stream.close()  # the client goes away mid-stream
                return None
    return reason


async def _load(live) -> tuple[list, list[float]]:
    usage_seen: list[float] = []
    client = live.async_client(timeout=120)
    results = await asyncio.gather(*(_stream(client, i, i % 4 == 0, usage_seen, live.url) for i in range(32)))
    await client.close()
    return results, usage_seen


def test_32_streams_with_a_quarter_disconnecting_leave_the_pool_whole(live):
    before = scrape(live.url)
    results, usage_seen = asyncio.run(_load(live))
    assert results.count(None) == 8
    assert all(reason == "length" for reason in results if reason is not None)
    assert max(usage_seen) > 0  # the pool was in use under load

    def settled() -> dict | None:  # aborts are applied by the engine thread right after its step
        metrics = scrape(live.url)
        idle = value(metrics, "vllm:num_requests_running") == 0 and value(metrics, "vllm:num_requests_waiting") == 0
        return metrics if idle and value(metrics, "kvpilot:kv_blocks_free") == NUM_KV_BLOCKS else None

    after = eventually_sync(settled, 10, "no request left and every KV block free", poll=0.05)
    assert value(after, "kvpilot:kv_blocks_free") == value(after, "kvpilot:kv_blocks_total") == NUM_KV_BLOCKS
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    finished = value(after, "vllm:request_success", "vllm:request_success_total", finished_reason="length")
    finished_before = before.get("vllm:request_success", {}).get(
        ("vllm:request_success_total", ("finished_reason", "length"), ("model_name", MODEL)), 0)
    assert finished - finished_before == 24
    aborted = value(after, "vllm:request_success", "vllm:request_success_total", finished_reason="abort")
    assert aborted >= 8


def test_metrics_names_and_values(live):
    live.client().completions.create(model=MODEL, prompt="Hi there", max_tokens=3, temperature=0)
    metrics = scrape(live.url)
    assert set(metrics) >= VLLM_NAMES | KVPILOT_NAMES
    assert value(metrics, "vllm:kv_cache_usage_perc") == value(metrics, "vllm:gpu_cache_usage_perc")
    assert 0 <= value(metrics, "vllm:kv_cache_usage_perc") <= 1
    assert value(metrics, "vllm:generation_tokens", "vllm:generation_tokens_total") >= 3
    assert value(metrics, "vllm:prompt_tokens", "vllm:prompt_tokens_total") >= 2
    assert value(metrics, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") >= 1
    assert value(metrics, "vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_count") >= 1
    planned = value(metrics, "kvpilot:memory_planned_bytes", part="kv_cache")
    measured = value(metrics, "kvpilot:memory_measured_bytes", part="kv_cache")
    assert planned == measured > 0  # the pool is exactly the planned bytes
    weights = value(metrics, "kvpilot:memory_measured_bytes", part="weights")
    assert weights == value(metrics, "kvpilot:memory_planned_bytes", part="weights")  # to the byte
    rotary = value(metrics, "kvpilot:memory_measured_bytes", part="rotary_tables")  # cos/sin, apart from weights
    assert rotary == value(metrics, "kvpilot:memory_planned_bytes", part="rotary_tables") > 0
    assert "kvpilot:gpu_memory_used_bytes" not in metrics  # no GPU here: absent, not faked


def test_prefix_cache_counts_hits(live):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 8},
                {"role": "user", "content": "Say yes."}]
    before = scrape(live.url)
    for _ in range(2):
        live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    after = scrape(live.url)
    hits = ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
    assert value(after, *hits) - value(before, *hits) >= 16  # the second request reuses the system prompt
