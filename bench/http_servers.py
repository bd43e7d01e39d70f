"""What the HTTP benches share: start a server and wait until it answers, and the percentile they report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/eventually.py

import httpx
from eventually import eventually_sync

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in [0, 1]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(command: list[str], ready_url: str, timeout: float, log: Path | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """Start `command` in the repository root; return once GET `ready_url` answers 200. The server's output
    goes to `log` (else nowhere); a server that exits or is not ready in `timeout` seconds raises, naming it."""
    name = " ".join(command[:4])
    where = f"; its log: {log}" if log else ""
    out = log.open("w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        if log:
            out.close()

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}{where}")
        try:
            return httpx.get(ready_url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually_sync(ready, timeout, f"{name} answers {ready_url}", poll=0.5)
    except AssertionError:
        proc.kill()
        raise RuntimeError(f"{name} did not become ready in {timeout:.0f} s{where}") from None
    return proc
