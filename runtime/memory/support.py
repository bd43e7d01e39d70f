"""What the runtime runs, and the error for what it does not.

The planner, the operator and the loader read the same facts here, so a model the pods would
refuse is refused at plan time too, in the same words.
"""

from __future__ import annotations


class UnsupportedOption(ValueError):
    """An option this runtime does not run yet: refused at start-up, never silently ignored."""


# --- Pre-quantized checkpoints (the memory model's part; owned with runtime/memory/checkpoint.py) --------
# The runtime's quantized layouts (kernels/quant_reference.py) are: int8 with one scale per output
# channel and no zero point; int4 with one scale and zero point per contiguous group of an even
# number of input columns; fp8 (e4m3) with one fp32 scale per output channel. A checkpoint loads
# into them exactly or not at all: these are the ones that do.
CHECKPOINT_FORMATS = ("compressed-tensors", "gptq", "awq", "fp8", "fbgemm_fp8")


def check_checkpoint_quantization(checkpoint) -> None:
    """Refuse, in one line, a pre-quantized checkpoint whose layout the runtime cannot hold exactly
    (`checkpoint` is a kvpilot.runtime.memory.checkpoint.CheckpointQuantization)."""
    scheme, what = checkpoint.scheme, checkpoint.label
    if checkpoint.method not in CHECKPOINT_FORMATS:
        raise UnsupportedOption(f"{what}: {checkpoint.method} checkpoints are not supported "
                                f"(supported: {', '.join(CHECKPOINT_FORMATS)})")
    if checkpoint.act_order:
        raise UnsupportedOption(f"{what}: act-order (desc_act) checkpoints permute their groups, which the "
                                "runtime's int4 layout cannot hold: use a checkpoint quantized with desc_act false")
    if scheme.block is not None:
        raise UnsupportedOption(f"{what}: block-wise fp8 scales {list(scheme.block)} are not supported "
                                "(per-tensor and per-channel fp8 are)")
    grouped = bool(scheme.group_size)
    stored_zeros = bool(scheme.zero_bytes) and checkpoint.method == "compressed-tensors"  # GPTQ stores them always
    if scheme.kind == "int" and scheme.bits == 8 and (grouped or stored_zeros):
        raise UnsupportedOption(f"{what}: int8 weights load with one scale per output channel and no zero "
                                "point; this checkpoint has groups or zero points")
    if scheme.kind == "int" and scheme.bits == 4 and scheme.group_size and scheme.group_size % 2:
        raise UnsupportedOption(f"{what}: int4 groups of {scheme.group_size} columns are not supported "
                                "(an even group size is)")
