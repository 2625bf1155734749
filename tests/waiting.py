"""Waiting in async tests: poll a condition until it holds or a deadline passes."""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for"]


async def wait_for(cond: Callable[[], Any], timeout: float = 20.0, every: float = 0.05,
                   what: str = "") -> None:
    """Return once ``cond()`` (which may return an awaitable) is truthy; raise
    ``AssertionError`` (naming ``what``) after ``timeout`` seconds. A generous default: it
    only delays failures."""
    deadline = time.monotonic() + timeout
    while True:
        res = cond()
        if inspect.isawaitable(res):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}" if what else "condition not met in time")
        await asyncio.sleep(every)
