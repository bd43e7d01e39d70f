"""What pydantic models would cost on the streaming path, and why its chunks stay plain dicts: one
stream's chunks (role chunk, one chunk per token, the finish) as models in the shape of
`runtime/server/responses.py`, serialised by `model_dump_json`, against the dicts + `json.dumps`
that `serving.OpenAIServing.stream` builds (the peer), in the same run. One JSON line.

    python bench/sse_chunks.py [--tokens 256] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]


def with_dicts(tokens: int) -> int:
    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "smollm2"}
    size = len(json.dumps(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]}))
    for i in range(tokens):
        reason = "length" if i == tokens - 1 else None
        size += len(json.dumps(head | {"choices": [{"index": 0, "finish_reason": reason,
                                                    "delta": {"content": " word"}, "logprobs": None}]}))
    return size


def with_models(tokens: int) -> int:
    head = {"id": "chatcmpl-x", "model": "smollm2", "created": 0}
    size = len(ChatCompletionChunk(**head, choices=[ChatChunkChoice(
        index=0, delta=ChatDelta(role="assistant", content=""))]).model_dump_json())
    for i in range(tokens):
        reason = "length" if i == tokens - 1 else None
        size += len(ChatCompletionChunk(**head, choices=[ChatChunkChoice(
            index=0, delta=ChatDelta(content=" word"), finish_reason=reason)]).model_dump_json())
    return size


def per_stream_seconds(make, tokens: int, repeats: int) -> float:
    make(tokens)  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        make(tokens)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    dicts = per_stream_seconds(with_dicts, args.tokens, args.repeats)
    models = per_stream_seconds(with_models, args.tokens, args.repeats)
    print(json.dumps({"bench": "sse_chunks", "tokens": args.tokens, "dicts_ms_per_stream": round(dicts * 1e3, 3),
                      "models_ms_per_stream": round(models * 1e3, 3), "models_over_dicts": round(models / dicts, 2),
                      "models_us_per_token": round(models / args.tokens * 1e6, 2)}))


if __name__ == "__main__":
    main()
