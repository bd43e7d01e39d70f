"""A memory plan as a person reads it: the decision, why, a per-GPU memory bar, KV capacity."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvpilot.runtime.memory.devices import GiB
from kvpilot.runtime.memory.planner import Plan

_BAR_WIDTH = 48
_PARTS = (("weights", "magenta"), ("rotary_tables", "cyan"), ("kv_cache", "green"), ("activations", "yellow"),
          ("overhead", "red"), ("margin", "blue"))
_LABELS = {"rotary_tables": "rotary cos/sin", "overhead": "non-torch (NCCL)", "margin": "safety margin"}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def memory_bar(plan: Plan) -> Text:
    """One character per 1/48 of the device's memory; dots are headroom, spaces are reserved."""
    mem = plan.memory
    bar = Text()
    for part, colour in _PARTS:
        bar.append("█" * round(_BAR_WIDTH * getattr(mem, part) / mem.total), style=colour)
    bar.append("·" * max(0, round(_BAR_WIDTH * mem.headroom / mem.total)))
    bar.append(" " * max(0, _BAR_WIDTH - len(bar)))
    return Text("[") + bar + Text("]")


def render_plan(plan: Plan, console: Console) -> None:
    where = "CPU (system RAM)" if plan.device_kind == "cpu" else f"{plan.gpus_per_replica} x {plan.device}"
    decision = Table(title=f"kvpilot plan: {plan.model} on {where}", show_header=False, title_justify="left")
    decision.add_column(style="bold")
    decision.add_column()
    source = f" (pre-quantized {plan.checkpoint} checkpoint)" if plan.checkpoint else ""
    decision.add_row("quantization", f"{plan.quantization} weights{source}, {plan.kv_dtype} KV cache "
                                     f"(compute {plan.compute_dtype})")
    stages = (f" x pipeline parallel {plan.pipeline_parallel} ({' / '.join(map(str, plan.stage_layers))} layers)"
              if plan.pipeline_parallel > 1 else "")
    decision.add_row("parallelism", f"tensor parallel {plan.tensor_parallel}{stages}, {plan.nodes} node(s), "
                                    f"{plan.gpus_per_replica} GPU(s) per replica")
    every_layer = " for every layer" if plan.kv_groups > 1 else ""
    decision.add_row("KV cache", f"{plan.num_kv_blocks} blocks x {plan.block_size} tokens = "
                                 f"{plan.kv_capacity_tokens:,} tokens{every_layer} "
                                 f"({plan.kv_bytes_per_token:,} bytes/token per GPU)")
    windows = (f"; sliding-window layers hold at most {' / '.join(f'{w:,}' for w in plan.sliding_windows)} tokens"
               if plan.sliding_windows else "")
    decision.add_row("capacity", f"{plan.kv_capacity_sequences} sequences at {plan.max_model_len:,} tokens{windows}; "
                                 f"max {plan.max_num_seqs} running, {plan.max_batched_tokens} tokens per step")
    if plan.offload_layers:
        pod = f", {_gib(plan.host_weight_bytes_per_pod)} per pod" if plan.tensor_parallel > 1 else ""
        decision.add_row("weights offload", f"{plan.offload_layers} of {sum(plan.stage_layers)} layers in host memory "
                                            f"({_gib(plan.host_weight_bytes)} per GPU{pod}); decode at most "
                                            f"{plan.decode_tokens_per_s:.2f} tokens/s per sequence (host link bound)")
    if plan.num_host_kv_blocks:
        decision.add_row("host KV tier", f"{plan.num_host_kv_blocks} blocks = {plan.host_kv_tokens:,} tokens "
                                         f"({_gib(plan.host_kv_bytes)} of host memory)")
    console.print(decision)

    memory = Table(title="memory per GPU" if plan.device_kind == "cuda" else "memory (host)",
                   title_justify="left")
    memory.add_column("part")
    memory.add_column("bytes", justify="right")
    memory.add_column("share", justify="right")
    mem = plan.memory
    for part, colour in _PARTS:
        value = getattr(mem, part)
        label = _LABELS.get(part, part.replace("_", " "))
        memory.add_row(Text(label, style=colour), _gib(value), f"{value / mem.total:.1%}")
        if part == "weights" and plan.offload_layers:
            memory.add_row("  staging buffers (in weights)", _gib(plan.staging_bytes),
                           f"{plan.staging_bytes / mem.total:.1%}")
    memory.add_row("headroom", _gib(mem.headroom), f"{mem.headroom / mem.total:.1%}")
    memory.add_row("usable / total", f"{_gib(mem.usable)} / {_gib(mem.total)}", "")
    if plan.offload_layers:
        memory.add_row("weights in host memory", _gib(plan.host_weight_bytes), "host")
    if plan.device_kind == "cuda":
        memory.add_row("CUDA context", f"outside usable ({_gib(mem.total - mem.usable)})", "")
    console.print(memory)
    console.print(memory_bar(plan))
    console.print("why:")
    for reason in plan.reasons:
        console.print(f"  - {reason}", highlight=False)
