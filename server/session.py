"""One connection: its handler copy, inputs, outputs, tasks, and a single way to end it.

A session is ACTIVE from registration until something ends it (the client, the handler,
a time limit, a fault, the server). `close()` moves it to CLOSING and out of the registry in
one synchronous step, then tears it down in a task of its own that no caller can cancel:
every path that ends a session goes through it, once, so it can never stay registered.
Each teardown step is bounded, so a hung handler cannot hold a session open either.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NoReturn

from .deadlines import CallTimedOut, call_deadlines
from .handler_pool import HandlerPool, default_pool
from .handlers import AsyncStreamHandler, DataChannel, StreamHandlerBase
from .outputs import InvalidOutput, Output, parse_output
from .registry import log_id
from .utils import (
    AdditionalOutputs,
    Context,
    RateLimitedLog,
    Warning,
    WebRTCError,
    create_message,
    current_context,
)

if TYPE_CHECKING:
    from .config import StreamConfig
    from .metrics.state import StreamMetrics
    from .registry import SessionRegistry

logger = logging.getLogger(__name__)

OUTPUTS_QUEUE_SIZE = 64  # per output_stream reader; the oldest output is dropped beyond it
MAX_OUTPUT_READERS = 8
MAX_ERROR_CHARS = 2000
TEARDOWN_STEP_S = 5.0  # each teardown step (handler shutdown, a close callback) at most
MAX_STUCK_CALLS = 4  # a session with more handler threads stuck than this is closed
# Outputs that carry no audio (AdditionalOutputs) cost the loop without any pacing: at most
# this many a second per session; a faster emit() is simply waited for (back-pressure).
MAX_PLAIN_OUTPUTS_PER_S = 200.0
# An async emit() that keeps returning outputs without ever awaiting would freeze the event
# loop; one that does so this many times in a row, for this long, ends its session.
SPIN_CALLS = 1000
SPIN_SECONDS = 5.0




@functools.lru_cache(maxsize=1024)
def _coroutine_function(func: Any) -> bool:
    return inspect.iscoroutinefunction(func)


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """`inspect.iscoroutinefunction`, cached per function: asked for every media frame of a
    handler's bound `receive` (a new bound-method object each time, the same function)."""
    func = getattr(fn, "__func__", None)
    return inspect.iscoroutinefunction(fn) if func is None else _coroutine_function(func)


class SessionState(enum.Enum):
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"


class HandlerTimeout(Exception):
    """A handler call outlived the stream's `handler_timeout`."""


class SessionClosed(Exception):
    """The session ended while a handler call was waiting."""


class OutputStreams:
    """`output_stream` readers of one session: every reader gets every output (bounded
    per reader; the oldest is dropped), and every reader ends when the session does."""

    def __init__(self) -> None:
        self._readers: list[asyncio.Queue[AdditionalOutputs | None]] = []
        self._backlog: list[AdditionalOutputs] = []  # what came before the first reader
        self._ended = False

    def push(self, item: AdditionalOutputs) -> None:
        if not self._readers:
            self._backlog.append(item)
            del self._backlog[:-OUTPUTS_QUEUE_SIZE]
        for q in self._readers:
            _put_dropping(q, item)

    def end(self) -> None:
        self._ended = True
        for q in self._readers:
            _put_dropping(q, None)

    def subscribe(self) -> asyncio.Queue[AdditionalOutputs | None]:
        if len(self._readers) >= MAX_OUTPUT_READERS:
            raise RuntimeError(f"at most {MAX_OUTPUT_READERS} output_stream readers per session")
        q: asyncio.Queue[AdditionalOutputs | None] = asyncio.Queue(OUTPUTS_QUEUE_SIZE + 1)
        for item in self._backlog:
            _put_dropping(q, item)
        self._backlog.clear()
        if self._ended:
            _put_dropping(q, None)
        self._readers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        if q in self._readers:
            self._readers.remove(q)

    @property
    def readers(self) -> int:
        return len(self._readers)


def _put_dropping(q: asyncio.Queue, item: Any) -> None:
    if q.full():
        q.get_nowait()
    q.put_nowait(item)


