"""The outgoing tracks of a WebRTC connection (aiortc `MediaStreamTrack`s).

Audio: `AudioOutputTrack` plays 20 ms frames at real time while there is reply audio (from a
bounded queue that `TrackAudioSink` fills) and sends nothing otherwise. Video:
`ProcessedVideoTrack` sends each processed frame once, freshest first; `_PacedVideoTrack`s
pace frames a handler makes (`video_emit`, or a `mode="receive"` generator).
"""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ...frames import FrameConverter
from ...session import Session
from ...utils import AdditionalOutputs, split_output

AUDIO_OUT_QUEUE = 100  # 20 ms frames: 2 s of reply audio buffered at most


class AudioOutputTrack(MediaStreamTrack):
    """20 ms frames at real time while there is reply audio; nothing between replies.

    Between replies `recv` waits for the next frame instead of returning silence, so aiortc
    encodes and sends no packet at all (RTP allows gaps: the receiver conceals them, as it
    does for a sender using Opus DTX). An idle session then costs no encode, no packet and no
    20 ms wake-up. The first frame after a gap is stamped with the time that passed, so the
    receiver's clock stays right.
    """

    kind = "audio"

    def __init__(self, rate: int) -> None:
        super().__init__()
        self.rate = rate
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(AUDIO_OUT_QUEUE)
        self._start: float | None = None
        self._ts = 0

    def clear(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def played_out(self) -> None:
        while not self.queue.empty() and self.readyState == "live":
            await asyncio.sleep(0.02)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        step = self.rate // 50
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._ts += step
            wait = self._start + self._ts / self.rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        try:
            data = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            data = await self.queue.get()
            if self.readyState != "live":
                raise MediaStreamError
            # Resume on the wall clock: the gap's length in whole frames.
            now = int((time.monotonic() - self._start) * self.rate) // step * step
            self._ts = max(self._ts, now)
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._ts
        frame.time_base = fractions.Fraction(1, self.rate)
        return frame


class TrackAudioSink:
    """Reply audio cut into 20 ms frames for an `AudioOutputTrack` (bounded: back-pressure)."""

    def __init__(self, track: AudioOutputTrack, sends_audio: bool) -> None:
        self.track = track
        self.rate = track.rate
        self.sends_audio = sends_audio
        self.step = track.rate // 50
        self.carry = np.zeros(0, dtype=np.int16)

    def pending(self) -> bool:
        return self.carry.size > 0

    async def write(self, pcm: np.ndarray) -> None:
        pcm = np.concatenate([self.carry, pcm])
        n = pcm.size - pcm.size % self.step
        for i in range(0, n, self.step):
            await self.track.queue.put(pcm[i : i + self.step])
        self.carry = pcm[n:].copy()  # a view would keep the whole chunk alive until the next

    async def idle(self) -> None:
        """The reply paused: play out the partial frame."""
        if self.carry.size:
            await self.track.queue.put(np.concatenate([self.carry, np.zeros(self.step - self.carry.size, np.int16)]))
            self.carry = np.zeros(0, dtype=np.int16)

    async def drain(self) -> None:
        await self.idle()
        await self.track.played_out()


class ProcessedVideoTrack(MediaStreamTrack):
    """Sends each processed frame once, as soon as it is ready (never a stale backlog)."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._frame: Any = None
        self._ready = asyncio.Event()

    def publish(self, frame: Any) -> None:
        self._frame = frame  # an unsent older result is replaced: freshest wins
        self._ready.set()

    async def recv(self) -> Any:
        while self.readyState == "live":
            await self._ready.wait()
            self._ready.clear()
            if self._frame is not None:
                frame, self._frame = self._frame, None
                return frame
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wake a waiting recv so it sees the track ended


class _PacedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps = fps
        self._start: float | None = None
        self._n = 0
        self._conv = FrameConverter()

    async def _pace(self) -> tuple[int, fractions.Fraction]:
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._n += 1
            wait = self._start + self._n / self.fps - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        return int(self._n * 90000 / self.fps), fractions.Fraction(1, 90000)

    def _to_frame(self, session: Session, out: Any, pts: int, tb: fractions.Fraction) -> av.VideoFrame:
        """A handler's video output -> a frame (black when it gave none or a wrong one)."""
        array, extra = split_output(out)
        if isinstance(extra, AdditionalOutputs):
            session.push_outputs(extra)
        if isinstance(array, np.ndarray) and not (array.ndim == 3 and array.shape[2] == 3 and array.dtype.kind in "uif"):
            session.report_handler_error(TypeError(f"handler returned a frame of {array.dtype} {array.shape}; expected (H, W, 3)"))
            array = None
        elif array is not None and not isinstance(array, np.ndarray):
            session.report_handler_error(TypeError(f"handler returned {type(array).__name__}; expected an (H, W, 3) uint8 array"))
            array = None
        if array is None:
            array = np.zeros((480, 640, 3), np.uint8)
        return self._conv.to_frame(array, "bgr24", pts, tb)


class AVVideoOutputTrack(_PacedVideoTrack):
    """Video out of an AudioVideoStreamHandler's `video_emit`."""

    def __init__(self, session: Session) -> None:
        super().__init__(getattr(session.handler, "fps", 30))
        self.session = session

    async def recv(self) -> Any:
        pts, tb = await self._pace()
        try:
            out = await self.session.call(self.session.handler.video_emit)
        except Exception as e:
            self.session.report_handler_error(e)
            out = None
        return self._to_frame(self.session, out, pts, tb)


class GeneratedVideoTrack(_PacedVideoTrack):
    """`mode="receive"` video: frames from the handler's generator, paced at its fps."""

    def __init__(self, session: Session) -> None:
        super().__init__(getattr(session.handler, "fps", 30))
        self.session = session
        self._gen: Any = None

    async def recv(self) -> Any:
        pts, tb = await self._pace()
        session = self.session
        sentinel = object()
        try:
            if self._gen is None:  # made here, not at negotiation: inputs may have arrived
                self._gen = session.handler(*session.args)
            out = await session.run_blocking(next, self._gen, sentinel)
        except Exception as e:
            session.report_handler_error(e)
            out = sentinel
        if out is sentinel:
            self.stop()
            raise MediaStreamError
        return self._to_frame(session, out, pts, tb)
