"""The WebRTC front end (aiortc): FastRTC's `POST /webrtc/offer`, tracks and data channel.

Video keeps only the freshest frame per session: a reader task overwrites a one-frame
mailbox (counting what it overwrites as dropped), a worker processes the newest frame —
batched handlers through their shared batcher, plain per-frame handlers on the handler
thread pool, never on the event loop — and the outgoing track waits for the next result.
So a slow handler or a behind GPU drops frames instead of building latency.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from batching import DeadlineExceeded

from .audio_out import AudioOut
from .frames import FrameConverter
from .handlers import AsyncAudioVideoStreamHandler, AudioVideoStreamHandler, DataChannel, StreamHandlerBase
from .session import HANDLER_POOL, HandlerTimeout, Session
from .utils import AdditionalOutputs, CloseStream, call_on_loop, create_message, split_output
from .video import BatchedHandler

if TYPE_CHECKING:
    from .stream import Stream

logger = logging.getLogger(__name__)

NO_MEDIA_TIMEOUT_S = 30.0  # as FastRTC: a connection that never gets media is dropped
AUDIO_OUT_QUEUE = 100
MAX_FRAME_PIXELS = 3840 * 2160  # a 4K frame; larger ones are refused, not decoded into the batcher  # 20 ms frames: 2 s of reply audio buffered at most


def _pin_ice_hosts() -> None:
    """`BATCHRTC_ICE_HOSTS=127.0.0.1` pins ICE host candidates to those addresses (aioice
    otherwise offers every interface but loopback). Tests and benchmarks use loopback."""
    hosts = os.environ.get("BATCHRTC_ICE_HOSTS")
    if hosts:
        import aioice.ice

        addrs = [h.strip() for h in hosts.split(",") if h.strip()]
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addrs)


_pin_ice_hosts()


class OfferBody(BaseModel):
    sdp: str | None = None
    type: str
    webrtc_id: str
    candidate: dict[str, Any] | None = None


def _failed(error: str, status: int = 200, **meta: Any) -> JSONResponse:
    return JSONResponse({"status": "failed", "meta": {"error": error, **meta}}, status_code=status)


def rtc_configuration(config: dict[str, Any] | None) -> RTCConfiguration:
    """The server's ICE configuration. Without one, no STUN server at all (aiortc would
    otherwise contact a public STUN server); pass TURN/STUN via `server_rtc_configuration`."""
    servers = []
    for s in (config or {}).get("iceServers", []) or []:
        servers.append(RTCIceServer(urls=s.get("urls"), username=s.get("username"), credential=s.get("credential")))
    return RTCConfiguration(iceServers=servers)


class WebRTCChannel(DataChannel):
    """Messages to the client's data channel; buffered (bounded) until it opens."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.channel: Any = None
        self.pending: list[str] = []

    def attach(self, channel: Any) -> None:
        self.channel = channel
        for msg in self.pending:
            self._send(msg)
        self.pending.clear()

    def send(self, message: str) -> None:  # any thread
        call_on_loop(self.loop, self._send, message)

    def _send(self, message: str) -> None:
        ch = self.channel
        if ch is None:
            if len(self.pending) < 64:
                self.pending.append(message)
            return
        if ch.readyState == "open":
            try:
                ch.send(message)
            except Exception:  # closing under us
                pass


def offer_endpoint(stream: Stream) -> Any:
    """The `POST /webrtc/offer` route function for one stream."""

    async def webrtc_offer(body: OfferBody) -> JSONResponse:
        return await handle_offer(stream, body)

    return webrtc_offer


async def handle_offer(stream: Stream, body: OfferBody) -> JSONResponse:
    if body.type == "ice-candidate":
        return await _add_candidate(stream, body)
    if body.type != "offer":
        return _failed("invalid_type", 400, detail=f"type must be 'offer' or 'ice-candidate', got {body.type!r}")
    if not body.sdp or not body.sdp.strip():
        return _failed("invalid_sdp", 400, detail="an offer needs a non-empty 'sdp'")
    loop = asyncio.get_running_loop()
    channel = WebRTCChannel(loop)
    session, refusal = stream._open_session(body.webrtc_id, channel, kind="webrtc")
    if session is None:
        return JSONResponse(json.loads(refusal or "{}"))
    pc = RTCPeerConnection(rtc_configuration(stream.server_rtc_configuration))
    conn = WebRTCConnection(stream, session, pc, channel)
    try:
        await conn.negotiate(RTCSessionDescription(sdp=body.sdp, type="offer"))
    except Exception as e:
        # A failed offer leaves nothing behind: no session, no peer connection, no slot.
        await session.close(f"bad offer: {e}")
        detail = str(e) or type(e).__name__
        return _failed("invalid_sdp", 400, detail=f"could not negotiate the offer: {detail}")
    return JSONResponse({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})


