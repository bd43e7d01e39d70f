"""The peer for bench/serve.py: HF transformers `generate` behind the simplest OpenAI-style server.

One request at a time (a lock around `generate`), streaming through TextIteratorStreamer (words, not tokens; a
last chunk carries `usage` with the token count), on the
same weights (the embedded SmolLM2 GGUF, fp32) as kvpilot. This is what "just wrap the model in a
web server" gives; kvpilot's continuous batching is measured against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from kvpilot.runtime.loading.embedded import embedded_model_path


class CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer (it yields words, not tokens) that also counts the generated tokens, for
    the final `usage` chunk: the bench counts tokens from usage, never from chunks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.num_tokens += value.numel()
        super().put(value)


def build_app() -> FastAPI:
    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        streamer = CountingStreamer(tokenizer, skip_prompt=True)
        max_tokens = int(body.get("max_tokens", 16))

        def run() -> None:
            with lock, torch.inference_mode():
                model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                               streamer=streamer, pad_token_id=tokenizer.eos_token_id)

        threading.Thread(target=run, daemon=True).start()

        async def events():
            iterator = iter(streamer)
            while True:
                text = await asyncio.to_thread(next, iterator, None)
                if text is None:
                    break
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
            usage = {"prompt_tokens": ids.shape[1], "completion_tokens": streamer.num_tokens,
                     "total_tokens": ids.shape[1] + streamer.num_tokens}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning")
