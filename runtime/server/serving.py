"""From OpenAI requests to engine requests and back: prompts, length checks, `n` choices of one or
more prompts, streaming as server-sent events, logprobs, usage, aborts when the client goes away
(or the server's grace ends), per-request metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from kvpilot.runtime.engine.client import EngineClient
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.sequence import TokenLogprob
from kvpilot.runtime.server.logprobs import TokenBytes, chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from kvpilot.runtime.server.metrics import ServerMetrics
from kvpilot.runtime.server.protocol import ChatMessage, error_json
from kvpilot.runtime.server.responses import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from kvpilot.runtime.server.tool_parser import ChatTools
from kvpilot.runtime.server.tools import Tool, render_chat


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    """One engine request: choice `index` of the response, for one prompt."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo: str = ""  # the prompt's text, put before the completion (completions' echo)
    echo_logprobs: bool = False  # echo with logprobs: the prompt tokens' logprobs come first
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field in the response


@dataclass
class Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class OpenAIServing:
    """The OpenAI API over an engine: prompts in, choices and streams out."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: ServerMetrics) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.tokenizer = engine.tokenizer
        self.names = TokenBytes(self.tokenizer)
        self.running: set[str] = set()  # engine request ids in flight: what the end of a drain aborts

    # --- prompts -------------------------------------------------------------------------------
    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_prompt(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode_text(prompt)
        else:
            ids = [int(t) for t in prompt]
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
        if not ids:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        return ids

    def encode_chat(self, messages: list[ChatMessage], tools: list[Tool] | None = None) -> list[int]:
        try:
            conversation = [{"role": m.role, "content": m.text(), "tool_calls": m.tool_calls,
                             "tool_call_id": m.tool_call_id} for m in messages]
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from None
        return render_chat(self.tokenizer, conversation, tools or [])  # tools.py: tool turns, tool prompt

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """max_tokens to use; 400 naming both numbers when prompt + completion exceed the model length."""
        limit = self.engine.max_model_len
        if max_tokens is None:
            if prompt_tokens >= limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                    f"prompt has {prompt_tokens} tokens, leaving no room for a completion.",
                               param="messages")
            return limit - prompt_tokens
        if prompt_tokens + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
                                f"for the completion). Reduce the prompt or max_tokens.", param="max_tokens")
        return max_tokens

    def admit(self, request_id: str, jobs: list[Job]) -> None:
        """The engine's own checks, before anything is sent back: a stream then starts only for a
        request the engine will run (a refusal is a 400, not an error event after a 200)."""
        for job in jobs:
            try:
                self.engine.check_request(f"{request_id}-{job.index}", job.prompt_ids, job.params)
            except ValueError as err:
                raise ApiError(400, str(err)) from None

    # --- running --------------------------------------------------------------------------------
    async def _run(self, request_id: str, job: Job, queue: asyncio.Queue) -> None:
        arrival = time.perf_counter()
        token_times: list[float] = []
        last = None
        self.running.add(request_id)
        try:
            async for last in self.engine.generate(request_id, job.prompt_ids, job.params):
                if last.new_token_ids:
                    token_times.append(time.perf_counter())
                await queue.put((job.index, last))
        except Exception as err:  # admission errors and engine faults reach the client as errors
            await queue.put((job.index, err))
        finally:
            self.running.discard(request_id)
            queue.put_nowait((job.index, None))
            reason = (last.finish_reason if last is not None else None) or "abort"
            self.metrics.observe_request(reason, arrival, token_times[0] if token_times else None, token_times,
                                         time.perf_counter(), getattr(last, "queue_seconds", None))

    def _start(self, request_id: str, jobs: list[Job]):
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{job.index}" for job in jobs]
        tasks = [asyncio.create_task(self._run(rid, job, queue)) for rid, job in zip(ids, jobs, strict=True)]
        return queue, ids, tasks

    async def _outputs(self, queue: asyncio.Queue, n: int) -> AsyncIterator[tuple[int, object]]:
        remaining = n
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise _as_api_error(item)
            else:
                yield index, item

    def _abort(self, ids: list[str], tasks: list[asyncio.Task]) -> None:
        for rid, task in zip(ids, tasks, strict=True):
            if not task.done():
                self.engine.abort(rid)

    def abort_all(self) -> None:
        """End every request in flight now: each stream gets finish_reason "abort" and [DONE]."""
        for request_id in list(self.running):
            self.engine.abort(request_id)

    async def collect(self, request: Request, request_id: str, jobs: list[Job]) -> list[Choice]:
        queue, ids, tasks = self._start(request_id, jobs)
        watcher = asyncio.create_task(_wait_disconnect(request))
        watcher.add_done_callback(lambda _: self._abort(ids, tasks))
        choices = {job.index: Choice(job.index, text=job.echo) for job in jobs}
        try:
            async for index, out in self._outputs(queue, len(jobs)):
                _accumulate(choices[index], out)
        finally:
            watcher.cancel()
            self._abort(ids, tasks)
        return [choices[job.index] for job in jobs]

    async def stream(self, request_id: str, jobs: list[Job], include_usage: bool, chat: bool,
                     tools: ChatTools | None = None) -> AsyncIterator[str]:
        """Server-sent events. Chunks are plain dicts through json.dumps, not the response models: per
        token, the models cost about twice as much (bench/sse_chunks.py). `tools`: tool calls in the
        text become `delta.tool_calls`."""
        queue, ids, tasks = self._start(request_id, jobs)
        completion_tokens = 0
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        try:
            if chat:
                for job in jobs:
                    yield _sse(head | {"choices": [{"index": job.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            to_echo = {job.index: job for job in jobs if job.echo}  # sent with the first output: its logprobs
            async for index, out in self._outputs(queue, len(jobs)):
                if index in to_echo:
                    job = to_echo.pop(index)
                    yield _sse(head | {"choices": [{"index": index, "text": job.echo, "finish_reason": None,
                                                    "logprobs": self._echo_logprobs(job, out.prompt_logprobs)}]})
                completion_tokens += len(out.new_token_ids)
                if not out.new_text and not out.finish_reason and not out.new_token_ids:
                    continue
                choice = {"index": index, "finish_reason": out.finish_reason}
                if chat:
                    delta, choice["finish_reason"] = (tools or ChatTools.none()).delta(
                        index, out.new_text, out.finish_reason)
                    choice |= {"delta": delta,
                               "logprobs": chat_logprobs(out.logprobs, self.names) if out.logprobs else None}
                else:
                    choice |= {"text": out.new_text, "logprobs": self._completion_logprobs(
                        out.new_token_ids, out.logprobs) if out.logprobs else None}
                yield _sse(head | {"choices": [choice]})
            if include_usage:
                usage = Usage.of(_prompt_tokens(jobs), completion_tokens).model_dump()
                yield _sse(head | {"choices": [], "usage": usage})
            yield _sse("[DONE]")
        except ApiError as err:
            yield _sse(error_json(err.status, err.message, err.kind, err.param))
            yield _sse("[DONE]")
        finally:
            self._abort(ids, tasks)  # a client gone mid-stream lands here: its blocks free at once

    def _completion_logprobs(self, token_ids: list[int], entries: list[TokenLogprob], start: int = 0) -> dict:
        return completion_logprobs(token_ids, entries, self.names, start)

    def _echo_logprobs(self, job: Job, prompt_logprobs: list | None) -> dict | None:
        if not job.echo_logprobs or prompt_logprobs is None:
            return None
        return completion_logprobs(job.prompt_ids, prompt_logprobs, self.names)

    def _choice_logprobs(self, job: Job, choice: Choice) -> dict | None:
        """Completions' logprobs: the prompt's first when echoed, then the completion's."""
        if job.echo_logprobs and choice.prompt_logprobs is not None:
            return completion_logprobs(job.prompt_ids + choice.token_ids, choice.prompt_logprobs + choice.logprobs,
                                       self.names)
        if choice.logprobs:
            return self._completion_logprobs(choice.token_ids, choice.logprobs, len(job.echo))
        return None

    def _prompt_logprobs(self, job: Job, choice: Choice) -> list | None:
        if not job.prompt_logprobs or choice.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(job.prompt_ids, choice.prompt_logprobs, self.names)

    # --- whole responses ------------------------------------------------------------------------
    def completion_response(self, request_id: str, jobs: list[Job], choices: list[Choice]) -> CompletionResponse:
        return CompletionResponse(
            id=request_id, model=self.model_name, usage=Usage.of(_prompt_tokens(jobs), _completion_tokens(choices)),
            choices=[CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                      logprobs=self._choice_logprobs(job, c),
                                      prompt_logprobs=self._prompt_logprobs(job, c))
                     for job, c in zip(jobs, choices, strict=True)])

    def chat_response(self, request_id: str, jobs: list[Job], choices: list[Choice],
                      tools: ChatTools | None = None) -> ChatCompletionResponse:
        answers = [(tools or ChatTools.none()).message(c.text, c.finish_reason) for c in choices]
        return ChatCompletionResponse(
            id=request_id, model=self.model_name, usage=Usage.of(_prompt_tokens(jobs), _completion_tokens(choices)),
            choices=[ChatChoice(index=c.index, message=ChatMessageOut(content=message["content"],
                                                                      tool_calls=message.get("tool_calls")),
                                finish_reason=reason,
                                logprobs=chat_logprobs(c.logprobs, self.names) if c.logprobs else None)
                     for c, (message, reason) in zip(choices, answers, strict=True)],
            prompt_logprobs=self._prompt_logprobs(jobs[0], choices[0]))


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _as_api_error(err: Exception) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ValueError):  # the engine's admission errors are ValueErrors naming the numbers
        return ApiError(400, str(err))
    return ApiError(500, f"internal error: {err}", "server_error")


def _accumulate(choice: Choice, out) -> None:
    choice.token_ids += list(out.new_token_ids)
    choice.text += out.new_text
    if out.logprobs:
        choice.logprobs += list(out.logprobs)
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finish_reason:
        choice.finish_reason = out.finish_reason


def _prompt_tokens(jobs: list[Job]) -> int:
    """Each prompt counted once, however many choices it has (as vLLM counts them)."""
    return sum(len(ids) for ids in {id(job.prompt_ids): job.prompt_ids for job in jobs}.values())


def _completion_tokens(choices: list[Choice]) -> int:
    return sum(len(c.token_ids) for c in choices)
