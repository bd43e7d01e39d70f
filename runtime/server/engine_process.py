"""The engine in a process of its own (vLLM's EngineCore): the server's event loop and the engine's
step loop never wait for each other's Python.

In one process they share the GIL: each of the few hundred torch ops a step launches waits for the
event loop to let go of it, and the loop's work for every stream (SSE chunks, JSON, logprobs) sits
between two steps. Measured on 2 cores, SmolLM2-135M in bf16, 32 streaming chat requests: the same
engine gives 2x the tokens/s offline as behind the in-process server (bench/vs_vllm.py, the README).
Here the engine steps back to back in its own process while the server streams the last step's
tokens; `kvpilot serve --engine-in-process` keeps the old thread.

One duplex pipe between the two:
- to the engine: ("add", request id, prompt ids, params), ("abort", request id), ("stop",);
- from the engine: ("ready", EngineInfo) or ("failed", exception) once, after loading; then
  ("step", outputs, stats, memory figures or None) after each step or batch of messages, and
  ("fault", message, request ids, fatal) when a step fails for no single request's reason.
The engine reads its end of the pipe in a thread of its own, so a large prompt never blocks the
server's send while a step runs; the server reads its end from the event loop (`add_reader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvpilot.runtime.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES, RequestFailed
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.outputs import EngineStats, RequestOutput
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import RequestLimits
from kvpilot.runtime.memory.planner import Plan
from kvpilot.runtime.server.metrics import MemoryFigures
from kvpilot.runtime.usage import USER_ERRORS

logger = logging.getLogger("kvpilot.runtime.server.engine_process")
MEMORY_EVERY_SECONDS = 1.0  # how often the engine re-measures its memory for /metrics
STOP_SECONDS = 60.0  # the engine's time to stop its workers after "stop" before it is terminated


@dataclass
class EngineInfo:
    """What the server needs of the loaded engine: it never loads the model itself."""

    tokenizer: Any
    config: EngineConfig  # complete (EngineConfig.for_model)
    limits: RequestLimits
    source: str
    plan: Plan
    stats: EngineStats
    memory: MemoryFigures


class EngineProcess:
    """The `EngineClient` of an `LLMEngine` running in a child process (spawned: CUDA and fork do not mix).
    The constructor returns once the engine has loaded, or raises what loading raised."""

    def __init__(self, config: EngineConfig) -> None:
        context = mp.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(config, child_end), name="kvpilot-engine")
        self._process.start()
        child_end.close()
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while loading "
                               "(its log is above)") from None
        if kind == "failed":
            self._process.join()
            raise payload
        info: EngineInfo = payload
        self.tokenizer, self.config, self.limits, self.plan = info.tokenizer, info.config, info.limits, info.plan
        self.source = info.source
        self._stats, self._memory = info.stats, info.memory
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._last: dict[str, RequestOutput] = {}
        self._num_prompt_tokens: dict[str, int] = {}
        self._fatal: Exception | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- EngineClient ---------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        from kvpilot.runtime.engine.llm_engine import chat_token_ids

        return chat_token_ids(self.tokenizer, messages, add_generation_prompt)

    def is_ready(self) -> bool:
        return self._fatal is None

    def check_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.limits.check(request_id, prompt_token_ids, params)

    def stats(self) -> EngineStats:
        """As of the engine's last step (or its last batch of messages while idle)."""
        return self._stats

    def memory_figures(self) -> MemoryFigures:
        return self._memory

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self._fatal is not None:
            raise RuntimeError(f"the engine has failed for good: {self._fatal}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(request_id, prompt_token_ids, params)
        self._watch()
        stream: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request_id] = stream
        self._num_prompt_tokens[request_id] = len(prompt_token_ids)
        self._send(("add", request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)
            self._last.pop(request_id, None)
            self._num_prompt_tokens.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """End a request now: its stream gets a last output with finish_reason "abort" at once; the
        engine frees its blocks when it reads the message (between two steps)."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._send(("abort", request_id))
        last = self._last.get(request_id)
        stream.put_nowait(RequestOutput(request_id, self._num_prompt_tokens.get(request_id, 0), [], "",
                                        list(last.token_ids) if last else [], last.text if last else "",
                                        finish_reason="abort"))

    async def shutdown(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._loop = None
        if self._process.is_alive():
            self._send(("stop",))
            await asyncio.to_thread(self._process.join, STOP_SECONDS)
        if self._process.is_alive():
            logger.error("the engine process did not stop within %.0f s: terminating it", STOP_SECONDS)
            self._process.terminate()
            await asyncio.to_thread(self._process.join)
        self._conn.close()

    # --- the pipe -------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Read the engine's messages on the running loop (a server has one; a test may run several in turn)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            self._loop = loop
            loop.add_reader(self._conn.fileno(), self._receive)

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError) as err:
            self._engine_gone(err)

    def _receive(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(*self._conn.recv())
        except (EOFError, OSError) as err:
            self._engine_gone(err)

    def _dispatch(self, kind: str, *payload: Any) -> None:
        if kind == "step":
            outputs, self._stats, memory = payload
            self._memory = memory or self._memory
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    self._last[out.request_id] = out
                    stream.put_nowait(RequestFailed(out.error) if out.error is not None else out)
        elif kind == "fault":
            message, request_ids, fatal = payload
            failed = list(self._streams) if fatal else request_ids
            if fatal:
                self._fatal = RuntimeError(message)
                logger.critical("the engine failed %d steps in a row: /health now fails", MAX_CONSECUTIVE_STEP_FAILURES)
            for request_id in failed:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(RuntimeError(f"engine step failed: {message}"))

    def _engine_gone(self, err: BaseException) -> None:
        """The engine process died (killed, out of memory): every stream ends with the reason, /health fails."""
        if self._fatal is not None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._process.join(timeout=5)
        self._fatal = RuntimeError(f"the engine process exited (code {self._process.exitcode}): {err!r}")
        logger.critical("%s: /health now fails", self._fatal)
        for stream in self._streams.values():
            stream.put_nowait(self._fatal)


# --- the engine's side ------------------------------------------------------------------------------
def _engine_main(config: EngineConfig, conn) -> None:
    """The child: load, report, then step until told to stop or until the server is gone."""
    from kvpilot.runtime.engine.config import memory_plan
    from kvpilot.runtime.engine.llm_engine import LLMEngine
    from kvpilot.runtime.server.memory_report import memory_figures

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server drains, then stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
        plan = memory_plan(engine.facts, engine.config)
        info = EngineInfo(engine.tokenizer, engine.config, engine.limits, str(engine.loaded.source), plan,
                          engine.stats(), memory_figures(engine, plan))
    except Exception as err:
        if not isinstance(err, USER_ERRORS):  # a user's mistake is one line, from the server; a bug keeps its traceback
            logger.exception("the engine failed to load")
        conn.send(("failed", _portable(err)))
        return
    try:
        conn.send(("ready", info))
        EngineCore(engine, conn, lambda: memory_figures(engine, plan)).run()
    except (BrokenPipeError, EOFError, OSError):  # the server is gone mid-send
        engine.close()


def _portable(err: Exception) -> Exception:
    """`err` if it survives the pipe as itself, else a RuntimeError with its words."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


class EngineCore:
    """The step loop of the child: messages in between steps, one "step" message out after each."""

    def __init__(self, engine, conn, measure_memory) -> None:
        self.engine, self.conn, self.measure_memory = engine, conn, measure_memory
        self.inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.failures_in_a_row = 0
        self.memory_at = time.monotonic()
        threading.Thread(target=self._read, name="engine-inbox", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self.inbox.put(self.conn.recv())
        except (EOFError, OSError):  # the server is gone: stop
            self.inbox.put(("stop",))

    def run(self) -> None:
        engine = self.engine
        while True:
            messages = [] if engine.has_unfinished_requests else [self.inbox.get()]  # idle: wait for work
            with contextlib.suppress(queue.Empty):
                while True:
                    messages.append(self.inbox.get_nowait())
            outputs: list[RequestOutput] = []
            for kind, *payload in messages:
                if kind == "stop":
                    engine.close()
                    return
                if kind == "add":
                    outputs += self._add(*payload)
                elif kind == "abort":
                    engine.abort_request(payload[0])  # the server has ended that stream already
            if engine.has_unfinished_requests and not self._step(outputs):
                continue
            self._send_step(outputs)

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[RequestOutput]:
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except Exception as err:  # checked by the server already; refused alone should it still fail
            return [RequestOutput(request_id, len(prompt_token_ids), [], "", [], "", finish_reason="error",
                                  error=str(err))]
        return []

    def _step(self, outputs: list[RequestOutput]) -> bool:
        """One engine step, its outputs appended; False when it failed (the server has been told)."""
        try:
            outputs += self.engine.step()
        except Exception as err:
            self.failures_in_a_row += 1
            logger.error("engine step failed (%d in a row); ending the %d requests in the engine",
                         self.failures_in_a_row, len(self.engine.requests), exc_info=err)
            request_ids = list(self.engine.requests)
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            fatal = self.failures_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES
            self.conn.send(("fault", f"{type(err).__name__}: {err}", request_ids, fatal))
            self._send_step(outputs)
            return False
        self.failures_in_a_row = 0
        return True

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        memory = None
        if time.monotonic() - self.memory_at >= MEMORY_EVERY_SECONDS:
            memory, self.memory_at = self.measure_memory(), time.monotonic()
        self.conn.send(("step", outputs, self.engine.stats(), memory))
