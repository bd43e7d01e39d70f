"""Fuzzing the API from its own OpenAPI schema, and graceful shutdown of a real `kvpilot` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from eventually import eventually_sync
from hypothesis import HealthCheck, settings

from kvpilot.runtime.models.parallel import free_port
from kvpilot.runtime.server.app import ServerConfig
from kvpilot.runtime.server.serve import DrainingServer

ROOT = Path(__file__).resolve().parents[2]
FUZZ_MAX_TOKENS = 4  # keeps each fuzzed generation short on a CPU; every other field is fuzzed freely


@pytest.fixture
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_5xx(case):
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > FUZZ_MAX_TOKENS:
                case.body[key] = FUZZ_MAX_TOKENS
        if isinstance(case.body.get("n"), int):
            case.body["n"] = min(case.body["n"], 2)
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = FUZZ_MAX_TOKENS
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
    if response.status_code >= 400 and case.path.startswith("/v1"):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_streams_running_when_the_grace_ends_end_with_abort_and_done(serve):
    """SIGTERM with a stream that cannot finish within the grace: it ends with finish_reason "abort"
    and [DONE], not cut mid-way."""
    server = serve(ServerConfig("smollm2"), server_class=DrainingServer, timeout_graceful_shutdown=1)
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    lines = []
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                             json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
            if len(lines) == 2:
                server.server.handle_exit(signal.SIGTERM, None)
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert last["choices"][0]["finish_reason"] == "abort"
    assert 2 <= len(lines) - 1 < 400


def test_up_serves_the_manifest_and_drains_on_sigterm(tmp_path):
    """`kvpilot up` (the README's main job) on the example manifest; SIGTERM mid-stream lets the
    stream finish, then the process exits 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real dispatch, not the tests'
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115 - the child process writes to it until the end
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot.cli.main", "up", "examples/smollm2.yaml",
                             "--port", str(port), "--shutdown-grace", "60"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.seek(0) or log.read()
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        eventually_sync(ready, 420, "kvpilot up is ready", poll=0.2)  # the model loads in ~2 min on a busy machine
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=48, temperature=0, stream=True, extra_body={"ignore_eos": True})
        reasons, tokens = [], 0
        for chunk in stream:
            if tokens == 2:
                proc.send_signal(signal.SIGTERM)
            for choice in chunk.choices:
                tokens += 1
                reasons.append(choice.finish_reason)
        assert reasons[-1] == "length"  # the in-flight stream finished within the grace period
        assert proc.wait(timeout=60) == 0
        log.seek(0)
        output = log.read()
        assert f"serving smollm2-135m-instruct at {url}/v1" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
