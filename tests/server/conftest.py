"""A live kvpilot server on a real socket (uvicorn in a thread) over the real SmolLM2 model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
import uvicorn

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

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="session")
def live() -> Iterator[Live]:
    loaded = load_model(None, torch.float32, "cpu", MAX_MODEL_LEN)
    config = EngineConfig(device="cpu", num_kv_blocks=NUM_KV_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          max_num_seqs=16, max_num_batched_tokens=512)
    engine = AsyncLLMEngine(LLMEngine(config, loaded=loaded))
    plan = memory_plan(loaded.facts, engine.engine.config)
    app = build_app(engine, ServerConfig(MODEL), lambda: memory_figures(engine.engine, plan))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Live(f"http://127.0.0.1:{port}", app, engine)
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def http(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client
