"""Open-loop load against the kvpilot server and, as the peer, HF transformers behind the simplest
server (bench/hf_server.py), on the same model and machine. Poisson arrivals at several rates;
streaming completions with a fixed number of output tokens. One JSON line per (server, rate):
throughput, TTFT and time per output token p50/p99, end-to-end latency.

Tokens are counted from each stream's final `usage`, never assumed or counted from chunks (the HF
peer streams words, kvpilot streams tokens): TPOT is (last chunk - first chunk) / (tokens - 1) per
request, the same computation for both. The peer is HF `generate` behind a one-request-at-a-time
server, not a serving engine: bench/vs_vllm.py measures against vLLM.

    python bench/serve.py --rates 1 2 4 --requests 24 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import httpx
from http_servers import percentile, start_server

from kvpilot.runtime.models.parallel import free_port

TOPICS = ["the ocean", "a lighthouse keeper", "Kubernetes", "GPU memory", "a long train journey", "bread",
          "the first snow", "an old map", "a chess game", "the moon landing", "a small robot", "tea"]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    times: list[float] = []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "min_tokens": max_tokens, "stream_options": {"include_usage": True}}
    tokens = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    if tokens is None:
        raise RuntimeError("the stream carried no usage: cannot count its tokens")
    return {"start": start, "times": times, "end": time.perf_counter(), "tokens": tokens}


async def _load(url: str, model: str, rate: float, requests: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [f"Write a few sentences about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."
               for _ in range(requests)]
    async with httpx.AsyncClient(timeout=600) as client:
        began = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(client, url, model, prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))  # open loop: arrivals do not wait for answers
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["times"]]
    e2e = [r["end"] - r["start"] for r in results]
    return {"rate_rps": rate, "requests": requests, "output_tokens": sum(r["tokens"] for r in results),
            "output_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "tpot_p50_s": round(percentile(tpot, 0.5), 4), "tpot_p99_s": round(percentile(tpot, 0.99), 4),
            "e2e_p50_s": round(statistics.median(e2e), 3), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    servers = {
        "kvpilot": lambda port: [sys.executable, "-m", "kvpilot.runtime", "serve", "--port", str(port),
                                 "--served-model-name", "smollm2", "--max-model-len", "1024",
                                 "--max-num-seqs", "32", "--kv-memory", "1Gi"],
        "hf_transformers": lambda port: [sys.executable, "bench/hf_server.py", "--port", str(port)],
    }
    results: dict[str, list[dict]] = {}
    for name, command in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(command(port), f"{url}/ready", 300)
        try:
            for rate in args.rates:
                row = asyncio.run(_load(url, "smollm2", rate, args.requests, args.max_tokens, args.seed))
                results.setdefault(name, []).append(row)
                print(json.dumps({"bench": "serve", "server": name, **row}), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    for ours, peer in zip(results["kvpilot"], results["hf_transformers"], strict=True):
        print(json.dumps({"bench": "serve_ratio", "rate_rps": ours["rate_rps"],
                          "throughput_ratio": round(ours["output_tokens_per_s"] / peer["output_tokens_per_s"], 2),
                          "ttft_p50_ratio": round(peer["ttft_p50_s"] / ours["ttft_p50_s"], 2)}), flush=True)


if __name__ == "__main__":
    main()
