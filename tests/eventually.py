"""One way to wait in tests and benchmarks: poll a probe until it answers, fail with its last answer.

No sleeps of a guessed length anywhere else: a wait states what it waits for and how long it may take.
`eventually` awaits between polls (inside an event loop); `eventually_sync` sleeps (a plain thread
waiting on a server thread or a child process).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.02


async def eventually(probe: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = "",
                     poll: float = POLL_SECONDS) -> T:
    """Poll `probe` (sync or async) until it returns something truthy; AssertionError with its last
    answer after `timeout` seconds. An exception raised by the probe fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        _fail_after(deadline, timeout, what or probe, value)
        await asyncio.sleep(poll)


def eventually_sync(probe: Callable[[], T], timeout: float = 10.0, what: str = "", poll: float = POLL_SECONDS) -> T:
    """`eventually` for code outside an event loop: the same contract, sleeping between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        _fail_after(deadline, timeout, what or probe, value)
        time.sleep(poll)


def _fail_after(deadline: float, timeout: float, what: object, last: object) -> None:
    if time.monotonic() > deadline:
        raise AssertionError(f"not within {timeout}s: {what} (last: {last!r})")
