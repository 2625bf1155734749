"""FastRTC-compatible stream handler base classes.

Same names, constructor arguments and methods as FastRTC 0.0.34's `tracks.py`, so existing
handler subclasses run unchanged. The difference is in how the front ends drive them
(`server/driver.py`): output is awaited, never polled in a busy loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from .utils import AdditionalOutputs, CloseStream, call_on_loop, create_message

logger = logging.getLogger(__name__)

AudioChunk: TypeAlias = tuple[int, npt.NDArray[np.int16 | np.float32]]
EmitType: TypeAlias = (
    AudioChunk
    | tuple[int, npt.NDArray[np.int16 | np.float32], Literal["mono", "stereo"]]
    | AdditionalOutputs
    | tuple[AudioChunk, AdditionalOutputs]
    | CloseStream
    | None
)
AudioEmitType = EmitType
VideoEmitType: TypeAlias = Any


class DataChannel(ABC):
    """Where a handler's messages go: a WebRTC data channel or a WebSocket."""

    @abstractmethod
    def send(self, message: str) -> None: ...


@dataclass
class VideoStreamHandler:
    """A per-frame video callable with FastRTC's options: `Stream(VideoStreamHandler(fn))`
    serves `fn` like a plain per-frame function. Frames are always taken freshest-first
    (`skip_frames=False` does not queue a backlog: a slow handler drops frames, never adds
    latency); `fps` paces the outgoing track of `mode="receive"` generators."""

    callable: Callable[..., Any]
    fps: int = 30
    skip_frames: bool = False

    def __post_init__(self) -> None:
        if not callable(self.callable):
            raise TypeError(f"VideoStreamHandler needs a callable, got {type(self.callable).__name__}")
        if not isinstance(self.fps, (int, float)) or not 0 < self.fps <= 240:
            raise ValueError(f"fps must be in (0, 240], got {self.fps!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.callable(*args, **kwargs)


class StreamHandlerBase(ABC):
    def __init__(
        self,
        expected_layout: Literal["mono", "stereo"] = "mono",
        output_sample_rate: int = 24000,
        output_frame_size: int | None = None,  # deprecated, as in FastRTC
        input_sample_rate: int = 48000,
        fps: int = 30,
    ) -> None:
        if expected_layout not in ("mono", "stereo"):
            raise ValueError(f"expected_layout must be 'mono' or 'stereo', got {expected_layout!r}")
        if output_sample_rate % 50 != 0:
            raise ValueError(
                f"output_sample_rate must be a multiple of 50, got {output_sample_rate}"
            )
        frame_size = output_sample_rate // 50
        if output_frame_size is not None and output_frame_size != frame_size:
            warnings.warn(
                "output_frame_size is deprecated and ignored; the frame size is "
                f"{frame_size} (20 ms at {output_sample_rate} Hz).",
                UserWarning,
                stacklevel=2,
            )
        self.expected_layout = expected_layout
        self.output_sample_rate = output_sample_rate
        self.output_frame_size = frame_size
        self.input_sample_rate = input_sample_rate
        self.fps = fps
        self.latest_args: list[Any] = []
        self._channel: DataChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._phone_mode = False
        self._clear_queue: Callable[[], None] | None = None
        # Set by the session: how a handler reports an error it caught itself, and where it
        # runs blocking calls (the session's handler pool, abandoned when cancelled).
        self._report_error: Callable[[BaseException], None] | None = None
        self._run_blocking: Callable[..., Any] | None = None
        self.args_set = asyncio.Event()
        self.channel_set = asyncio.Event()

    # -- wiring set by the front end ---------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("handler is not attached to a connection yet")
        return self._loop

    @property
    def channel(self) -> DataChannel | None:
        return self._channel

    def set_channel(self, channel: DataChannel) -> None:
        self._channel = channel
        self.channel_set.set()

    @property
    def phone_mode(self) -> bool:
        return self._phone_mode

    @phone_mode.setter
    def phone_mode(self, value: bool) -> None:
        self._phone_mode = value

    @property
    def clear_queue(self) -> Callable[[], None]:
        return self._clear_queue or (lambda: None)

    # -- additional inputs -----------------------------------------------------------------
    def set_args(self, args: list[Any]) -> None:
        self.latest_args = list(args)
        # `stream.set_input` may come from any thread (a sync route runs on a worker thread):
        # the event is set on the connection's loop, where a turn may be waiting on it.
        if self._loop is not None:
            call_on_loop(self._loop, self.args_set.set)
        else:
            self.args_set.set()

    def reset(self) -> None:
        self.args_set.clear()

    async def fetch_args(self) -> None:
        if self.channel:
            self.channel.send(create_message("send_input", []))

    async def wait_for_args(self) -> None:
        if self.phone_mode:
            self.args_set.set()
            return
        await self.fetch_args()
        await self.args_set.wait()

    def wait_for_args_sync(self) -> None:
        asyncio.run_coroutine_threadsafe(self.wait_for_args(), self.loop).result()

    async def send_message(self, msg: str) -> None:
        if self.channel:
            self.channel.send(msg)

    def send_message_sync(self, msg: str) -> None:
        # Safe from any thread: the channel implementations hop onto the event loop.
        if self.channel:
            self.channel.send(msg)

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Called once when the connection ends, however it ends."""

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call off the event loop (on the session's handler threads when
        attached to one, so a call that never returns costs capacity, not progress)."""
        if self._run_blocking is not None:
            return await self._run_blocking(fn, *args)
        return await asyncio.to_thread(fn, *args)


class StreamHandler(StreamHandlerBase):
    """Synchronous handler: `receive` and `emit` run on worker threads, never on the loop."""

    @abstractmethod
    def receive(self, frame: tuple[int, npt.NDArray[np.int16]]) -> None: ...

    @abstractmethod
    def emit(self) -> EmitType: ...

    @abstractmethod
    def copy(self) -> StreamHandler: ...

    def start_up(self) -> None:  # noqa: B027
        pass


class AsyncStreamHandler(StreamHandlerBase):
    @abstractmethod
    async def receive(self, frame: tuple[int, npt.NDArray[np.int16]]) -> None: ...

    @abstractmethod
    async def emit(self) -> EmitType: ...

    @abstractmethod
    def copy(self) -> AsyncStreamHandler: ...

    async def start_up(self) -> None:
        pass


class AudioVideoStreamHandler(StreamHandler):
    @abstractmethod
    def video_receive(self, frame: npt.NDArray[np.uint8]) -> None: ...

    @abstractmethod
    def video_emit(self) -> VideoEmitType: ...

    @abstractmethod
    def copy(self) -> AudioVideoStreamHandler: ...


class AsyncAudioVideoStreamHandler(AsyncStreamHandler):
    @abstractmethod
    async def video_receive(self, frame: npt.NDArray[np.uint8]) -> None: ...

    @abstractmethod
    async def video_emit(self) -> VideoEmitType: ...

    @abstractmethod
    def copy(self) -> AsyncAudioVideoStreamHandler: ...


StreamHandlerImpl: TypeAlias = StreamHandler | AsyncStreamHandler
AudioEventGenerator: TypeAlias = Generator[EmitType, None, None]


class GeneratorSource(AsyncStreamHandler):
    """`mode="receive"` audio from a plain generator function: the server streams what
    `fn(*inputs)` yields (`(sample_rate, array)`, `AdditionalOutputs`, ...), then ends."""

    def __init__(self, fn: Callable[..., Any], default_args: list[Any] | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.default_args = list(default_args or [])
        self._gen: Any = None

    def copy(self) -> GeneratorSource:
        return GeneratorSource(self.fn, self.default_args)

    async def receive(self, frame: Any) -> None:
        return None

    async def emit(self) -> EmitType:
        if self._gen is None:
            args = self.latest_args[1:] if self.latest_args else self.default_args
            self._gen = self.fn(*args)
        if inspect.isasyncgen(self._gen):
            try:
                return await self._gen.__anext__()
            except StopAsyncIteration:
                return CloseStream("stream ended")
        end = object()
        item = await self.run_blocking(next, self._gen, end)
        return CloseStream("stream ended") if item is end else item
