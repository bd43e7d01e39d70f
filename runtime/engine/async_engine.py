"""The engine for the server: per-request async streams over one step loop.

Model steps run in a worker thread (`asyncio.to_thread`), so the event loop keeps serving while
the model computes. The engine is only touched under `_lock`: new requests and aborts that arrive
during a step wait in `_pending_*` and are applied by the worker before the next step; an abort
that finds the engine idle frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from kvpilot.runtime.engine.llm_engine import LLMEngine
from kvpilot.runtime.engine.outputs import EngineStats, RequestOutput
from kvpilot.runtime.engine.sampling import SamplingParams

logger = logging.getLogger("kvpilot.runtime.engine.async_engine")
# Engine-wide step failures in a row after which the engine is dead for good: /health turns 503 and
# the pod's liveness probe restarts it, rather than it answering 500 to every request forever.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class RequestFailed(RuntimeError):
    """This request alone failed in the engine; the message says why. The others run on."""


class AsyncLLMEngine:
    """The `EngineClient` of one in-process `LLMEngine`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._pending_adds: list[tuple[str, list[int], SamplingParams]] = []
        self._pending_aborts: set[str] = set()
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._num_prompt_tokens: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._last_stats = engine.stats()
        self._fatal: Exception | None = None
        self._failures_in_a_row = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.engine.apply_chat_template(messages, add_generation_prompt)

    def is_ready(self) -> bool:
        return self._fatal is None

    def check_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(request_id, prompt_token_ids, params)

    def stats(self) -> EngineStats:
        """Fresh when the engine is idle, else as of the end of the last step (never blocks)."""
        if self._lock.acquire(blocking=False):
            try:
                self._last_stats = self.engine.stats()
            finally:
                self._lock.release()
        return self._last_stats

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last carries the finish reason. Raises `AdmissionError` (a
        ValueError) for a request that can never fit. Leaving the loop early aborts the request."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine has failed for good: {self._fatal}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.check_request(request_id, prompt_token_ids, params)
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request_id] = queue
        self._num_prompt_tokens[request_id] = len(prompt_token_ids)
        self._pending_adds.append((request_id, list(prompt_token_ids), params))
        self._start_loop()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)
            self._num_prompt_tokens.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """End a request (call from the event loop): its stream gets a last output with finish_reason
        "abort"; its blocks are freed now, or right after the step in flight."""
        self._pending_adds = [p for p in self._pending_adds if p[0] != request_id]
        out = None
        if self._lock.acquire(blocking=False):
            try:
                out = self.engine.abort_request(request_id)
            finally:
                self._lock.release()
        if out is None:  # mid-step, or handed to the worker and not added yet: the worker drops it
            self._pending_aborts.add(request_id)
        queue = self._streams.get(request_id)
        if queue is not None:
            num_prompt = self._num_prompt_tokens.get(request_id, 0)
            queue.put_nowait(out or RequestOutput(request_id, num_prompt, [], "", [], "", finish_reason="abort"))

    def _start_loop(self) -> None:
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        while True:
            if not self.engine.has_unfinished_requests and not self._pending_adds:
                self._wake.clear()
                await self._wake.wait()
            adds, self._pending_adds = self._pending_adds, []
            try:
                outputs = await asyncio.to_thread(self._step, adds)
            except Exception as err:  # not one request's fault (those end alone, in the step): the engine's
                self._engine_failed(err)
                if self._fatal is not None:
                    return
                continue
            self._failures_in_a_row = 0
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(RequestFailed(out.error) if out.error is not None else out)

    def _step(self, adds: list[tuple[str, list[int], SamplingParams]]) -> list[RequestOutput]:
        with self._lock:
            refused = []
            for request_id, prompt_token_ids, params in adds:
                if request_id not in self._pending_aborts:
                    try:
                        self.engine.add_request(request_id, prompt_token_ids, params)
                    except Exception as err:  # checked at generate(); refused alone should it still fail
                        refused.append(RequestOutput(request_id, len(prompt_token_ids), [], "", [], "",
                                                     finish_reason="error", error=str(err)))
            self._apply_pending_aborts()
            outputs = refused + self.engine.step()
            self._apply_pending_aborts()
            self._last_stats = self.engine.stats()
            return outputs

    def _apply_pending_aborts(self) -> None:
        while self._pending_aborts:
            self.engine.abort_request(self._pending_aborts.pop())

    def _engine_failed(self, err: Exception) -> None:
        """A step failed for a reason no single request owns (a bug, a device fault): log it with its
        traceback, end the requests that were in the engine (their cache state is unknown), and keep
        serving; after MAX_CONSECUTIVE_STEP_FAILURES in a row the engine is dead and says so."""
        self._failures_in_a_row += 1
        logger.error("engine step failed (%d in a row); ending the %d requests in the engine",
                     self._failures_in_a_row, len(self.engine.requests), exc_info=err)
        with self._lock:
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
        waiting = {request_id for request_id, _, _ in self._pending_adds}  # arrived during the step: not hit
        failed = [request_id for request_id in self._streams if request_id not in waiting]
        if self._failures_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
            self._fatal = err
            logger.critical("the engine failed %d steps in a row: /health now fails", self._failures_in_a_row)
            failed = list(self._streams)
        for request_id in failed:
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(RuntimeError(f"engine step failed: {type(err).__name__}: {err}"))

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:  # after the step in flight, if any: workers must not see the stop mid-step
            self.engine.close()
