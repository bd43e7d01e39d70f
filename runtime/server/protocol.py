"""OpenAI API request bodies (plus vLLM's extra sampling fields) and the error shape.

Unknown fields are ignored, as OpenAI's own server does for forward compatibility; wrong types
and out-of-range values are 400 errors that name the field, and so are the known fields this server
does not run (logit_bias, best_of, ...: NOT_RUN). Structured output and tool calling fields are
validated in structured.py and tools.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kvpilot.runtime.engine.sampling import MAX_SEED, SamplingParams, StructuredOutputs
from kvpilot.runtime.server import admission
from kvpilot.runtime.server.structured import StructuredRequest
from kvpilot.runtime.server.tools import ToolRequest


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


def error_json(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": ErrorBody(message=message, type=kind, param=param, code=status).model_dump()}


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields that change what comes back and that this server does not run: a request using one is
# refused with a 400 naming it, never answered as if the field were absent. Values meaning "off" pass.
NOT_RUN = {
    "functions": ("function calling", (None, [])),
    "function_call": ("function calling", (None, "none")),
    "logit_bias": ("logit_bias", (None, {})),
    "best_of": ("best_of", (None, 1)),
    "suffix": ("suffix (insertion)", (None, "")),
}


class _SamplingRequest(StructuredRequest):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(None, max_length=admission.MAX_STOP_STRINGS)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator(*NOT_RUN)
    @classmethod
    def _not_run(cls, value: Any, info: ValidationInfo) -> Any:
        feature, off = NOT_RUN[info.field_name]
        if value not in off:
            raise ValueError(f"{feature} is not supported by this server; send the request without "
                             f"{info.field_name}")
        return value

    # --- request isolation (#16): checks across fields; each lives in admission.py ---------------
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return admission.refuse_lone_surrogates(data)

    @model_validator(mode="after")
    def _consistent(self) -> _SamplingRequest:
        admission.check_seed(self.seed, self.n)
        admission.check_min_tokens(self.min_tokens, self.max_tokens)
        admission.check_stream_options(self.stream, self.stream_options)
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs: not available when streaming")
        return self

    def engine_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None, seed_offset: int = 0,
                        structured: StructuredOutputs | None = None) -> SamplingParams:
        """Engine parameters for choice number `seed_offset` of `n` (each choice its own seed); `structured`:
        the output constraint when the server decided it (tool calling), else the request's own."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=None if self.seed is None else self.seed + seed_offset,
            stop=self.stop_list(), stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logprobs=logprobs, structured=structured or self.structured(),
            include_stop_str_in_output=self.include_stop_str_in_output,
            prompt_logprobs=self.engine_prompt_logprobs(),
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _batch(self) -> CompletionRequest:
        admission.check_batch(len(self.prompts()), self.n)
        return self

    def engine_prompt_logprobs(self) -> int | None:
        """echo with logprobs reports the prompt's logprobs too."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch: one text or token-id list each (a single prompt is a batch of one)."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"messages: content part of type {part.get('type')!r} is not supported")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(ToolRequest, _SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat_consistent(self) -> ChatCompletionRequest:
        admission.check_min_tokens(self.min_tokens, self.max_completion_tokens, "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return admission.refuse_lone_surrogates(data)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
