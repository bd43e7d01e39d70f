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
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvpilot.runtime.contract import HEALTH_PATH, METRICS_PATH, READY_PATH
from kvpilot.runtime.engine.client import EngineClient
from kvpilot.runtime.engine.sampling import SamplingParams, StructuredOutputs
from kvpilot.runtime.server.metrics import MemoryFigures, ServerMetrics, gpu_memory_info
from kvpilot.runtime.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from kvpilot.runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_json,
)
from kvpilot.runtime.server.serving import ApiError, Job, OpenAIServing
from kvpilot.runtime.server.tool_parser import ChatTools, chat_tools

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


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def build_app(engine: EngineClient, config: ServerConfig, memory: Callable[[], MemoryFigures]) -> FastAPI:
    """The app for one engine. `memory` reports planned vs measured bytes for /metrics."""
    app = FastAPI(title="kvpilot", version="0.1.0")
    app.state.draining = False
    metrics = ServerMetrics(config.served_model_name, engine.stats, memory, gpu_memory_info)
    gen = OpenAIServing(engine, config.served_model_name, metrics)
    app.state.abort_all = gen.abort_all  # the end of a SIGTERM drain (serve.DrainingServer) ends the streams
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)

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

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get(HEALTH_PATH)
    async def health() -> JSONResponse:
        """Liveness: 503 once the engine has failed for good, so Kubernetes restarts the pod."""
        if not engine.is_ready():
            return JSONResponse({"status": "engine failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(READY_PATH)
    async def ready() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.is_ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get(METRICS_PATH)
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
        if not engine.is_ready():
            raise ApiError(503, "the engine has failed; this server is waiting to be restarted", "server_error")
        if engine.stats().num_waiting >= config.max_waiting:
            raise ApiError(429, f"the queue is full ({config.max_waiting} requests waiting); retry later",
                           "rate_limit_error")

    def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                        index: int, structured: StructuredOutputs | None = None) -> SamplingParams:
        try:
            return body.sampling_params(max_tokens, logprobs, index, structured)
        except ValueError as err:  # a value valid alone but not with the room left (min_tokens, ...)
            raise ApiError(400, str(err)) from None

    def stream(body: CompletionRequest | ChatCompletionRequest, request_id: str, jobs: list[Job],
               chat: bool, tools: ChatTools | None = None) -> StreamingResponse | None:
        """The response as a stream when asked for one; admitted first, so a refusal is a 400."""
        gen.admit(request_id, jobs)
        if not body.stream:
            return None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(gen.stream(request_id, jobs, include_usage, chat, tools),
                                 media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        admit(body.model)
        jobs = []
        for p, prompt in enumerate(body.prompts()):
            prompt_ids = gen.encode_prompt(prompt)
            max_tokens = gen.check_length(len(prompt_ids), body.max_tokens)
            echo = (prompt if isinstance(prompt, str) else gen.tokenizer.decode(prompt_ids)) if body.echo else ""
            jobs += [Job(p * body.n + i, prompt_ids, sampling_params(body, max_tokens, body.logprobs, i), echo,
                         echo_logprobs=body.echo and body.logprobs is not None,
                         prompt_logprobs=body.prompt_logprobs is not None) for i in range(body.n)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streaming = stream(body, request_id, jobs, chat=False)
        if streaming is not None:
            return streaming
        choices = await gen.collect(request, request_id, jobs)
        return _json(gen.completion_response(request_id, jobs, choices))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        admit(body.model)
        try:
            tools = chat_tools(body, body.structured(), getattr(gen.tokenizer, "chat_template", None))
        except ValueError as err:
            raise ApiError(400, str(err), param="tool_choice") from None
        prompt_ids = gen.encode_chat(body.messages, tools.tools)
        max_tokens = gen.check_length(len(prompt_ids), body.requested_max_tokens())
        jobs = [Job(i, prompt_ids, sampling_params(body, max_tokens, body.num_logprobs(), i, tools.structured),
                    prompt_logprobs=body.prompt_logprobs is not None) for i in range(body.n)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streaming = stream(body, request_id, jobs, chat=True, tools=tools)
        if streaming is not None:
            return streaming
        choices = await gen.collect(request, request_id, jobs)
        return _json(gen.chat_response(request_id, jobs, choices, tools))

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
