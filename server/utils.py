"""FastRTC-compatible helper types and audio utilities.

Names and behaviour follow FastRTC 0.0.34 (`fastrtc.utils`) so apps move over by changing an
import. Nothing here touches a model or the batcher.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import tempfile
import time
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)


class AdditionalOutputs:
    """Values for the stream's `additional_outputs` components, emitted alongside media."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"AdditionalOutputs{self.args!r}"


class CloseStream:
    """Emit this from a handler to end the stream (the client gets `end_stream`)."""

    def __init__(self, msg: str = "Stream closed") -> None:
        self.msg = msg


class WebRTCError(Exception):
    """Raise from a handler to send `message` to the client as an `error` message."""


class Warning(Exception):  # noqa: A001 - FastRTC's public name
    """Raise from a handler to send a `warning` message to the client; the session goes on."""

    def __init__(self, message: str = "Warning", duration: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.duration = duration


@dataclass
class WebRTCData:
    """Text data sent by a client (FastRTC's `WebRTCData` for text/chat modalities)."""

    webrtc_id: str
    textbox: str = ""
    audio: Any = None


@dataclass
class Context:
    """Per-connection context, readable from inside handlers with `get_current_context()`."""

    webrtc_id: str
    websocket: Any = None


current_context: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "current_context", default=None
)


def get_current_context() -> Context:
    ctx = current_context.get()
    if ctx is None:
        raise RuntimeError("No connection context: call this from inside a stream handler.")
    return ctx


MessageType = Literal[
    "send_input", "end_stream", "fetch_output", "stopword", "error", "warning", "log",
    "update_connection",
]


def create_message(type: MessageType, data: Any) -> str:  # noqa: A002 - FastRTC's signature
    """A data-channel message. `error` and `warning` carry their text under `message`."""
    if type in ("error", "warning"):
        return json.dumps({"type": type, "message": str(data)})
    return json.dumps({"type": type, "data": data}, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def split_output(data: Any) -> tuple[Any, AdditionalOutputs | CloseStream | None]:
    """Split a handler's output into (media, AdditionalOutputs | CloseStream | None)."""
    if isinstance(data, (AdditionalOutputs, CloseStream)):
        return None, data
    if isinstance(data, tuple):
        if len(data) == 2 and isinstance(data[1], (AdditionalOutputs, CloseStream)):
            return data[0], data[1]
        if len(data) == 2 and isinstance(data[0], tuple):  # ((sr, audio), outputs)
            return data[0], data[1] if isinstance(data[1], (AdditionalOutputs, CloseStream)) else None
    return data, None


# --- audio ---------------------------------------------------------------------------------


def audio_to_float32(audio: np.ndarray | tuple[int, np.ndarray]) -> np.ndarray:
    """int16 (or float) samples -> float32 in [-1, 1]."""
    if isinstance(audio, tuple):
        audio = audio[1]
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if audio.dtype == np.int32:
        return audio.astype(np.float32) / 2147483648.0
    return audio.astype(np.float32, copy=False)


def audio_to_int16(audio: np.ndarray | tuple[int, np.ndarray]) -> np.ndarray:
    """float in [-1, 1] (or int16) samples -> int16, clipped."""
    if isinstance(audio, tuple):
        audio = audio[1]
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio
    if np.issubdtype(audio.dtype, np.integer):
        return np.clip(audio, -32768, 32767).astype(np.int16)
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)


def to_mono(array: np.ndarray) -> np.ndarray:
    """(channels, n), (n, channels) with few channels, or (n,) -> (n,). Averages channels."""
    array = np.asarray(array)
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise ValueError(f"audio must be 1-D or 2-D (channels, samples); got shape {array.shape}")
    if array.shape[0] <= array.shape[1]:
        chans = array
    else:  # (n, channels)
        chans = array.T
    if chans.shape[0] == 1:
        return chans[0]
    mixed = chans.astype(np.float32).mean(axis=0)
    return mixed.astype(array.dtype) if array.dtype == np.int16 else mixed


def wav_bytes(audio: tuple[int, np.ndarray]) -> bytes:
    sr, data = audio
    pcm = audio_to_int16(to_mono(data))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sr))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def audio_to_bytes(audio: tuple[int, np.ndarray]) -> bytes:
    """Encode audio as a WAV file in memory (FastRTC returns MP3; WAV needs no codec)."""
    return wav_bytes(audio)


def audio_to_file(audio: tuple[int, np.ndarray]) -> str:
    """Write audio to a temporary WAV file and return its path."""
    with tempfile.NamedTemporaryFile(suffix=".wav", delete=False) as f:
        f.write(wav_bytes(audio))
        return f.name


def aggregate_bytes_to_16bit(chunks_iterator: Iterator[bytes]) -> Iterator[np.ndarray]:
    """Regroup a byte stream of little-endian int16 PCM into (1, n) int16 arrays."""
    leftover = b""
    for chunk in chunks_iterator:
        data = leftover + chunk
        usable = len(data) - (len(data) % 2)
        leftover = data[usable:]
        if usable:
            yield np.frombuffer(data[:usable], dtype="<i2").reshape(1, -1)


async def async_aggregate_bytes_to_16bit(
    chunks_iterator: AsyncIterator[bytes],
) -> AsyncIterator[np.ndarray]:
    leftover = b""
    async for chunk in chunks_iterator:
        data = leftover + chunk
        usable = len(data) - (len(data) % 2)
        leftover = data[usable:]
        if usable:
            yield np.frombuffer(data[:usable], dtype="<i2").reshape(1, -1)


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run `fn(*args)` on `loop`: now if we are on it, else scheduled thread-safely (handler
    threads send messages too). A closed loop means the connection is gone: do nothing."""
    if loop.is_closed():
        return
    try:
        same = asyncio.get_running_loop() is loop
    except RuntimeError:
        same = False
    if same:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `take(n)` is False when empty."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


def parse_json_message(text: str | bytes, max_bytes: int) -> Any:
    """A client's JSON message, or ValueError saying what is wrong with it (too large,
    not JSON, nested too deeply for the parser)."""
    if len(text) > max_bytes:
        raise ValueError(f"message too large ({len(text)} bytes > {max_bytes})")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("message is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8
        raise ValueError(f"message is not valid JSON: {getattr(e, 'msg', e)}") from None


class RateLimitedLog:
    """Log lines of one session, each kind at most once per `interval_s`; the next line of
    that kind says how many were suppressed (a client sending 20,000 bad messages gets a few
    log lines, not 20,000)."""

    def __init__(self, logger: logging.Logger, prefix: str, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.prefix = prefix
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last < self.interval_s:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        if len(self._last) > 64:  # bounded: forget the oldest kinds
            for k in sorted(self._last, key=lambda k: self._last[k][0])[:32]:
                del self._last[k]
        tail = f" ({suppressed} similar suppressed)" if suppressed else ""
        self.logger.log(level, "%s: " + msg + "%s", self.prefix, *args, tail)

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, key, msg, *args)


async def wait_for_item(queue: asyncio.Queue, timeout: float = 0.1) -> Any:
    """Get an item from `queue`, or None after `timeout` seconds."""
    try:
        return await asyncio.wait_for(queue.get(), timeout=timeout)
    except asyncio.TimeoutError:
        return None
