"""Threads for synchronous handler calls, with hung calls counted as lost capacity.

FastRTC runs sync `receive`/`emit`/per-frame functions on threads. A thread stuck in a call
that will never return cannot be killed, so a plain `ThreadPoolExecutor` loses one worker
for good each time, and once every worker is stuck, calls of healthy sessions queue behind
them forever. Here a caller that gives up on a call (its timeout passed, or its session
ended) *abandons* it: the thread is counted as lost and no longer counts against
`max_workers`, so a replacement thread serves the next call. Lost threads are bounded too
(`max_lost`): past that, `exhausted` is true and the server refuses new sessions with a
clear error instead of queueing their work behind calls that never end (`exhausted`). A lost
thread whose call does return later is simply counted back.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)

IDLE_EXIT_S = 30.0  # a worker with nothing to do this long exits (a burst's threads go away)
_IDLE = object()


class _Work:
    __slots__ = ("fn", "args", "future", "abandoned")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], future: Future) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.abandoned = False


class HandlerPool:
    """`submit(fn, *args) -> Future`; `abandon(future)` when the caller stops waiting."""

    def __init__(self, max_workers: int = 256, max_lost: int = 256, name: str = "handler") -> None:
        if max_workers < 1 or max_lost < 0:
            raise ValueError("max_workers must be >= 1 and max_lost >= 0")
        self.max_workers = max_workers
        self.max_lost = max_lost
        self.name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # alive worker threads
        self._idle = 0  # threads waiting for work
        self._lost = 0  # threads running an abandoned call
        self._queued = 0
        self._serial = 0
        self._running: dict[Future, _Work] = {}

    # -- state ---------------------------------------------------------------------------------
    @property
    def lost(self) -> int:
        return self._lost

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def busy(self) -> int:
        """Threads in a call that someone still waits for."""
        with self._lock:
            return self._threads - self._idle - self._lost

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def exhausted(self) -> bool:
        return self._lost >= self.max_lost

    # -- calls ---------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` on a worker. Never refused: `exhausted` gates new sessions (the
        registry refuses them), not the calls of sessions already running."""
        fut: Future = Future()
        work = _Work(fn, args, fut)
        with self._lock:
            self._queued += 1
            spawn = self._idle < self._queued and self._threads - self._lost < self.max_workers
            if spawn:
                self._threads += 1
                self._serial += 1
                serial = self._serial
        self._queue.put(work)
        if spawn:
            threading.Thread(target=self._worker, name=f"{self.name}-{serial}", daemon=True).start()
        return fut

    def abandon(self, fut: Future) -> None:
        """The caller no longer waits for `fut`. If it is still queued it will not run; if it
        runs, its thread counts as lost until the call returns, and a replacement may start."""
        if fut.cancel():
            return
        with self._lock:
            work = self._running.get(fut)
            if work is None or work.abandoned:
                return
            work.abandoned = True
            self._lost += 1
            lost = self._lost
            spawn = self._idle < self._queued and self._threads - self._lost < self.max_workers
            if spawn:
                self._threads += 1
                self._serial += 1
                serial = self._serial
        if lost in (1, self.max_lost // 2, self.max_lost):
            logger.warning("%d handler thread(s) stuck in calls nobody waits for (limit %d)", lost, self.max_lost)
        if spawn:
            threading.Thread(target=self._worker, name=f"{self.name}-{serial}", daemon=True).start()

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                work = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                work = _IDLE
            with self._lock:
                self._idle -= 1
                if work is _IDLE:
                    if self._queued > self._idle:  # a call was just queued counting on us
                        continue
                    self._threads -= 1  # idle a while: give the thread back
                    return
                if work is None:
                    self._threads -= 1
                    return
                self._queued -= 1
                if not work.future.set_running_or_notify_cancel():
                    continue
                self._running[work.future] = work
            try:
                result = work.fn(*work.args)
            except BaseException as e:  # delivered to the caller, as an executor would
                work.future.set_exception(e)
            else:
                work.future.set_result(result)
            finally:
                with self._lock:
                    del self._running[work.future]
                    if work.abandoned:
                        self._lost -= 1
                    # Too many threads (replacements started while this one was lost): retire.
                    retire = self._threads - self._lost > self.max_workers
                    if retire:
                        self._threads -= 1
                if retire:
                    return


_default: HandlerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> HandlerPool:
    """The process-wide pool every session's sync handler calls share."""
    global _default
    with _default_lock:
        if _default is None:
            _default = HandlerPool()
        return _default
