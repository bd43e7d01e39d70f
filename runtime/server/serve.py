"""`kvpilot serve`: load a model, print its memory plan, serve the OpenAI API until SIGTERM.

`kvpilot up` (kvpilot.cli.up) plans a manifest for this machine and serves it through `serve_engine`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn

from kvpilot.runtime.contract import HTTP_PORT
from kvpilot.runtime.server.engine_flags import add_engine_flags, engine_config

DEFAULT_GRACE_SECONDS = 30.0  # Kubernetes' default terminationGracePeriodSeconds


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=HTTP_PORT)
    p.add_argument("--api-key", default=os.environ.get("KVPILOT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KVPILOT_API_KEY)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get HTTP 429")
    p.add_argument("--engine-in-process", action="store_true",
                   help="step the engine in a thread of the server's process instead of a process of its own "
                        "(they then share the GIL: slower under load)")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_GRACE_SECONDS,
                   help="seconds in-flight requests get to finish after SIGTERM")


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API",
                       description="Serve a HF directory or GGUF file; with no --model, the embedded "
                                   "SmolLM2-135M-Instruct.")
    add_engine_flags(p)
    add_server_flags(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    config = engine_config(args)
    if config.node_rank > 0:  # a LeaderWorkerSet worker pod: its ranks only, no server
        from kvpilot.runtime.engine.workers import run_worker_node

        return run_worker_node(config)
    return serve_engine(config, args.served_model_name, args)


def _default_name(source: Path) -> str:
    name = source.name.removesuffix(".gguf")
    return name.split(".")[0] if source.suffix == ".gguf" else name


def serve_engine(config, name: str | None, args: argparse.Namespace) -> int:
    """Serve until SIGTERM; `name` None: the model's own. The engine loads in a process of its own
    (runtime/server/engine_process.py), or in this one with --engine-in-process."""
    from rich.console import Console

    from kvpilot.runtime.memory.plan_view import render_plan
    from kvpilot.runtime.server.app import ServerConfig, build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.engine_in_process:
        engine, plan, memory, source = _in_process_engine(config)
    else:
        from kvpilot.runtime.server.engine_process import EngineProcess

        engine = EngineProcess(config)
        plan, memory, source = engine.plan, engine.memory_figures, Path(engine.source)
    name = name or _default_name(source)
    render_plan(plan, Console(stderr=True))
    app = build_app(engine, ServerConfig(name, args.api_key, args.max_waiting), memory)

    @asynccontextmanager
    async def lifespan(_app):
        url = f"http://{args.host}:{args.port}"
        print(f"kvpilot: serving {name} at {url}/v1 (OpenAI API); metrics at {url}/metrics", flush=True)
        yield
        await engine.shutdown()

    app.router.lifespan_context = lifespan
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.shutdown_grace), app)
    asyncio.run(server.serve())
    return 0


def _in_process_engine(config):
    from kvpilot.runtime.engine.async_engine import AsyncLLMEngine
    from kvpilot.runtime.engine.config import memory_plan
    from kvpilot.runtime.engine.llm_engine import LLMEngine
    from kvpilot.runtime.engine.threads import set_cpu_threads
    from kvpilot.runtime.server.memory_report import memory_figures

    core = LLMEngine(config)
    if core.device.type == "cpu":
        set_cpu_threads(shares_process=True)  # a core for the event loop (engine/threads.py)
    plan = memory_plan(core.facts, core.config)
    return AsyncLLMEngine(core), plan, lambda: memory_figures(core, plan), core.loaded.source


ABORT_MARGIN_SECONDS = 1.0  # before the grace ends, what is still running is aborted: time to send the ends


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but /ready turns 503 the moment SIGTERM arrives, so Kubernetes takes the pod
    out of the Service while in-flight requests finish within the grace period. Requests still running
    shortly before the grace ends are aborted (`app.state.abort_all`): each stream ends with
    finish_reason "abort" and [DONE] instead of being cut mid-way."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.kvpilot_app = app

    async def shutdown(self, sockets=None) -> None:
        grace = self.config.timeout_graceful_shutdown
        timer = None
        if grace is not None:
            delay = max(0.0, grace - min(ABORT_MARGIN_SECONDS, grace / 2))
            timer = asyncio.get_running_loop().call_later(delay, self.kvpilot_app.state.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    def handle_exit(self, sig: int, frame) -> None:
        self.kvpilot_app.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # drained on purpose: exit 0 instead of re-raising SIGTERM
