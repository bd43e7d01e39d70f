"""The peer for bench/serve.py: HF transformers `generate` behind the simplest OpenAI-style server.

One request at a time (a lock around `generate`), streaming through TextIteratorStreamer, on the
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
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
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
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning")
