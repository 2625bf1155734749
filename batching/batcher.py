"""DynamicBatcher: many asyncio submitters, one worker thread, deadline-aware batches.

Items submitted from any event loop (any thread) wait in one bounded FIFO. A single daemon
worker thread forms batches (one group key per batch), decides when to run them with
:func:`~batching.policy.decide_flush`, calls ``fn(batch)`` and hands each result back to
its submitter's loop with ``loop.call_soon_threadsafe``. One worker means ``fn`` never runs
on an event loop and batches run strictly one after another, which stateful models need.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from .config import BatchingConfig
from .errors import (
    BatcherClosed,
    DeadlineExceeded,
    FaultySource,
    QueueFullError,
    ResultCountError,
    WholeBatchError,
)
from .policy import FlushDecision, RuntimePredictor, decide_flush
from .stats import BatcherStats

__all__ = ["DynamicBatcher"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# How long an idle worker sleeps between checks when the queue is empty. Submits and close()
# notify the condition, so this only bounds the wait (no wait is unbounded); it never polls.
_IDLE_WAIT_S = 5.0


class _Item:
    __slots__ = ("payload", "key", "loop", "future", "deadline", "drop_if_late", "enqueued_at", "source")

    def __init__(
        self,
        payload: Any,
        key: Hashable,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        deadline: float | None,
        drop_if_late: bool,
        enqueued_at: float,
        source: Hashable | None = None,
    ) -> None:
        self.source = source
        self.payload = payload
        self.key = key
        self.loop = loop
        self.future = future
        self.deadline = deadline
        self.drop_if_late = drop_if_late
        self.enqueued_at = enqueued_at


def _settle(pairs: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Runs on the submitter's loop: resolve futures that are still pending."""
    for fut, ok, value in pairs:
        if fut.done():  # cancelled (or otherwise settled) meanwhile
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _deliver(pairs: list[tuple[_Item, bool, Any]]) -> None:
    """Hand outcomes to their loops: one ``call_soon_threadsafe`` per loop per call."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for item, ok, value in pairs:
        by_loop.setdefault(item.loop, []).append((item.future, ok, value))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, batch)
        except RuntimeError:  # loop closed: the submitter is gone, nobody to tell
            pass


class DynamicBatcher(Generic[T, R]):
    """Batch calls of ``fn(list[T]) -> Sequence[R]`` from many asyncio submitters.

    Args:
        fn: runs on the worker thread with a non-empty list of items; must return exactly one
            result per item, in order. If it raises, the batch is bisected so only the items
            at fault get the exception (do any stateful write-back as fn's last step: a batch
            that raised is retried in halves). A ``WholeBatchError`` is not bisected: every
            item of the batch gets it.
        name: used in thread names, error messages and stats.
        max_batch_size: largest batch passed to ``fn``; a full batch runs at once.
        max_queue_delay_ms: longest the oldest item of a batch waits for company.
        max_queue_size: bound on waiting items; beyond it ``submit`` raises QueueFullError.
        group_key: items with different keys never share a batch (e.g. different shapes).
        predictor: run-time model used for deadline-driven flushes (learned online).
        safety_margin_ms: slack added to the predicted run time when flushing for a deadline.
        config: the three sizes above as one `BatchingConfig` (it wins over the arguments).
        initializer: called once on the worker thread before its first batch (as
            ``ThreadPoolExecutor(initializer=...)``): per-thread settings such as
            ``torch.set_num_threads``. If it raises, the batcher closes and every waiting
            future gets the exception.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        name: str = "batcher",
        max_batch_size: int = 64,
        max_queue_delay_ms: float = 10.0,
        max_queue_size: int = 4096,
        group_key: Callable[[T], Hashable] | None = None,
        predictor: RuntimePredictor | None = None,
        safety_margin_ms: float = 2.0,
        config: BatchingConfig | None = None,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        if safety_margin_ms < 0:
            raise ValueError("safety_margin_ms must be >= 0")
        if config is None:
            config = BatchingConfig(max_batch_size, max_queue_delay_ms, max_queue_size)
        self.config = config  # validated when built
        max_batch_size, max_queue_delay_ms, max_queue_size = (
            config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size
        )
        self.fn = fn
        self.name = name
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = max_queue_delay_ms / 1e3
        self.max_queue_size = int(max_queue_size)
        self.group_key = group_key
        self.predictor = predictor if predictor is not None else RuntimePredictor()
        self.safety_margin_s = safety_margin_ms / 1e3
        self.initializer = initializer
        self.stats = BatcherStats(name)

        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._suspects: set[Hashable] = set()  # sources whose items run alone for now
        self._faulty: set[Hashable] = set()  # sources refused (see WholeBatchError.isolate)
        self._producers = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        # Called on the worker thread after each flushed batch with (sources, queue waits in
        # seconds, run seconds): per-batch metrics by whoever submitted (e.g. which process).
        self.on_batch: Callable[[list[Hashable | None], list[float], float], None] | None = None

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        item: T,
        *,
        deadline: float | None = None,
        drop_if_late: bool = False,
        source: Hashable | None = None,
    ) -> asyncio.Future[R]:
        """Queue ``item``; return a future (of the calling thread's running loop) for its result.

        ``deadline`` is absolute ``time.monotonic()`` seconds; it steers the flush policy. With
        ``drop_if_late=True`` an item whose deadline has passed before it runs is dropped and
        its future fails with DeadlineExceeded (video: a newer frame exists); without it an
        item is never dropped for lateness (audio). ``source`` names who submitted it (e.g. a
        session): when a batch fails as a whole in a way that ``isolate``s, the items of its
        sources are retried alone, and a source whose item fails alone again is refused with
        ``FaultySource`` from then on, so one poisonous input cannot stop everyone's work.
        Thread-safe.

        Raises:
            QueueFullError: ``max_queue_size`` items are already waiting.
            BatcherClosed: ``close()`` was called.
            RuntimeError: no event loop is running in this thread.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"batcher {self.name!r}: submit() must be called from a thread running an asyncio loop"
            ) from None
        key = self.group_key(item) if self.group_key is not None else None
        hash(key)  # an unhashable key must fail here, in the caller, not on the worker thread
        fut: asyncio.Future[R] = loop.create_future()
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is closed")
            if source is not None and source in self._faulty:
                raise FaultySource(f"batcher {self.name!r}: this source's items made the batch "
                                   "function fail twice, the second time alone; it is refused", source)
            if drop_if_late and deadline is not None and deadline <= now:
                # Already late on arrival: don't let it occupy the queue.
                self.stats.add(submitted=1, dropped_late=1)
                fut.set_exception(DeadlineExceeded(f"batcher {self.name!r}: deadline passed before submit"))
                return fut
            if len(self._queue) >= self.max_queue_size:
                self._purge(now)  # cancelled / late items free their places first
                if len(self._queue) >= self.max_queue_size:
                    self.stats.add(rejected_full=1)
                    raise QueueFullError(
                        f"batcher {self.name!r}: queue full ({self.max_queue_size} items waiting)"
                    )
            self._queue.append(_Item(item, key, loop, fut, deadline, drop_if_late, now, source))
            self.stats.add(submitted=1)
            self.stats.set_queue_depth(len(self._queue))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._worker, name=f"batcher-{self.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return fut

    def add_producer(self) -> None:
        """Register a producer: an entity with at most one item in flight at a time.

        When at least as many items wait as there are producers, nothing more can arrive, so
        the batch runs without waiting for ``max_queue_delay``.
        """
        with self._cond:
            self._producers += 1

    def remove_producer(self) -> None:
        """Unregister a producer (it may unblock a waiting batch)."""
        with self._cond:
            if self._producers <= 0:
                raise ValueError(f"batcher {self.name!r}: remove_producer() without add_producer()")
            self._producers -= 1
            self._cond.notify()

    @property
    def producers(self) -> int:
        return self._producers

    def forget_source(self, source: Hashable) -> None:
        """The source is gone (its session ended): drop what was known about it."""
        with self._cond:
            self._suspects.discard(source)
            self._faulty.discard(source)

    @property
    def suspects(self) -> int:
        return len(self._suspects)

    @property
    def faulty(self) -> int:
        return len(self._faulty)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker and fail every waiting future with BatcherClosed. Idempotent.

        A batch already running finishes and delivers its results. Waits up to ``timeout``
        seconds for the worker thread to end (not when called from ``fn`` itself).
        """
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            self._closed = True
            self.stats.set_queue_depth(0)
            self._cond.notify_all()
            thread = self._thread
        if pending:
            self.stats.add(dropped_closed=len(pending))
            _deliver([(it, False, BatcherClosed(f"batcher {self.name!r} closed")) for it in pending])
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> DynamicBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ worker

    def _worker(self) -> None:
        if self.initializer is not None:
            try:
                self.initializer()
            except BaseException as e:
                log.exception("batcher %r: initializer raised; closing", self.name)
                self._fail_all(e)
                return
        while True:
            try:
                picked = self._next_batch()
            except BaseException:
                # A bug in batch selection: fail loudly and release everyone rather than
                # leave submitters waiting on a dead thread.
                log.exception("batcher %r: internal error selecting a batch; closing", self.name)
                self.close(timeout=0)
                return
            if picked is None:
                return
            items, reason = picked
            try:
                self._run_batch(items, reason)
            except BaseException as e:  # a bug here must not kill the worker silently
                log.exception("batcher %r: internal error running a batch", self.name)
                _deliver([(it, False, e) for it in items])

    def _fail_all(self, exc: BaseException) -> None:
        """Close, failing every waiting future with ``exc`` (the worker cannot run)."""
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            self._closed = True
            self.stats.set_queue_depth(0)
            self._cond.notify_all()
        if pending:
            self.stats.add(failed=len(pending))
            _deliver([(it, False, exc) for it in pending])

    def _purge(self, now: float) -> None:
        """Drop cancelled items, and drop_if_late items past their deadline. Lock held."""
        q = self._queue
        if not any(
            it.future.cancelled() or (it.drop_if_late and it.deadline is not None and it.deadline <= now)
            for it in q
        ):
            return
        keep: deque[_Item] = deque()
        late: list[_Item] = []
        cancelled = 0
        for it in q:
            # Reading cancelled() off the loop thread is a benign race: at worst a just-
            # cancelled item runs, and _settle skips its (done) future.
            if it.future.cancelled():
                cancelled += 1
            elif it.drop_if_late and it.deadline is not None and it.deadline <= now:
                late.append(it)
            else:
                keep.append(it)
        self._queue = keep
        self.stats.add(dropped_cancelled=cancelled, dropped_late=len(late))
        self.stats.set_queue_depth(len(keep))
        if late:
            _deliver(
                [(it, False, DeadlineExceeded(f"batcher {self.name!r}: deadline passed while queued")) for it in late]
            )

    def _next_batch(self) -> tuple[list[_Item], str] | None:
        """Block until a batch is due (returns it, removed from the queue) or closed (None)."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                self._purge(now)
                if not self._queue:
                    self._cond.wait(_IDLE_WAIT_S)
                    continue
                groups = self._candidates()
                wake_at = now + _IDLE_WAIT_S
                for i, group in enumerate(groups):
                    d = self._decide(group, now, check_producers=(i == 0))
                    if d.flush:
                        self._take(group)
                        return group, d.reason
                    if d.wake_at is not None:
                        wake_at = min(wake_at, d.wake_at)
                self._cond.wait(max(0.0, wake_at - now))

    def _candidates(self) -> list[list[_Item]]:
        """Candidate batch per group key, oldest group first, each FIFO, capped at max size.
        An item of a suspect source is a group of its own (it runs alone)."""
        cap = self.max_batch_size
        suspects = self._suspects
        if self.group_key is None and not suspects:
            q = self._queue
            return [[q[i] for i in range(min(cap, len(q)))]]
        groups: dict[Hashable, list[_Item]] = {}
        for it in self._queue:
            if suspects and it.source is not None and it.source in suspects:
                groups[("__alone__", id(it))] = [it]
                continue
            g = groups.setdefault(it.key, [])
            if len(g) < cap:
                g.append(it)
        return list(groups.values())

    def _decide(self, group: list[_Item], now: float, check_producers: bool) -> FlushDecision:
        deadlines = [it.deadline for it in group if it.deadline is not None]
        n = len(group)
        # An item of a suspect source runs alone: its batch is full as it is.
        alone = n == 1 and bool(self._suspects) and group[0].source in self._suspects
        return decide_flush(
            now=now,
            batch_size=n,
            max_batch_size=1 if alone else self.max_batch_size,
            oldest_enqueued_at=group[0].enqueued_at,
            earliest_deadline=min(deadlines) if deadlines else None,
            predicted_run_s=self.predictor.predict(n),
            safety_margin_s=self.safety_margin_s,
            max_queue_delay_s=self.max_queue_delay_s,
            # "Nothing more can arrive" concerns the whole queue; it releases the oldest group.
            producers=self._producers if check_producers else 0,
            queued=len(self._queue),
        )

    def _take(self, group: list[_Item]) -> None:
        """Remove ``group`` from the queue. Lock held."""
        q = self._queue
        if len(group) <= len(q) and all(q[i] is it for i, it in enumerate(group)):
            for _ in group:
                q.popleft()
        else:
            taken = {id(it) for it in group}
            self._queue = deque(it for it in q if id(it) not in taken)
        self.stats.set_queue_depth(len(self._queue))

    def _run_batch(self, items: list[_Item], reason: str) -> None:
        t0 = time.monotonic()
        waits = [t0 - it.enqueued_at for it in items]
        self.stats.record_batch(len(items), reason, waits)
        self._run_bisect(items, first=True)
        run_s = time.monotonic() - t0
        self.stats.record_run(run_s)
        hook = self.on_batch
        if hook is not None:
            try:
                hook([it.source for it in items], waits, run_s)
            except Exception:  # a metrics hook must never stop the batcher
                log.exception("batcher %r: on_batch hook failed", self.name)

    def _run_bisect(self, items: list[_Item], first: bool) -> None:
        """Call fn on ``items``; on failure retry each half, so only faulty items get the error.

        Every item is delivered exactly once, and fn returns successfully at most once for
        any item (a successful call is never retried).
        """
        if not first:
            self.stats.add(bisect_calls=1)
        t0 = time.monotonic()
        try:
            results = self.fn([it.payload for it in items])
        except Exception as e:
            if isinstance(e, WholeBatchError) and e.isolate and any(it.source is not None for it in items):
                self._isolate(items, e)
                return
            if len(items) == 1 or isinstance(e, WholeBatchError):
                self.stats.add(failed=len(items))
                _deliver([(it, False, e) for it in items])
                return
            log.debug("batcher %r: batch of %d raised %r; bisecting", self.name, len(items), e)
            mid = len(items) // 2
            self._run_bisect(items[:mid], first=False)
            self._run_bisect(items[mid:], first=False)
            return
        dt = time.monotonic() - t0
        try:
            n_results = len(results)
        except TypeError:
            n_results = -1
        if n_results != len(items):
            # fn completed (its side effects happened), so retrying halves could apply them
            # twice: fail the whole batch instead of bisecting. This is a bug in fn.
            msg = (
                f"batcher {self.name!r}: fn returned {n_results if n_results >= 0 else 'an unsized'} "
                f"{type(results).__name__} of results for a batch of {len(items)} items; "
                "it must return exactly one result per item"
            )
            self.stats.add(failed=len(items))
            _deliver([(it, False, ResultCountError(msg)) for it in items])
            return
        self.predictor.observe(len(items), dt)
        self.stats.add(completed=len(items))
        if self._suspects:
            with self._cond:
                for it in items:  # a suspect whose item ran fine alone is cleared
                    self._suspects.discard(it.source)
        _deliver([(it, True, results[i]) for i, it in enumerate(items)])

    def _isolate(self, items: list[_Item], error: WholeBatchError) -> None:
        """A batch failed as a whole (a worker died or hung). Alone and already suspect: its
        source is faulty. Otherwise every source in it becomes suspect and its items go back
        to the front of the queue, to run alone (a late video frame is then simply dropped)."""
        retry: list[_Item] = []
        failed: list[tuple[_Item, bool, Any]] = []
        with self._cond:
            if len(items) == 1 and items[0].source in self._suspects:
                source = items[0].source
                self._suspects.discard(source)
                self._faulty.add(source)
                exc = FaultySource(
                    f"batcher {self.name!r}: the batch function failed on this source's item "
                    f"alone after failing on a batch holding it ({error}); its items are refused",
                    source,
                )
                exc.__cause__ = error
                failed.append((items[0], False, exc))
                keep: deque[_Item] = deque()
                for it in self._queue:
                    if it.source == source:
                        failed.append((it, False, exc))
                    else:
                        keep.append(it)
                self._queue = keep
                log.warning("batcher %r: a source failed alone after a whole-batch failure; refusing it", self.name)
            else:
                for it in items:
                    if it.source is None:
                        failed.append((it, False, error))
                    else:
                        self._suspects.add(it.source)
                        retry.append(it)
                self._queue.extendleft(reversed(retry))
                self.stats.set_queue_depth(len(self._queue))
            self.stats.add(failed=len(failed), isolated=len(retry))
            self._cond.notify()
        if failed:
            _deliver(failed)
