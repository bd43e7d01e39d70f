"""From OpenAI requests to engine requests and back: prompts, length checks, `n` choices, streaming
as server-sent events, logprobs, usage, aborts when the client goes away, per-request metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from kvpilot.runtime.engine.client import EngineClient
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.server.metrics import ServerMetrics
from kvpilot.runtime.server.protocol import ChatMessage
from kvpilot.runtime.server.tool_parser import ChatTools
from kvpilot.runtime.server.tools import Tool, render_chat


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)  # per token: (token_id, logprob, [(token_id, logprob), ...])
    finish_reason: str | None = None


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class OpenAIServing:
    """The OpenAI API over an engine: prompts in, choices and streams out."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: ServerMetrics) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.tokenizer = engine.tokenizer

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

    # --- running --------------------------------------------------------------------------------
    async def _run(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int,
                   queue: asyncio.Queue) -> None:
        arrival = time.perf_counter()
        token_times: list[float] = []
        last = None
        try:
            async for last in self.engine.generate(request_id, prompt_ids, params):
                if last.new_token_ids:
                    token_times.append(time.perf_counter())
                await queue.put((index, last))
        except Exception as err:  # admission errors and engine faults reach the client as errors
            await queue.put((index, err))
        finally:
            queue.put_nowait((index, None))
            reason = (last.finish_reason if last is not None else None) or "abort"
            self.metrics.observe_request(reason, arrival, token_times[0] if token_times else None, token_times,
                                         time.perf_counter(), getattr(last, "queue_seconds", None))

    def _start(self, request_id: str, prompt_ids: list[int], params: list[SamplingParams]):
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{i}" for i in range(len(params))]
        tasks = [asyncio.create_task(self._run(rid, prompt_ids, p, i, queue))
                 for i, (rid, p) in enumerate(zip(ids, params, strict=True))]
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

    async def collect(self, request: Request, request_id: str, prompt_ids: list[int],
                      params: list[SamplingParams]) -> list[Choice]:
        queue, ids, tasks = self._start(request_id, prompt_ids, params)
        watcher = asyncio.create_task(_wait_disconnect(request))
        watcher.add_done_callback(lambda _: self._abort(ids, tasks))
        choices = [Choice(i) for i in range(len(params))]
        try:
            async for index, out in self._outputs(queue, len(params)):
                _accumulate(choices[index], out)
        finally:
            watcher.cancel()
            self._abort(ids, tasks)
        return choices

    async def stream(self, request_id: str, obj: str, prompt_ids: list[int], params: list[SamplingParams],
                     include_usage: bool, chat: bool, tools: ChatTools | None = None) -> AsyncIterator[str]:
        queue, ids, tasks = self._start(request_id, prompt_ids, params)
        created, completion_tokens = int(time.time()), 0
        head = {"id": request_id, "object": obj, "created": created, "model": self.model_name}
        try:
            if chat:
                for i in range(len(params)):
                    yield _sse(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            async for index, out in self._outputs(queue, len(params)):
                completion_tokens += len(out.new_token_ids)
                if not out.new_text and not out.finish_reason and not out.new_token_ids:
                    continue
                piece = Choice(index)
                _accumulate(piece, out)
                choice = {"index": index, "finish_reason": out.finish_reason}
                if chat:
                    delta, choice["finish_reason"] = (tools or ChatTools.none()).delta(
                        index, out.new_text, out.finish_reason)
                    choice |= {"delta": delta,
                               "logprobs": _chat_logprobs(piece, self.tokenizer) if piece.logprobs else None}
                else:
                    choice |= {"text": out.new_text,
                               "logprobs": _completion_logprobs(piece, self.tokenizer) if piece.logprobs else None}
                yield _sse(head | {"choices": [choice]})
            if include_usage:
                yield _sse(head | {"choices": [], "usage": _usage(len(prompt_ids), completion_tokens)})
            yield _sse("[DONE]")
        except ApiError as err:
            yield _sse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}})
            yield _sse("[DONE]")
        finally:
            self._abort(ids, tasks)  # a client gone mid-stream lands here: its blocks free at once


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
    if out.finish_reason:
        choice.finish_reason = out.finish_reason


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_str(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _chat_logprobs(choice: Choice, tokenizer) -> dict:
    content = []
    for token_id, logprob, top in choice.logprobs:
        text = _token_str(tokenizer, token_id)
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := _token_str(tokenizer, tid)), "logprob": lp,
                                          "bytes": list(t.encode())} for tid, lp in top]})
    return {"content": content}


def _completion_logprobs(choice: Choice, tokenizer) -> dict:
    tokens, offsets, offset = [], [], 0
    for token_id, _, _ in choice.logprobs:
        text = _token_str(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in choice.logprobs],
            "top_logprobs": [{_token_str(tokenizer, tid): lp for tid, lp in top} for _, _, top in choice.logprobs],
            "text_offset": offsets}


def completion_response(request_id: str, model: str, prompt_tokens: int, choices: list[Choice],
                        tokenizer) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": _completion_logprobs(c, tokenizer) if c.logprobs else None} for c in choices],
            "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}


def chat_response(request_id: str, model: str, prompt_tokens: int, choices: list[Choice], tokenizer,
                  tools: ChatTools | None = None) -> dict:
    tools = tools or ChatTools.none()
    answers = [tools.message(c.text, c.finish_reason) for c in choices]
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": message,
                         "logprobs": _chat_logprobs(c, tokenizer) if c.logprobs else None,
                         "finish_reason": reason} for c, (message, reason) in zip(choices, answers, strict=True)],
            "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}