class Session:
    """State of one connection (`webrtc_id`), whatever front end carries it."""

    def __init__(
        self,
        registry: SessionRegistry,
        config: StreamConfig,
        webrtc_id: str,
        handler: Any,
        channel: DataChannel,
        *,
        kind: str,
        pool: HandlerPool | None = None,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.webrtc_id = webrtc_id
        self.log_id = log_id(webrtc_id)
        self.handler = handler
        self.channel = channel
        self.kind = kind
        self.pool = pool or default_pool()
        self.loop = asyncio.get_running_loop()
        self._deadlines = call_deadlines(self.loop)
        self.started = time.monotonic()
        self.outputs = OutputStreams()
        self.closed = asyncio.Event()  # set when the session stops being ACTIVE
        self.close_reason: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self.log = RateLimitedLog(logger, f"session {self.log_id}")
        self._state = SessionState.ACTIVE
        self._teardown_task: asyncio.Task | None = None
        self._received = asyncio.Event()
        self._receive_nowait: Callable[[Any], bool] | None = getattr(handler, "receive_nowait", None)
        self._on_close: list[Callable[[], Any]] = []
        self._calls: set[Future] = set()  # handler-pool calls in flight
        self._stuck: set[Future] = set()  # abandoned calls still running
        self.context = Context(webrtc_id=webrtc_id)
        self.latest_args: list[Any] | None = None  # set_input values (None: use defaults)
        self._last_error: tuple[str, float] = ("", 0.0)
        self._plain_budget = MAX_PLAIN_OUTPUTS_PER_S
        self._plain_at = time.monotonic()
        self._spin = 0
        self._spin_since = 0.0
        if isinstance(handler, StreamHandlerBase):
            handler._loop = self.loop
            handler.set_channel(channel)
            handler._report_error = self.report_handler_error
            handler._run_blocking = self.run_blocking

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def active(self) -> bool:
        return self._state is SessionState.ACTIVE

    # -- tasks -----------------------------------------------------------------------------
    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        """A task owned by this session: cancelled when it ends; a crash ends the session."""
        task = asyncio.create_task(coro, name=f"{self.log_id}:{name}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.active:
            self.log.error("task", "task %s failed: %r", task.get_name(), exc)
            self.send_error(f"internal error: {type(exc).__name__}: {exc}")
            self.close(f"task {task.get_name().split(':', 1)[-1]} failed")

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Run `fn` (sync or async) during teardown; bounded, errors logged."""
        self._on_close.append(fn)

    # -- messages --------------------------------------------------------------------------
    def send(self, message: str) -> None:
        if self.active:
            self.channel.send(message)

    def send_error(self, text: str) -> None:
        self.send(create_message("error", text))

    def report_handler_error(self, e: BaseException) -> None:
        """A handler raised: tell this client; other sessions never see it."""
        if self.metrics is not None:
            self.metrics.handler_error(self.kind, isinstance(e, Warning))
        if isinstance(e, Warning):
            self.send(create_message("warning", e.message))
            return
        text = str(e) if isinstance(e, WebRTCError) else f"{type(e).__name__}: {e}"
        if len(text) > MAX_ERROR_CHARS:  # a data channel carries 64 KiB a message at most
            text = text[:MAX_ERROR_CHARS] + f"... ({len(text)} characters)"
        now = time.monotonic()
        if self._last_error[0] == text and now - self._last_error[1] < 1.0:
            return  # a handler failing on every frame: one message a second is enough
        self._last_error = (text, now)
        self.log.warning("handler_error", "handler raised %s", text[:500])
        self.send_error(text)

    def push_outputs(self, outputs: AdditionalOutputs) -> None:
        """Hand to `output_stream` readers and tell the client (FastRTC's `fetch_output`)."""
        self.outputs.push(outputs)
        self.send(create_message("fetch_output", list(outputs.args)))

    # -- calling the handler ---------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        ctx = self.context

        def run() -> Any:
            current_context.set(ctx)
            return fn(*args)

        cf = self.pool.submit(run)
        self._calls.add(cf)
        cf.add_done_callback(self._call_done)
        return cf

    def _call_done(self, cf: Future) -> None:
        # Runs on the pool thread: set operations are atomic under the GIL.
        self._calls.discard(cf)
        self._stuck.discard(cf)

    def _abandon(self, cf: Future) -> None:
        """Stop waiting for a pool call; its thread is counted as lost while it runs."""
        if cf.done():
            return
        self.pool.abandon(cf)
        if cf.done():  # it was still queued: cancelled, never runs
            return
        self._stuck.add(cf)
        if len(self._stuck) > MAX_STUCK_CALLS and self.active:
            self.send_error(f"{len(self._stuck)} handler calls of this session are stuck; closing it")
            self.close("handler calls stuck")

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call on the handler pool, in this session's context. If the
        awaiting task is cancelled (a timeout, a new turn, the session ends), the call is
        abandoned: its thread counts as lost capacity until it returns, not as a worker."""
        cf = self._submit(fn, *args)
        try:
            return await asyncio.wrap_future(cf, loop=self.loop)
        except asyncio.CancelledError:
            self._abandon(cf)
            raise

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a handler method: awaited if async, else on the handler pool with our context."""
        if _is_coroutine_function(fn):
            current_context.set(self.context)
            return await fn(*args)
        return await self.run_blocking(fn, *args)

    async def call_limited(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`call` under the stream's `handler_timeout`. A call that outlives it ends its own
        session; a thread stuck in it is abandoned (see `HandlerPool`)."""
        timeout = self.config.handler_timeout
        if timeout is None:
            return await self.call(fn, *args)
        # This runs for every media frame: one watcher per loop instead of a timer per call.
        try:
            return await self._deadlines.run(self.call(fn, *args), timeout)
        except CallTimedOut:
            self._timed_out(fn, timeout)

    def _timed_out(self, fn: Callable[..., Any], timeout: float) -> NoReturn:
        name = getattr(fn, "__qualname__", repr(fn))
        self.send_error(f"handler {name} did not return within {timeout:g} s; closing the session")
        self.close("handler timed out")
        raise HandlerTimeout(name) from None

    def start_up(self) -> None:
        """Run the handler's `start_up` (sync or async) once, as the connection starts."""
        start_up = getattr(self.handler, "start_up", None)
        if start_up is not None:
            self.spawn(self._start_up(start_up), "start_up")

    async def _start_up(self, start_up: Callable[[], Any]) -> None:
        try:
            await self.call(start_up)
        except Exception as e:
            self.report_handler_error(e)

    async def receive(self, frame: Any) -> None:
        """Hand one input frame to the handler (dropped once the session is not ACTIVE).

        A handler with a `receive_nowait(frame) -> bool` (`ReplyOnPause`: a frame that
        completes no hop is only buffered) takes the frame without awaiting when it returns
        True: no handler call under the timeout watch, for most 20 ms frames."""
        if not self.active:
            return
        take = self._receive_nowait
        try:
            if take is not None and take(frame):
                return
            await self.call_limited(self.handler.receive, frame)
        except HandlerTimeout:
            pass
        except Exception as e:
            self.report_handler_error(e)
        finally:
            self._received.set()

    async def next_output(self) -> Output:
        """The handler's next output, validated (a wrong type is reported to the client and
        skipped). Awaited, never busy-polled: an async `emit` is awaited; a sync `emit` that
        returns None is asked again only after new input arrives or a backoff (5 ms doubling
        to 200 ms) passes. Outputs without audio are limited to MAX_PLAIN_OUTPUTS_PER_S."""
        h = self.handler
        is_async = isinstance(h, AsyncStreamHandler) or inspect.iscoroutinefunction(getattr(h, "emit", None))
        delay = 0.005
        while True:
            self._received.clear()
            yielded = [False]
            marker = self.loop.call_soon(yielded.__setitem__, 0, True)
            try:
                item = await h.emit() if is_async else await self.call(h.emit)
            except Exception as e:
                marker.cancel()
                self.report_handler_error(e)
                await asyncio.sleep(0.05)
                continue
            marker.cancel()
            if item is None:
                self._spin = 0
                await self._wait_for_input(0.02 if is_async else delay)
                delay = min(delay * 2, 0.2)
                continue
            delay = 0.005
            try:
                out = parse_output(item)
            except InvalidOutput as e:
                self.report_handler_error(e)
                out = None
            if out is not None and out.audio is not None:
                self._spin = 0
                return out
            # No audio: nothing downstream paces this; keep the loop (and everyone else) fair.
            await self._pace_plain_output(spun=not yielded[0])
            if out is not None:
                return out

    async def _pace_plain_output(self, *, spun: bool) -> None:
        now = time.monotonic()
        if spun:
            if self._spin == 0:
                self._spin_since = now
            self._spin += 1
            if self._spin >= SPIN_CALLS and now - self._spin_since >= SPIN_SECONDS:
                self.send_error(
                    f"the handler's emit() returned {self._spin} times in a row without awaiting "
                    "anything; an async emit must wait for new data (e.g. `await queue.get()`). "
                    "Closing the session"
                )
                self.close("emit never awaits")
                raise SessionClosed("emit never awaits")
        else:
            self._spin = 0
        self._plain_budget = min(
            MAX_PLAIN_OUTPUTS_PER_S, self._plain_budget + (now - self._plain_at) * MAX_PLAIN_OUTPUTS_PER_S
        )
        self._plain_at = now
        self._plain_budget -= 1.0
        if self._plain_budget < 0:
            await asyncio.sleep(-self._plain_budget / MAX_PLAIN_OUTPUTS_PER_S)
        else:
            await asyncio.sleep(0)  # always give the loop to others between two outputs

    async def _wait_for_input(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._received.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # -- additional inputs and outputs -----------------------------------------------------
    @property
    def args(self) -> tuple[Any, ...]:
        """The additional inputs' latest values: `set_input`'s, else the stream's defaults."""
        return tuple(self.latest_args if self.latest_args is not None else self.config.default_args)

    def set_input(self, args: list[Any]) -> None:
        """Audio handlers see `latest_args == ["__webrtc_value__", *args]` (FastRTC's
        layout); per-frame video handlers get `args` after the frame."""
        if isinstance(self.handler, StreamHandlerBase):
            self.handler.set_args(["__webrtc_value__", *args])
        self.latest_args = list(args)

    async def output_stream(self) -> AsyncIterator[AdditionalOutputs]:
        q = self.outputs.subscribe()
        try:
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            self.outputs.unsubscribe(q)

    # -- the end -----------------------------------------------------------------------------
    def close(self, reason: str = "closed") -> asyncio.Future:
        """End the session, however it ends. Idempotent; returns an awaitable that completes
        when the teardown has (awaiting it never cancels the teardown)."""
        if self._teardown_task is None:
            self._state = SessionState.CLOSING
            self.close_reason = reason
            self.closed.set()
            self._teardown_task = self.loop.create_task(self._teardown(reason), name=f"{self.log_id}:teardown")
            self.registry.remove(self, self._teardown_task)
        return asyncio.shield(self._teardown_task)

    async def _teardown(self, reason: str) -> None:
        try:
            logger.info("session %s (%s) closed: %s", self.log_id, self.kind, reason)
            tasks = [t for t in self.tasks if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=TEARDOWN_STEP_S)
            shutdown = getattr(self.handler, "shutdown", None)
            if shutdown is not None and not self._stuck:
                await self._bounded(self.call(shutdown), "handler shutdown")
            for fn in self._on_close:
                await self._bounded(_maybe_await(fn), "close callback")
        except BaseException:  # never let a fault skip the release below
            logger.exception("session %s: teardown failed", self.log_id)
        finally:
            for cf in list(self._calls):  # sync calls still running: nobody waits for them
                self.pool.abandon(cf)
            self.outputs.end()
            if self.metrics is not None:
                self.metrics.retire(self)
            self._state = SessionState.CLOSED

    async def _bounded(self, aw: Any, what: str) -> None:
        try:
            await asyncio.wait_for(aw, TEARDOWN_STEP_S)
        except asyncio.TimeoutError:
            logger.warning("session %s: %s took over %.0f s; given up", self.log_id, what, TEARDOWN_STEP_S)
        except Exception:
            logger.exception("session %s: %s raised", self.log_id, what)


async def _maybe_await(fn: Callable[[], Any]) -> None:
    res = fn()
    if inspect.isawaitable(res):
        await res