async def _add_candidate(stream: Stream, body: OfferBody) -> JSONResponse:
    session = stream.sessions.get(body.webrtc_id)
    conn = getattr(session, "webrtc", None) if session else None
    if conn is None:
        return _failed("unknown_connection")
    cand = body.candidate or {}
    try:
        text = cand["candidate"]
        ice = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        ice.sdpMid = cand.get("sdpMid")
        ice.sdpMLineIndex = cand.get("sdpMLineIndex")
        await conn.pc.addIceCandidate(ice)
    except Exception as e:
        return _failed("invalid_candidate_format", 400, detail=str(e))
    return JSONResponse({"status": "success"})


class WebRTCConnection:
    def __init__(self, stream: Stream, session: Session, pc: RTCPeerConnection, channel: WebRTCChannel) -> None:
        self.stream = stream
        self.session = session
        self.pc = pc
        self.channel = channel
        self.got_media = asyncio.Event()
        self.audio_out: AudioOutputTrack | None = None
        self.video_pipeline: VideoPipeline | None = None
        session.webrtc = self  # type: ignore[attr-defined]
        session.on_close(self._close)
        handler = session.handler
        if isinstance(handler, StreamHandlerBase):
            handler._clear_queue = self._clear_audio

        @pc.on("datachannel")
        def on_datachannel(ch: Any) -> None:
            channel.attach(ch)
            if stream.additional_inputs:
                channel.send(create_message("send_input", []))

            @ch.on("message")
            def on_message(message: Any) -> None:
                self._on_client_message(message)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await session.close(f"peer connection {pc.connectionState}")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._on_track(track)

    async def negotiate(self, offer: RTCSessionDescription) -> None:
        await self.pc.setRemoteDescription(offer)
        if self.stream.mode == "receive":
            self._add_server_tracks()
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        self.session.spawn(self._watchdog(), "no_media_watchdog")

    async def _watchdog(self) -> None:
        if self.stream.mode == "receive":
            return
        try:
            await asyncio.wait_for(self.got_media.wait(), NO_MEDIA_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.session.close("no media received")

    def _on_client_message(self, message: Any) -> None:
        try:
            data = json.loads(message) if isinstance(message, str) else None
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and data.get("type") == "set_input" and isinstance(data.get("data"), list):
            self.stream.set_input(self.session.webrtc_id, *data["data"])  # our extension
        self.channel.send(create_message("log", f"Server received: {str(message)[:200]}"))

    # -- tracks ------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        session, stream = self.session, self.stream
        handler = session.handler
        if track.kind == "video" and stream.modality in ("video", "audio-video"):
            if isinstance(handler, (AudioVideoStreamHandler, AsyncAudioVideoStreamHandler)):
                session.spawn(self._feed_av_video(track), "video_in")
                if stream.mode == "send-receive":
                    self.pc.addTrack(AVVideoOutputTrack(session))
                return
            self.video_pipeline = VideoPipeline(session, track, handler, self)
            if stream.mode == "send-receive":
                self.pc.addTrack(self.video_pipeline.output)
        elif track.kind == "audio" and stream.modality in ("audio", "audio-video"):
            session.spawn(self._feed_audio(track), "audio_in")
            # send mode: no audio back, but the handler's AdditionalOutputs still flow.
            self._start_audio_out(send_media=stream.mode == "send-receive")
        else:
            session.spawn(self._drain(track), f"unused_{track.kind}")

    def _add_server_tracks(self) -> None:
        if self.stream.modality in ("audio", "audio-video"):
            self._start_audio_out()
        if self.stream.modality in ("video", "audio-video"):
            self.pc.addTrack(GeneratedVideoTrack(self.session, self.stream))

    def _start_audio_out(self, send_media: bool = True) -> None:
        if self.audio_out is not None:
            return
        rate = getattr(self.session.handler, "output_sample_rate", 24000)
        self.audio_out = AudioOutputTrack(rate)
        self._send_audio = send_media
        if send_media:
            self.pc.addTrack(self.audio_out)
        self.session.spawn(self._emit_audio(), "audio_out")

    async def _drain(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return

    async def _feed_audio(self, track: MediaStreamTrack) -> None:
        handler = self.session.handler
        rate = getattr(handler, "input_sample_rate", 48000)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                await self.session.close("client closed the audio track")
                return
            self.got_media.set()
            for out in resampler.resample(frame):
                await self.session.receive((rate, out.to_ndarray().reshape(1, -1)))

    async def _feed_av_video(self, track: MediaStreamTrack) -> None:
        handler = self.session.handler
        conv = FrameConverter()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.got_media.set()
            arr = await asyncio.get_running_loop().run_in_executor(HANDLER_POOL, conv.to_ndarray, frame, "bgr24")
            try:
                await self.session.call(handler.video_receive, arr)
            except Exception as e:
                self.session.report_handler_error(e)

    async def _emit_audio(self) -> None:
        """Handler output -> 20 ms frames for the outgoing track (bounded: backpressure)."""
        assert self.audio_out is not None
        track = self.audio_out
        conv = AudioOut(track.rate)
        step = track.rate // 50
        carry = np.zeros(0, dtype=np.int16)
        nxt: asyncio.Future | None = None
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(self.session.next_output())
            done, _ = await asyncio.wait({nxt}, timeout=0.04 if carry.size else None)
            if not done:  # the reply paused: play out the partial frame
                await track.queue.put(np.concatenate([carry, np.zeros(step - carry.size, np.int16)]))
                carry = carry[:0]
                continue
            item, nxt = nxt.result(), None
            frame, extra = split_output(item)
            if isinstance(extra, AdditionalOutputs):
                self.session.push_outputs(extra)
            if self._send_audio and isinstance(frame, tuple) and len(frame) >= 2 and isinstance(frame[1], np.ndarray):
                pcm = np.concatenate([carry, conv.convert(int(frame[0]), frame[1])])
                n = pcm.size - pcm.size % step
                for i in range(0, n, step):
                    await track.queue.put(pcm[i : i + step])
                carry = pcm[n:]
            if isinstance(extra, CloseStream):
                await track.played_out()
                self.session.send(create_message("end_stream", extra.msg))
                await self.session.close("handler closed the stream")
                return

    def _clear_audio(self) -> None:
        if self.audio_out is not None:
            self.audio_out.clear()

    async def _close(self) -> None:
        if self.video_pipeline is not None:
            self.video_pipeline.stop()
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:
            logger.debug("pc.close failed for %s", self.session.webrtc_id, exc_info=True)


class AudioOutputTrack(MediaStreamTrack):
    """20 ms frames at real time: reply audio when there is some, silence otherwise."""

    kind = "audio"

    def __init__(self, rate: int) -> None:
        super().__init__()
        self.rate = rate
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(AUDIO_OUT_QUEUE)
        self._start: float | None = None
        self._ts = 0
        self._silence = np.zeros(rate // 50, dtype=np.int16)

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
            data = self._silence
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._ts
        frame.time_base = fractions.Fraction(1, self.rate)
        return frame


class VideoPipeline:
    """Freshest-frame video processing for one session."""

    def __init__(self, session: Session, source: MediaStreamTrack, handler: Any, conn: WebRTCConnection) -> None:
        self.session = session
        self.source = source
        self.handler = handler
        self.conn = conn
        self.batched = isinstance(handler, BatchedHandler)
        self.fmt = "rgb24" if self.batched else "bgr24"  # batched: RGB tensors; plain: FastRTC's BGR
        self.conv = FrameConverter()
        self.mailbox: Any = None
        self.new_frame = asyncio.Event()
        self.output = ProcessedVideoTrack()
        self.received = 0
        self.processed = 0
        self.dropped = 0
        session.video = self  # type: ignore[attr-defined]
        if self.batched:
            # Tell the batcher how many sessions feed it, so a batch holding a frame from
            # every one of them runs at once instead of waiting out max_queue_delay.
            handler.batcher.add_producer()
            session.on_close(handler.batcher.remove_producer)
        session.spawn(self._read(), "video_in")
        session.spawn(self._work(), "video_work")

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.source.recv()
            except MediaStreamError:
                await self.session.close("client closed the video track")
                return
            self.conn.got_media.set()
            if frame.width * frame.height > MAX_FRAME_PIXELS:
                self.session.send_error(
                    f"video frame {frame.width}x{frame.height} is larger than the "
                    f"{MAX_FRAME_PIXELS}-pixel limit; closing the session"
                )
                await self.session.close("video frame too large")
                return
            self.received += 1
            if self.mailbox is not None:
                self.dropped += 1  # a newer frame replaces one never processed
            self.mailbox = frame
            self.new_frame.set()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.new_frame.wait()
            self.new_frame.clear()
            frame, self.mailbox = self.mailbox, None
            if frame is None:
                continue
            args = tuple(self.session.latest_args if self.session.latest_args is not None else self.session.stream.default_args)
            try:
                if self.batched:
                    arr = await loop.run_in_executor(HANDLER_POOL, self.conv.to_ndarray, frame, "rgb24")
                    out = await self.handler.submit(arr, args)
                else:
                    out = await self.session.call_limited(self._call_plain, frame, args)
            except HandlerTimeout:
                return
            except DeadlineExceeded:
                self.dropped += 1
                continue
            except Exception as e:
                self.session.report_handler_error(e)
                continue
            array, extra = split_output(out)
            if isinstance(extra, AdditionalOutputs):
                self.session.push_outputs(extra)
            if isinstance(extra, CloseStream):
                self.session.send(create_message("end_stream", extra.msg))
                await self.session.close("handler closed the stream")
                return
            if isinstance(array, np.ndarray):
                if array.ndim != 3 or array.shape[2] != 3:
                    self.session.report_handler_error(ValueError(f"handler returned a frame of shape {array.shape}; expected (H, W, 3)"))
                    continue
                out_frame = await loop.run_in_executor(
                    HANDLER_POOL, self.conv.to_frame, array, self.fmt, frame.pts, frame.time_base
                )
                self.processed += 1
                self.output.publish(out_frame)

    def _call_plain(self, frame: Any, args: tuple) -> Any:
        from .utils import current_context

        current_context.set(self.session.context)
        return self.handler(self.conv.to_ndarray(frame, "bgr24"), *args)

    def stop(self) -> None:
        self.output.stop()


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


class _PacedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, fps: int) -> None:
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
        """A handler's video output -> a frame (black when it gave none this time)."""
        array, extra = split_output(out)
        if isinstance(extra, AdditionalOutputs):
            session.push_outputs(extra)
        if not isinstance(array, np.ndarray):
            array = np.zeros((480, 640, 3), np.uint8)
        return self._conv.to_frame(array, "bgr24", pts, tb)


class AVVideoOutputTrack(_PacedVideoTrack):
    """Video out of an AudioVideoStreamHandler's `video_emit`."""

    def __init__(self, session: Session) -> None:
        super().__init__(getattr(session.handler, "fps", 30))
        self.session = session

    async def recv(self) -> Any:
        pts, tb = await self._pace()
        out = await self.session.call(self.session.handler.video_emit)
        return self._to_frame(self.session, out, pts, tb)


class GeneratedVideoTrack(_PacedVideoTrack):
    """`mode="receive"` video: frames from the handler's generator, paced at 30 fps."""

    def __init__(self, session: Session, stream: Stream) -> None:
        super().__init__(30)
        self.session = session
        args = session.latest_args if session.latest_args is not None else stream.default_args
        self._gen = session.handler(*args)

    async def recv(self) -> Any:
        pts, tb = await self._pace()
        sentinel = object()
        out = await asyncio.get_running_loop().run_in_executor(HANDLER_POOL, next, self._gen, sentinel)
        if out is sentinel:
            self.stop()
            raise MediaStreamError
        return self._to_frame(self.session, out, pts, tb)
