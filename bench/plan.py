"""Plans per second over the model catalog x the GPU catalog (goal: < 1 ms per plan).

Peer in the same run: the cost of one `size()` call (a single configuration), so the ratio shows
what the search over quantization x tensor parallelism costs on top.
Prints one JSON line per result.
"""

from __future__ import annotations

import json
import time

from kvpilot.runtime.memory.devices import GPU_CATALOG
from kvpilot.runtime.memory.facts import catalog_names, from_catalog
from kvpilot.runtime.memory.planner import NoFit, PlanError, PlanRequest, plan, size

REQUESTS = [PlanRequest(max_context=8192, concurrency=16),
            PlanRequest(max_context=32768, concurrency=4, optimize="cost")]


def main() -> None:
    facts = [from_catalog(name) for name in catalog_names()]
    cases = [(f, gpu, req) for f in facts for gpu in GPU_CATALOG.values() for req in REQUESTS]
    fitted = 0
    start = time.perf_counter()
    for f, gpu, req in cases:
        try:
            plan(f, gpu, req)
            fitted += 1
        except (NoFit, PlanError):
            pass
    plan_s = (time.perf_counter() - start) / len(cases)

    start = time.perf_counter()
    for f, gpu, req in cases:
        size(f, gpu, req, gpu.compute_dtype, gpu.compute_dtype, 1, 8)
    size_s = (time.perf_counter() - start) / len(cases)

    print(json.dumps({"bench": "plan", "plans": len(cases), "fitted": fitted, "no_fit": len(cases) - fitted,
                      "ms_per_plan": round(plan_s * 1e3, 4), "plans_per_s": round(1 / plan_s),
                      "goal_ms_per_plan": 1.0, "meets_goal": plan_s < 1e-3}))
    print(json.dumps({"bench": "plan_vs_single_size", "ms_per_size": round(size_s * 1e3, 4),
                      "search_over_single_ratio": round(plan_s / size_s, 2)}))


if __name__ == "__main__":
    main()
