"""kvpilot serve against vLLM serve, in one run, on the same machine, weights and requests.

The workload: the 32 chat questions of bench/quantization.py sent at once as streaming
/v1/chat/completions requests over HTTP, greedy, `ignore_eos` + `min_tokens` = `max_tokens` so both
servers produce the same number of tokens. Both serve the embedded SmolLM2-135M-Instruct as the same
HF directory (bench/vllm_peer.py makes it from the GGUF). Both servers are started and warmed with one
round of the workload (shorter outputs); then the measured rounds alternate between them (kvpilot
first in even rounds, vLLM first in odd ones), so a machine whose speed drifts during the run (a
shared VM's does, by 20% and more) weighs on both alike. Only one server works at a time: each row
says how many CPU seconds the idle one spent during the other's round (`idle_peer_cpu_s`), and how
many the measured one's API server process (`api_cpu_s`) and its other processes (`engine_cpu_s`:
vLLM's EngineCore and worker, kvpilot's engine process) spent in it.

Counted the same way for both, from what the stream carries:
- tokens: each chunk's `logprobs.content` has one entry per token it carries (logprobs are asked
  for so a chunk that merges several tokens is counted right); their sum must equal `usage`'s
  completion_tokens, else the round fails;
- TTFT: request sent -> first chunk holding a token; ITL: the gaps between successive tokens (a
  chunk of k tokens gives k - 1 zero gaps after the gap before it);
- output tok/s: all completion tokens / wall time of the round.
One JSON line per (dtype, server, round), then one `vs_vllm_ratio` line per dtype (medians).
`--servers kvpilot` (or `vllm`) measures one alone.
Where vLLM is not installed, one line says so and the bench exits 0.

    python bench/vs_vllm.py --dtypes fp32 bf16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from http_servers import percentile, start_server
from quantization import QUESTIONS
from vllm_peer import DEFAULT_VLLM_PYTHON, embedded_hf_dir, vllm_command, vllm_env, vllm_missing, vllm_version

from kvpilot.runtime.models.parallel import free_port

NAME = "smollm2"


async def _one(client: httpx.AsyncClient, url: str, question: str, output_len: int) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": output_len,
            "min_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 0}
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                tokens = len(((choice.get("logprobs") or {}).get("content")) or [])
                times += [now] * tokens
    if usage is None or usage["completion_tokens"] != len(times):
        raise RuntimeError(f"counted {len(times)} streamed tokens, usage says {usage}")
    return {"start": start, "times": times, "prompt_tokens": usage["prompt_tokens"]}


async def _round(url: str, requests: int, output_len: int) -> dict:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=requests + 4)) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(_one(client, url, q, output_len) for q in questions))
        wall = time.perf_counter() - began
    ttft = [r["times"][0] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in itertools.pairwise(r["times"])]
    output_tokens = sum(len(r["times"]) for r in results)
    return {"requests": requests, "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "output_tokens": output_tokens, "output_tok_s": round(output_tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "itl_p50_ms": round(1000 * percentile(itl, 0.5), 1), "itl_p99_ms": round(1000 * percentile(itl, 0.99), 1),
            "wall_s": round(wall, 2)}


def kvpilot_command(model_dir: Path, port: int, dtype: str, max_model_len: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "kvpilot.runtime", "serve", "--model", str(model_dir), "--served-model-name",
            NAME, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), *extra]


def _cpu_split(proc: subprocess.Popen) -> tuple[float, float]:
    """CPU seconds so far of a server's own (API) process and of its children (vLLM's engine core and
    worker, kvpilot's engine process)."""
    tree = psutil.Process(proc.pid)
    spent = []
    for p in [tree, *tree.children(recursive=True)]:
        try:
            times = p.cpu_times()
            spent.append(times.user + times.system)
        except psutil.NoSuchProcess:
            spent.append(0.0)
    return spent[0], sum(spent[1:])


def _cpu_seconds(proc: subprocess.Popen) -> float:
    """CPU seconds so far of a server and its children."""
    return sum(_cpu_split(proc))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _start_warm(name: str, command: list[str], env: dict | None, port: int, args) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    proc = start_server(command, f"{url}/v1/models", 900, log=Path(args.log_dir) / f"{name}.log", env=env)
    asyncio.run(_round(url, args.requests, args.warm_output_len))  # warm: every batch shape, every code path
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=87)
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per server, after one warm round")
    parser.add_argument("--warm-output-len", type=int, default=16, help="tokens per request of the warm round")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--vllm-threads", type=int, help="OMP_NUM_THREADS for vLLM (default: vLLM's own choice)")
    parser.add_argument("--kvpilot-arg", action="append", default=[], help="extra `kvpilot serve` argument")
    parser.add_argument("--servers", nargs="+", default=["kvpilot", "vllm"], choices=["kvpilot", "vllm"])
    parser.add_argument("--log-dir", default="/tmp")
    args = parser.parse_args()
    if "vllm" in args.servers:
        missing = vllm_missing(args.vllm_python)
        if missing:
            print(json.dumps({"bench": "vs_vllm", "skipped": f"vLLM is not installed: {missing}"}), flush=True)
            return
        print(json.dumps({"bench": "vs_vllm", "vllm": vllm_version(args.vllm_python)}), flush=True)
    model_dir = embedded_hf_dir()
    for dtype in args.dtypes:
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for server in args.servers:
                port = free_port()
                if server == "kvpilot":
                    command, env = kvpilot_command(model_dir, port, dtype, args.max_model_len, args.kvpilot_arg), None
                else:
                    command = vllm_command(args.vllm_python, model_dir, port, dtype, NAME, args.max_model_len)
                    env = vllm_env(threads=args.vllm_threads)
                servers[server] = _start_warm(f"{server}-{dtype}", command, env, port, args)
            rows: dict[str, list[dict]] = {server: [] for server in servers}
            for i in range(args.rounds):
                for server in (list(servers) if i % 2 == 0 else list(reversed(servers))):
                    idle = [proc for name, (proc, _) in servers.items() if name != server]
                    before = sum(_cpu_seconds(proc) for proc in idle)
                    api, engine = _cpu_split(servers[server][0])
                    row = asyncio.run(_round(servers[server][1], args.requests, args.output_len))
                    api_after, engine_after = _cpu_split(servers[server][0])
                    row["api_cpu_s"], row["engine_cpu_s"] = round(api_after - api, 2), round(engine_after - engine, 2)
                    if idle:
                        row["idle_peer_cpu_s"] = round(sum(_cpu_seconds(proc) for proc in idle) - before, 2)
                    rows[server].append(row)
                    print(json.dumps({"bench": "vs_vllm", "server": server, "dtype": dtype, "round": i, **row}),
                          flush=True)
        finally:
            for proc, _ in servers.values():
                _stop(proc)
        medians = {server: {k: statistics.median(r[k] for r in rs) for k in ("output_tok_s", "ttft_p50_s")}
                   for server, rs in rows.items()}
        if len(medians) == 2:
            ours, peer = medians["kvpilot"], medians["vllm"]
            print(json.dumps({"bench": "vs_vllm_ratio", "dtype": dtype,
                              "output_tok_s_ratio": round(ours["output_tok_s"] / peer["output_tok_s"], 2),
                              "ttft_p50_ratio_vllm_over_kvpilot": round(peer["ttft_p50_s"] / ours["ttft_p50_s"], 2),
                              "kvpilot": ours, "vllm": peer}), flush=True)


if __name__ == "__main__":
    main()
