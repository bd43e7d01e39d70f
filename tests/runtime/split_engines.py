"""What the split-engine tests share: their limits, their sampling, and a second node started for real."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.models.parallel import free_port

LIMITS = {"device": "cpu", "num_kv_blocks": 32, "max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 16}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)


def assert_same_tokens_and_logprobs(expected: list, outputs: list) -> None:
    """A split engine's outputs are the unsplit engine's: the same tokens, log-probabilities within 1e-4."""
    for want, got in zip(expected, outputs, strict=True):
        assert got.token_ids == want.token_ids
        for a, b in zip(want.logprobs, got.logprobs, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


def generate_across_two_nodes(checkpoint: str, prompts: list, split: dict, check_leader: Callable[[LLM], None]) -> list:
    """Node 1 is `kvpilot serve --node-rank 1` in its own process (a LeaderWorkerSet worker pod); node 0 is
    an engine here. `split`: the engine's tensor/pipeline sizes, given to both nodes."""
    flags = {"tensor_parallel_size": "--tensor-parallel", "pipeline_parallel_size": "--pipeline-parallel"}
    limits = [arg for name, value in LIMITS.items() if name != "device"
              for arg in (f"--{name.replace('_', '-')}", str(value))]
    port = free_port()
    node1 = subprocess.Popen(
        [sys.executable, "-m", "kvpilot.runtime", "serve", "--model", checkpoint, "--device", "cpu",
         *[arg for name, size in split.items() for arg in (flags[name], str(size))], "--nnodes", "2",
         "--node-rank", "1", "--leader-address", "127.0.0.1", "--leader-port", str(port), *limits],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(checkpoint, nnodes=2, leader_address="127.0.0.1", leader_port=port, **split, **LIMITS)
        check_leader(llm)
        try:
            outputs = llm.generate(prompts, GREEDY)
        finally:
            llm.engine.close()
        assert node1.wait(timeout=60) == 0, node1.stdout.read()
        return outputs
    finally:
        if node1.poll() is None:
            node1.kill()
