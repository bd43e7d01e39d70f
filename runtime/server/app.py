"""The OpenAI-compatible HTTP server: FastAPI routes over the async engine.

One process per replica. The engine steps in its own thread; handlers only await its streams,
so the event loop never blocks on the model. Errors use OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvpilot.runtime.engine.client import EngineClient
from kvpilot.runtime.server.metrics import MemoryFigures, ServerMetrics, gpu_memory_info
from kvpilot.runtime.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from kvpilot.runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_json,
)
from kvpilot.runtime.server.serving import ApiError, OpenAIServing, chat_response, completion_response
from kvpilot.runtime.server.tool_parser import chat_tools

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 128k-token prompt is ~0.5 MiB of text; 8 MiB leaves room for token ids
RETRY_AFTER_SECONDS = 1


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_waiting: int = 256  # queued requests beyond this get 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(status, message, kind, param), status_code=status, headers=headers)


def build_app(engine: EngineClient, config: ServerConfig, memory: Callable[[], MemoryFigures]) -> FastAPI:
    """The app for one engine. `memory` reports planned vs measured bytes for /metrics."""
    app = FastAPI(title="kvpilot", version="0.1.0")
    app.state.draining = False
    metrics = ServerMetrics(config.served_model_name, engine.stats, memory, gpu_memory_info)
    gen = OpenAIServing(engine, config.served_model_name, metrics)
    app.state.config = config  # read per request: limits can be changed on a live server
    app.add_middleware(BodyLimitMiddleware, config=config)
    app.add_middleware(ApiKeyMiddleware, config=config)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if p != "body"]
        param = ".".join(loc) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}")
        return _error(400, f"{param}: {message}" if param else message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 429 else None
        return _error(exc.status, exc.message, exc.kind, exc.param, headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.is_ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": config.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "kvpilot", "root": config.served_model_name, "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    def admit(model: str) -> None:
        if model != config.served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{config.served_model_name}`.", "not_found_error", "model")
        if app.state.draining:
            raise ApiError(503, "the server is shutting down", "server_error")
        if engine.stats().num_waiting >= config.max_waiting:
            raise ApiError(429, f"the queue is full ({config.max_waiting} requests waiting); retry later",
                           "rate_limit_error")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        admit(body.model)
        prompt_ids = gen.encode_prompt(body.prompt)
        max_tokens = gen.check_length(len(prompt_ids), body.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        params = [body.sampling_params(max_tokens, body.logprobs, i) for i in range(body.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(gen.stream(request_id, "text_completion", prompt_ids, params, include_usage,
                                                chat=False), media_type="text/event-stream")
        choices = await gen.collect(request, request_id, prompt_ids, params)
        return JSONResponse(completion_response(request_id, config.served_model_name, len(prompt_ids), choices,
                                                gen.tokenizer))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        admit(body.model)
        try:
            tools = chat_tools(body, body.structured(), getattr(gen.tokenizer, "chat_template", None))
        except ValueError as err:
            raise ApiError(400, str(err), param="tool_choice") from None
        prompt_ids = gen.encode_chat(body.messages, tools.tools)
        max_tokens = gen.check_length(len(prompt_ids), body.requested_max_tokens())
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        params = [body.sampling_params(max_tokens, body.num_logprobs(), i, tools.structured) for i in range(body.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(gen.stream(request_id, "chat.completion.chunk", prompt_ids, params,
                                                include_usage, chat=True, tools=tools), media_type="text/event-stream")
        choices = await gen.collect(request, request_id, prompt_ids, params)
        return JSONResponse(chat_response(request_id, config.served_model_name, len(prompt_ids), choices,
                                          gen.tokenizer, tools))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        if body.model is not None and body.model != config.served_model_name:
            admit(body.model)
        ids = gen.encode_chat(body.messages) if body.messages else gen.encode_text(body.prompt or "",
                                                                                   body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        if body.model is not None and body.model != config.served_model_name:
            admit(body.model)
        vocab = len(gen.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": gen.tokenizer.decode(body.tokens)}

    return app
