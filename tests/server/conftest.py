"""Live kvpilot servers on real sockets (uvicorn in a thread) over the real SmolLM2 model.

The model and its `LLMEngine` load once per session; each server gets its own app (and async
engine, bound to its own event loop), so a test that needs other limits builds a fresh server
(`serve`) instead of changing a live one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
import uvicorn
from eventually import eventually_sync

from kvpilot.runtime.engine.async_engine import AsyncLLMEngine
from kvpilot.runtime.engine.config import EngineConfig, memory_plan
from kvpilot.runtime.engine.llm_engine import LLMEngine
from kvpilot.runtime.loading.loader import load_model
from kvpilot.runtime.server.app import ServerConfig, build_app
from kvpilot.runtime.server.memory_report import memory_figures

MODEL = "smollm2"
MAX_MODEL_LEN = 512
NUM_KV_BLOCKS = 256  # 4096 token slots: room for 32 short streams at once


@dataclass
class Live:
    url: str
    app: object
    engine: AsyncLLMEngine
    server: uvicorn.Server

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="session")
def llm_engine() -> LLMEngine:
    loaded = load_model(None, torch.float32, "cpu", MAX_MODEL_LEN)
    config = EngineConfig(device="cpu", num_kv_blocks=NUM_KV_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          max_num_seqs=16, max_num_batched_tokens=512)
    return LLMEngine(config, loaded=loaded)


@contextlib.contextmanager
def running_server(llm_engine: LLMEngine, config: ServerConfig,
                   server_class: Callable[..., uvicorn.Server] | None = None, **uvicorn_options) -> Iterator[Live]:
    """A fresh app over `llm_engine`, served until the block ends. `server_class(uvicorn_config, app)`
    builds the server instead of plain uvicorn (serve.DrainingServer)."""
    engine = AsyncLLMEngine(llm_engine)
    plan = memory_plan(llm_engine.loaded.facts, llm_engine.config)
    app = build_app(engine, config, lambda: memory_figures(llm_engine, plan))
    uv_config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options)
    server = server_class(uv_config, app) if server_class else uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("the test server's thread ended before it started")
        return server.started

    eventually_sync(started, 30, "the test server starts")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live(f"http://127.0.0.1:{port}", app, engine, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def live(llm_engine: LLMEngine) -> Iterator[Live]:
    with running_server(llm_engine, ServerConfig(MODEL)) as server:
        yield server


@pytest.fixture
def serve(llm_engine: LLMEngine) -> Iterator[Callable[..., Live]]:
    """`serve(ServerConfig(...))`: a fresh server with other limits, stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda config, **kw: stack.enter_context(running_server(llm_engine, config, **kw))


@pytest.fixture
def http(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client
