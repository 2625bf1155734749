"""Timeouts for many short calls on one event loop, watched by one periodic check.

Every media frame's handler call runs under the stream's `handler_timeout`. With
`asyncio.timeout` that is a timer created, pushed on the loop's heap and cancelled per frame
(~6 % of the event loop at 100 voice sessions, measured with py-spy). Here a call costs a
dict insert and a delete; one callback per loop, rescheduled only while calls are watched,
cancels the tasks whose calls overran, at most a quarter of the timeout late. Cancellation
follows `asyncio.timeout`: the task is cancelled, and the caller tells our cancel from
anyone else's with `Task.uncancel()`.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["CallDeadlines", "CallTimedOut", "call_deadlines"]

T = TypeVar("T")
_HAS_UNCANCEL = hasattr(asyncio.Task, "uncancel")  # 3.11+: telling our cancel from others'


class CallTimedOut(Exception):
    """`CallDeadlines.run`'s call outlived its timeout (not the call's own TimeoutError)."""

MAX_CHECK_PERIOD_S = 0.25


class CallDeadlines:
    """The watched calls of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ids = itertools.count()
        self._calls: dict[int, tuple[float, asyncio.Task]] = {}
        self._fired: set[int] = set()
        self._period = MAX_CHECK_PERIOD_S
        self._check_handle: asyncio.TimerHandle | None = None

    def start(self, timeout: float) -> int:
        """Watch the current task's call for `timeout` seconds; returns its token."""
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("CallDeadlines.start must be called from a task")
        token = next(self._ids)
        self._calls[token] = (self._loop.time() + timeout, task)
        if timeout / 4 < self._period:
            self._period = timeout / 4
        if self._check_handle is None:
            self._check_handle = self._loop.call_later(self._period, self._check)
        return token

    def finish(self, token: int) -> bool:
        """Stop watching; True if the call overran and its task was cancelled for it."""
        self._calls.pop(token, None)
        if token in self._fired:
            self._fired.discard(token)
            return True
        return False

    async def run(self, aw: Awaitable[T], timeout: float) -> T:
        """Await `aw` for at most `timeout` seconds; CallTimedOut if it took longer (a cancel
        from anyone else propagates as it is). Python 3.10 has no `Task.uncancel`: there it
        is `asyncio.wait_for`, a timer per call."""
        if not _HAS_UNCANCEL:
            try:
                return await asyncio.wait_for(aw, timeout)
            except asyncio.TimeoutError:
                raise CallTimedOut from None
        token = self.start(timeout)
        try:
            return await aw
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.finish(token) and task is not None and task.uncancel() == 0:
                raise CallTimedOut from None  # our cancel, and nobody else's
            raise
        finally:
            self.finish(token)

    def __len__(self) -> int:
        return len(self._calls)

    def _check(self) -> None:
        now = self._loop.time()
        late = [t for t, (deadline, _) in self._calls.items() if deadline <= now]
        for token in late:
            _, task = self._calls.pop(token)
            self._fired.add(token)
            task.cancel()
        self._check_handle = (self._loop.call_later(self._period, self._check)
                              if self._calls else None)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CallDeadlines] = (
    weakref.WeakKeyDictionary())


def call_deadlines(loop: asyncio.AbstractEventLoop) -> CallDeadlines:
    """The loop's watcher (one per event loop, dropped with the loop)."""
    watcher = _by_loop.get(loop)
    if watcher is None:
        watcher = _by_loop[loop] = CallDeadlines(loop)
    return watcher
