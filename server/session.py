"""One connection: its handler copy, inputs, outputs, tasks, and a single way to end it."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import metrics
from .handlers import AsyncStreamHandler, DataChannel, StreamHandlerBase
from .utils import (
    AdditionalOutputs,
    Context,
    WebRTCError,
    Warning,
    create_message,
    current_context,
)

if TYPE_CHECKING:
    from .stream import Stream

logger = logging.getLogger(__name__)

# Sync handler calls (receive, emit, per-frame functions) run here, never on the event loop.
# Large because a sync `emit` may block waiting for its own output, as FastRTC allows.
HANDLER_POOL = ThreadPoolExecutor(max_workers=256, thread_name_prefix="handler")

OUTPUTS_QUEUE_SIZE = 64


class HandlerTimeout(Exception):
    """A handler call outlived the stream's `handler_timeout`."""


class Session:
    """State of one connection (`webrtc_id`), whatever front end carries it."""

    def __init__(
        self,
        stream: Stream,
        webrtc_id: str,
        handler: Any,
        channel: DataChannel,
        *,
        kind: str,
    ) -> None:
        self.stream = stream
        self.webrtc_id = webrtc_id
        self.handler = handler
        self.channel = channel
        self.kind = kind
        self.loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self.outputs: asyncio.Queue[AdditionalOutputs | None] = asyncio.Queue(OUTPUTS_QUEUE_SIZE)
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self._received = asyncio.Event()
        self._on_close: list[Callable[[], Any]] = []
        self.context = Context(webrtc_id=webrtc_id)
        self.latest_args: list[Any] | None = None  # set_input values (None: use defaults)
        self._last_error: tuple[str, float] = ("", 0.0)
        if isinstance(handler, StreamHandlerBase):
            handler._loop = self.loop
            handler.set_channel(channel)
            handler._report_error = self.report_handler_error

    # -- tasks -----------------------------------------------------------------------------
    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        """A task owned by this session: cancelled when it ends; a crash ends the session."""
        task = asyncio.create_task(coro, name=f"{self.webrtc_id}:{name}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self.closed.is_set():
            logger.error("session %s: task %s failed: %r", self.webrtc_id, task.get_name(), exc)
            self.send_error(f"internal error: {type(exc).__name__}: {exc}")
            asyncio.ensure_future(self.close(f"task {task.get_name()} failed"))

    def on_close(self, fn: Callable[[], Any]) -> None:
        self._on_close.append(fn)

    # -- messages --------------------------------------------------------------------------
    def send(self, message: str) -> None:
        if not self.closed.is_set():
            self.channel.send(message)

    def send_error(self, text: str) -> None:
        self.send(create_message("error", text))

    def report_handler_error(self, e: BaseException) -> None:
        """A handler raised: tell this client; other sessions never see it."""
        metrics.record_handler_error(self, e)
        if isinstance(e, Warning):
            self.send(create_message("warning", e.message))
            return
        text = str(e) if isinstance(e, WebRTCError) else f"{type(e).__name__}: {e}"
        now = time.monotonic()
        if self._last_error[0] == text and now - self._last_error[1] < 1.0:
            return  # a handler failing on every frame: one message a second is enough
        self._last_error = (text, now)
        logger.warning("session %s: handler raised %s", self.webrtc_id, text)
        self.send_error(text)

    def push_outputs(self, outputs: AdditionalOutputs) -> None:
        """Queue for `output_stream` (bounded: the oldest is dropped) and tell the client."""
        if self.outputs.full():
            self.outputs.get_nowait()
        self.outputs.put_nowait(outputs)
        self.send(create_message("fetch_output", list(outputs.args)))

    # -- calling the handler ---------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a handler method: awaited if async, else on the handler pool with our context."""
        if inspect.iscoroutinefunction(fn):
            current_context.set(self.context)
            return await fn(*args)

        def run() -> Any:
            current_context.set(self.context)
            return fn(*args)

        return await self.loop.run_in_executor(HANDLER_POOL, run)

    async def call_limited(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`call` under the stream's `handler_timeout`. A handler that hangs ends its own
        session (its thread cannot be killed, but nobody waits on it any more)."""
        timeout = self.stream.handler_timeout
        if timeout is None:
            return await self.call(fn, *args)
        try:
            # asyncio.timeout (3.11+) adds no task and no extra timer hop per call; this runs
            # for every media frame.
            if hasattr(asyncio, "timeout"):
                async with asyncio.timeout(timeout):
                    return await self.call(fn, *args)
            return await asyncio.wait_for(self.call(fn, *args), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            name = getattr(fn, "__qualname__", repr(fn))
            self.send_error(f"handler {name} did not return within {timeout:g} s; closing the session")
            asyncio.ensure_future(self.close("handler timed out"))
            raise HandlerTimeout(name) from None

    async def receive(self, frame: Any) -> None:
        try:
            await self.call_limited(self.handler.receive, frame)
        except HandlerTimeout:
            pass
        except Exception as e:
            self.report_handler_error(e)
        finally:
            self._received.set()

    async def next_output(self) -> Any:
        """The handler's next non-None output. Awaited, never busy-polled: an async `emit`
        is simply awaited; a sync `emit` that returns None is asked again only after new
        input arrives or a backoff (5 ms doubling to 200 ms) passes."""
        h = self.handler
        if isinstance(h, AsyncStreamHandler):
            while True:
                try:
                    out = await h.emit()
                except Exception as e:
                    self.report_handler_error(e)
                    await asyncio.sleep(0.05)
                    continue
                if out is not None:
                    return out
                await self._wait_for_input(0.02)
        delay = 0.005
        while True:
            self._received.clear()
            try:
                out = await self.call(h.emit)
            except Exception as e:
                self.report_handler_error(e)
                out = None
            if out is not None:
                return out
            await self._wait_for_input(delay)
            delay = min(delay * 2, 0.2)

    async def _wait_for_input(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._received.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # -- the end -----------------------------------------------------------------------------
    async def close(self, reason: str = "closed") -> None:
        """End the session, however it ends: idempotent, releases everything."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        logger.info("session %s (%s) closed: %s", self.webrtc_id, self.kind, reason)
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        shutdown = getattr(self.handler, "shutdown", None)
        if shutdown is not None:
            try:
                await self.call(shutdown)
            except Exception:
                logger.exception("session %s: handler shutdown raised", self.webrtc_id)
        for fn in self._on_close:
            try:
                res = fn()
                if inspect.isawaitable(res):
                    await res
            except Exception:
                logger.exception("session %s: close callback raised", self.webrtc_id)
        # Wake any output_stream reader.
        if self.outputs.full():
            self.outputs.get_nowait()
        self.outputs.put_nowait(None)
        metrics.session_closed(self)
        self.stream._unregister(self)
