"""OpenAI whole-response bodies as pydantic models, in the shapes of vLLM's OpenAI server (whose
finish reasons include "abort" and "error", which `openai.types` does not allow). Stream chunks stay
plain dicts: see serving.OpenAIServing.stream."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None  # logprobs.completion_logprobs
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, dict] | None] | None = None  # vLLM's extra, when asked


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[dict] | None = None  # tool_parser.ToolCall.message() each


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None  # logprobs.chat_logprobs
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    prompt_logprobs: list[dict[str, dict] | None] | None = None  # vLLM's extra, when asked
