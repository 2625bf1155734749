"""Freshest-frame video processing for one WebRTC session.

A reader task overwrites a one-frame mailbox (counting what it overwrites as dropped); a
worker processes the newest frame -- batched handlers through their shared batcher, plain
per-frame handlers on the handler threads, never on the event loop -- and publishes the
result to the outgoing track. So a slow handler or a behind GPU drops frames instead of
building latency. Each session has a frame-size limit and a pixels-per-second budget.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from batching import DeadlineExceeded, FaultySource

from ...executors import media_executor
from ...frames import FrameConverter
from ...handlers import VideoStreamHandler
from ...session import HandlerTimeout, Session
from ...utils import AdditionalOutputs, CloseStream, TokenBucket, create_message, current_context, split_output
from ...video import BatchedHandler
from .tracks import ProcessedVideoTrack

if TYPE_CHECKING:
    from .connection import WebRTCConnection


class VideoPipeline:
    """Freshest-frame video processing for one session."""

    def __init__(self, session: Session, source: MediaStreamTrack, handler: Any, conn: WebRTCConnection) -> None:
        self.session = session
        self.source = source
        if isinstance(handler, VideoStreamHandler):
            handler = handler.callable
        self.handler = handler
        self.conn = conn
        self.batched = isinstance(handler, BatchedHandler)
        self.fmt = "rgb24" if self.batched else "bgr24"  # batched: RGB tensors; plain: FastRTC's BGR
        self.conv = FrameConverter()
        self.mailbox: Any = None
        self.new_frame = asyncio.Event()
        self.output = ProcessedVideoTrack()
        # Only send-receive sends video back; in "send" mode no frame is converted or encoded.
        self.send_back = session.config.mode == "send-receive"
        settings = session.config.settings
        self.max_pixels = settings.video_max_pixels
        self.pixels = TokenBucket(settings.video_pixel_rate, settings.video_pixel_rate)  # 1 s of budget
        self.received = 0
        self.processed = 0
        self.dropped = 0
        session.video = self  # type: ignore[attr-defined]
        if self.batched:
            # Tell the batcher how many sessions feed it, so a batch holding a frame from
            # every one of them runs at once instead of waiting out max_queue_delay.
            handler.add_producer()
            session.on_close(handler.remove_producer)
            session.on_close(lambda: handler.forget_source(session))
        session.spawn(self._read(), "video_in")
        session.spawn(self._work(), "video_work")

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.source.recv()
            except MediaStreamError:
                self.session.close("client closed the video track")
                return
            self.conn.got_media.set()
            if frame.width * frame.height > self.max_pixels:
                self.session.send_error(
                    f"video frame {frame.width}x{frame.height} is larger than this server's "
                    f"{self.max_pixels}-pixel limit (BATCHRTC_VIDEO_MAX_PIXELS); closing the session"
                )
                self.session.close("video frame too large")
                return
            self.received += 1
            if self.mailbox is not None:
                self.dropped += 1  # a newer frame replaces one never processed
            self.mailbox = frame
            self.new_frame.set()

    async def _work(self) -> None:
        session = self.session
        loop, media = asyncio.get_running_loop(), media_executor()
        while True:
            await self.new_frame.wait()
            self.new_frame.clear()
            frame, self.mailbox = self.mailbox, None
            if frame is None:
                continue
            if not self.pixels.take(min(frame.width * frame.height, self.pixels.burst)):
                self.dropped += 1  # over this session's pixel budget: a later frame will do
                continue
            args = session.args
            try:
                if self.batched:
                    arr = await loop.run_in_executor(media, self.conv.to_ndarray, frame, "rgb24")
                    out = await self.handler.submit(arr, args, source=session)
                else:
                    out = await session.call_limited(self._call_plain, frame, args)
            except HandlerTimeout:
                return
            except DeadlineExceeded:
                self.dropped += 1
                continue
            except FaultySource:
                session.send_error(
                    "the video handler's process crashed or hung on this session's frames twice "
                    "(the second time on its frame alone); closing the session"
                )
                session.close("video frames kill the handler")
                return
            except Exception as e:
                session.report_handler_error(e)
                continue
            array, extra = split_output(out)
            if isinstance(extra, AdditionalOutputs):
                session.push_outputs(extra)
            if isinstance(extra, CloseStream):
                session.send(create_message("end_stream", extra.msg))
                session.close("handler closed the stream")
                return
            if not self.send_back:  # mode="send": results go out as AdditionalOutputs only
                self.processed += 1
                continue
            if array is None:
                continue
            if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3 or array.dtype.kind not in "uif":
                desc = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                session.report_handler_error(TypeError(f"handler returned a frame of {desc}; expected an (H, W, 3) uint8 array"))
                continue
            if array.shape[0] * array.shape[1] > self.max_pixels or min(array.shape[:2]) < 2:
                session.report_handler_error(ValueError(f"handler returned a frame of shape {array.shape}"))
                continue
            out_frame = await loop.run_in_executor(media, self.conv.to_frame, array, self.fmt, frame.pts, frame.time_base)
            self.processed += 1
            self.output.publish(out_frame)

    def _call_plain(self, frame: Any, args: tuple) -> Any:
        current_context.set(self.session.context)
        return self.handler(self.conv.to_ndarray(frame, "bgr24"), *args)

    def stop(self) -> None:
        self.output.stop()
