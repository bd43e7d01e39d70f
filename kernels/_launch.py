"""What every launcher shares: tile arithmetic, the device's size, and the checks that name bad inputs.

Imported only by the kernel files (so only once Triton is really wanted): it imports triton.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kvpilot.kernels.support import FP8_MIN_CAPABILITY

ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
MAX_HEAD_DIM = 256  # one [tile, head_dim] K/V tile and the accumulator must fit in registers
INTERPRETER_SMS = 4  # "device size" the split heuristics assume on the CPU: keeps interpreted grids small


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_gpu(device: torch.device) -> bool:
    """Whether launches on `device` compile for a GPU (CUDA), rather than run in the interpreter."""
    return device.type == "cuda"


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device: (8, 0) A100, (8, 9) L4/L40S, (9, 0) H100/H200."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in on the CPU (interpreter)."""
    if not is_gpu(device):
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_runnable(kernel: object, device: torch.device, what: str) -> None:
    """Triton kernels run on CUDA, or on the CPU through the interpreter, and nowhere else."""
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise ValueError(f"{what}: tensors on {device} are not supported (CUDA runs Triton, CPU the interpreter)")
    # triton.language's own helpers (tl.max, ...) are decorated when triton is first imported
    if not (isinstance(kernel, InterpretedFunction) and isinstance(tl.max, InterpretedFunction)):
        raise RuntimeError(
            f"{what}: CPU tensors need the Triton interpreter, but triton was imported without "
            "TRITON_INTERPRET=1 (it must be set before the first `import triton` in the process, and "
            "e.g. transformers' model modules import triton); use kvpilot.kernels.ops, which runs the torch "
            "reference on CPU unless the interpreter is on")


def check_same_device(what: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{what}: all tensors must be on one device, got {devices}")
    return first


def check_last_dim_contiguous(what: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{what}: {name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_index_tensor(what: str, name: str, t: torch.Tensor, dim: int,
                       dtypes: tuple[torch.dtype, ...] = (torch.int32,)) -> None:
    if t.dim() != dim or t.dtype not in dtypes:
        raise ValueError(f"{what}: {name} must be a {dim}-D tensor of {' or '.join(map(str, dtypes))}, got "
                         f"{t.dtype} {tuple(t.shape)}")


def check_kv_cache(what: str, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """query [..., H, D] against caches [num_blocks, block_size, KVH, D]: dtypes, head counts, head dim."""
    if query.dtype not in ATTENTION_DTYPES:
        raise ValueError(f"{what}: query dtype {query.dtype} is not one of {ATTENTION_DTYPES}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{what}: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (query.dtype, FP8):
        raise ValueError(f"{what}: caches must both be {query.dtype} (the query's dtype) or {FP8}, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    heads, head_dim = query.shape[-2:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{what}: query head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{what}: head_dim {head_dim} is not supported (1..{MAX_HEAD_DIM})")
    if heads % num_kv_heads:
        raise ValueError(f"{what}: {heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if k_cache.dtype == FP8:
        check_fp8(what, query.device)


def check_fp8(what: str, device: torch.device) -> None:
    """float8_e4m3fn loads and casts compile only for compute capability 8.9+ (Ada, Hopper)."""
    if is_gpu(device) and device_capability(device) < FP8_MIN_CAPABILITY:
        raise ValueError(f"{what}: {FP8} needs a GPU of compute capability >= 8.9, got "
                         f"{device_capability(device)}")


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def attention_dot_dtype(query_dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device) -> tl.dtype:
    """The operand dtype of attention's tl.dots (fp32 accumulation always): fp32 (IEEE) for fp32 queries
    and wherever fp32_dot says so; fp16 for an fp8 cache (fp8 -> fp16 is one packed conversion for two
    values, fp8 -> bf16 goes through fp32; probabilities in [0, 1] and the pre-scaled query fit fp16);
    else the query's dtype."""
    if query_dtype == torch.float32:
        return tl.float32
    if cache_dtype == FP8:
        return tl.float16
    return tl.float32 if fp32_dot(query_dtype, device) else TL_DTYPES[query_dtype]


def dot_precision(dot_dtype: tl.dtype) -> str:
    """tl.dot's input_precision: IEEE for fp32 operands (no TF32 rounding); ignored for 16-bit ones."""
    return "ieee" if dot_dtype == tl.float32 else "tf32"


def fp32_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel should upcast tl.dot operands to fp32 (IEEE): always for fp32 inputs (no TF32),
    and for bf16 in the interpreter, whose bf16 tl.dot returns garbage (GPUs use the native bf16 dot)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not is_gpu(device))
