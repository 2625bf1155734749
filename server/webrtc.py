"""The WebRTC front end (aiortc): FastRTC's `POST /webrtc/offer`, tracks and data channel.

Video keeps only the freshest frame per session: a reader task overwrites a one-frame
mailbox (counting what it overwrites as dropped), a worker processes the newest frame —
batched handlers through their shared batcher, plain per-frame handlers on the handler
threads, never on the event loop — and the outgoing track waits for the next result.
So a slow handler or a behind GPU drops frames instead of building latency.

An offer is checked before anything is allocated for it: its body is capped, its SDP must
parse and offer at least one media or data section, and (unless `allow_extra_tracks`) only
the kinds of media the stream's modality takes.
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
from aiortc.sdp import SessionDescription, candidate_from_sdp
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from batching import DeadlineExceeded, FaultySource

from .emit import pump_outputs
from .frames import FrameConverter
from .handlers import (
    AsyncAudioVideoStreamHandler,
    AudioVideoStreamHandler,
    DataChannel,
    StreamHandlerBase,
    VideoStreamHandler,
)
from .registry import Refused
from .request_body import read_json
from .session import HandlerTimeout, Session
from .utils import (
    AdditionalOutputs,
    CloseStream,
    TokenBucket,
    call_on_loop,
    create_message,
    current_context,
    parse_json_message,
    split_output,
)
from .video import BatchedHandler

if TYPE_CHECKING:
    from .stream import Stream

logger = logging.getLogger(__name__)

NO_MEDIA_TIMEOUT_S = 30.0  # as FastRTC: a connection that never gets media is dropped
AUDIO_OUT_QUEUE = 100  # 20 ms frames: 2 s of reply audio buffered at most
MAX_OFFER_BYTES = 256 * 1024  # an SDP offer is a few KB; ICE candidates add little
MAX_CHANNEL_MESSAGE_BYTES = 64 * 1024
# Data-channel messages per connection: inputs and control messages, a few a second. A client
# far above this is flooding and its session is closed.
MAX_CHANNEL_MESSAGES_PER_S = 50.0
MAX_CHANNEL_MESSAGE_BURST = 200.0
MEDIA_KINDS = {"video": ("video",), "audio": ("audio",), "audio-video": ("audio", "video")}


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
    """FastRTC's offer body. `webrtc_id` is chosen by the client and is a bearer secret for
    the session: make it random (the `/ui` page gets one from the server)."""

    sdp: str | None = None
    type: str
    webrtc_id: str = Field(min_length=1, max_length=256)
    candidate: dict[str, Any] | None = None


OFFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": OfferBody.model_json_schema()}},
    }
}


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
            except ValueError:  # larger than the peer's maximum message size (64 KiB unless it says)
                try:
                    ch.send(create_message("error", f"a {len(message)}-byte message is larger than this data channel carries; dropped"))
                except Exception:
                    pass
            except Exception:  # closing under us
                pass


def offer_endpoint(stream: Stream) -> Any:
    """The `POST /webrtc/offer` route function for one stream."""

    async def webrtc_offer(request: Request) -> JSONResponse:
        raw = await read_json(request, MAX_OFFER_BYTES)
        try:
            body = OfferBody.model_validate(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return await handle_offer(stream, body)

    return webrtc_offer


def check_offer_sdp(sdp: str, modality: str, allow_extra_tracks: bool) -> str | None:
    """What is wrong with an offer's SDP for this stream, or None. Cheap: nothing is
    allocated before this passes."""
    if "\x00" in sdp:
        return "the SDP contains NUL bytes"
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:  # aiortc's parser raises plain exceptions on garbage
        return f"the SDP does not parse: {type(e).__name__}: {e}"
    kinds = [m.kind for m in desc.media]
    if not kinds:
        return "the SDP offers no media and no data channel (no m= section)"
    unknown = [k for k in kinds if k not in ("audio", "video", "application")]
    if unknown:
        return f"the SDP offers unsupported media {unknown[0]!r}"
    if not allow_extra_tracks:
        for kind in kinds:
            if kind != "application" and kind not in MEDIA_KINDS[modality]:
                return f"Unsupported track kind '{kind}' for modality '{modality}'"
    return None


async def handle_offer(stream: Stream, body: OfferBody) -> JSONResponse:
    if body.type == "ice-candidate":
        return await add_candidate(stream, body.webrtc_id, body.candidate)
    if body.type != "offer":
        return _failed("invalid_type", 400, detail=f"type must be 'offer' or 'ice-candidate', got {body.type!r}")
    if not body.sdp or not body.sdp.strip():
        return _failed("invalid_sdp", 400, detail="an offer needs a non-empty 'sdp'")
    problem = check_offer_sdp(body.sdp, stream.modality, stream.allow_extra_tracks)
    if problem is not None:
        error = "unsupported_track_kind" if problem.startswith("Unsupported track kind") else "invalid_sdp"
        return _failed(error, 400, detail=problem)
    return await negotiate(stream, body.webrtc_id, body.sdp)


async def negotiate(stream: Stream, webrtc_id: str, sdp: str) -> JSONResponse:
    """Open a session for an offer that passed `check_offer_sdp` and answer it."""
    channel = WebRTCChannel(asyncio.get_running_loop())
    try:
        session = stream.open_session(webrtc_id, channel, kind="webrtc")
    except Refused as r:
        return JSONResponse(r.body())
    except Exception as e:  # the handler's copy() raised: not the client's fault
        logger.exception("could not open a session")
        return _failed("negotiation_failed", 500, detail=f"{type(e).__name__}: {e}")
    pc = RTCPeerConnection(rtc_configuration(stream.server_rtc_configuration))
    conn = WebRTCConnection(stream, session, pc, channel)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as e:
        # A failed offer leaves nothing behind: no session, no peer connection, no slot.
        await session.close(f"bad offer: {type(e).__name__}")
        return _failed("invalid_sdp", 400, detail=f"could not negotiate the offer: {str(e) or type(e).__name__}")
    try:
        await conn.start()
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as e:  # not the SDP's fault: ours or the handler's
        logger.exception("session %s: negotiation failed", session.log_id)
        await session.close(f"negotiation failed: {type(e).__name__}")
        return _failed("negotiation_failed", 500, detail=f"{type(e).__name__}: {e}")
    return JSONResponse({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})


async def add_candidate(stream: Stream, webrtc_id: str, candidate: dict[str, Any] | None) -> JSONResponse:
    session = stream.registry.get(webrtc_id)
    conn = getattr(session, "webrtc", None) if session else None
    if conn is None:
        return _failed("unknown_connection")
    cand = candidate or {}
    try:
        text = cand["candidate"]
        if not isinstance(text, str) or len(text) > 1024:
            raise ValueError("candidate must be a string of at most 1024 characters")
        ice = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        ice.sdpMid = cand.get("sdpMid")
        ice.sdpMLineIndex = cand.get("sdpMLineIndex")
        await conn.pc.addIceCandidate(ice)
    except Exception as e:
        return _failed("invalid_candidate_format", 400, detail=str(e)[:200])
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
        self._messages = TokenBucket(MAX_CHANNEL_MESSAGES_PER_S, MAX_CHANNEL_MESSAGE_BURST)
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
                session.close(f"peer connection {pc.connectionState}")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._on_track(track)

    async def start(self) -> None:
        """After the remote description: server-side tracks, the handler's `start_up`, and
        the no-media watchdog."""
        if self.stream.mode == "receive":
            self._add_server_tracks()
        self.session.start_up()
        if self.stream.mode != "receive":
            self.session.spawn(self._watchdog(), "no_media_watchdog")

    async def _watchdog(self) -> None:
        try:
            await asyncio.wait_for(self.got_media.wait(), NO_MEDIA_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.session.close("no media received")

    def _on_client_message(self, message: Any) -> None:
        session = self.session
        if not session.active:
            return
        if not self._messages.take():
            session.send_error(f"too many data-channel messages (at most {MAX_CHANNEL_MESSAGES_PER_S:g} a second); closing")
            session.close("data channel flood")
            return
        if not isinstance(message, str):
            session.send_error("data-channel messages must be JSON text")
            return
        try:
            data = parse_json_message(message, MAX_CHANNEL_MESSAGE_BYTES)
        except ValueError as e:
            session.send_error(str(e))
            return
        if isinstance(data, dict) and data.get("type") == "set_input" and isinstance(data.get("data"), list):
            self.stream.set_input(session.webrtc_id, *data["data"])  # our extension
        # FastRTC echoes what the client sent as a `log` message.
        self.channel.send(create_message("log", f"Server received: {message[:200]}"))

    # -- tracks ------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        session, stream = self.session, self.stream
        if not session.active:
            return
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
        else:  # allow_extra_tracks: received, not used
            session.spawn(self._drain(track), f"unused_{track.kind}")

    def _add_server_tracks(self) -> None:
        handler = self.session.handler
        if self.stream.modality in ("audio", "audio-video"):
            self._start_audio_out()
        if self.stream.modality in ("video", "audio-video"):
            if isinstance(handler, (AudioVideoStreamHandler, AsyncAudioVideoStreamHandler)):
                self.pc.addTrack(AVVideoOutputTrack(self.session))
            else:
                self.pc.addTrack(GeneratedVideoTrack(self.session, self.stream))

    def _start_audio_out(self, send_media: bool = True) -> None:
        if self.audio_out is not None:
            return
        rate = getattr(self.session.handler, "output_sample_rate", 24000)
        self.audio_out = AudioOutputTrack(rate)
        if send_media:
            self.pc.addTrack(self.audio_out)
        sink = TrackAudioSink(self.audio_out, send_media)
        self.session.spawn(pump_outputs(self.session, sink), "audio_out")

    async def _drain(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return

    async def _feed_audio(self, track: MediaStreamTrack) -> None:
        handler = self.session.handler
        rate = getattr(handler, "input_sample_rate", 48000)
        layout = getattr(handler, "expected_layout", "mono")
        channels = 2 if layout == "stereo" else 1
        resampler = av.AudioResampler(format="s16p", layout=layout, rate=rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.session.close("client closed the audio track")
                return
            self.got_media.set()
            for out in resampler.resample(frame):
                # planar s16: (channels, samples), what handlers get (FastRTC: (1, n) mono)
                await self.session.receive((rate, out.to_ndarray().reshape(channels, -1)))

    async def _feed_av_video(self, track: MediaStreamTrack) -> None:
        handler = self.session.handler
        conv = FrameConverter()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.got_media.set()
            arr = await self.session.run_blocking(conv.to_ndarray, frame, "bgr24")
            try:
                await self.session.call(handler.video_receive, arr)
            except Exception as e:
                self.session.report_handler_error(e)

    def _clear_audio(self) -> None:
        if self.audio_out is not None:
            call_on_loop(self.session.loop, self.audio_out.clear)

    async def _close(self) -> None:
        if self.video_pipeline is not None:
            self.video_pipeline.stop()
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:
            logger.debug("pc.close failed for %s", self.session.log_id, exc_info=True)


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
        self.carry = pcm[n:]

    async def idle(self) -> None:
        """The reply paused: play out the partial frame."""
        if self.carry.size:
            await self.track.queue.put(np.concatenate([self.carry, np.zeros(self.step - self.carry.size, np.int16)]))
            self.carry = self.carry[:0]

    async def drain(self) -> None:
        await self.idle()
        await self.track.played_out()


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
        settings = session.stream.settings
        self.max_pixels = settings.video_max_pixels
        self.pixels = TokenBucket(settings.video_pixel_rate, settings.video_pixel_rate)  # 1 s of budget
        self.received = 0
        self.processed = 0
        self.dropped = 0
        session.video = self  # type: ignore[attr-defined]
        if self.batched:
            # Tell the batcher how many sessions feed it, so a batch holding a frame from
            # every one of them runs at once instead of waiting out max_queue_delay.
            batcher = handler.batcher
            batcher.add_producer()
            session.on_close(batcher.remove_producer)
            session.on_close(lambda: batcher.forget_source(session))
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
        while True:
            await self.new_frame.wait()
            self.new_frame.clear()
            frame, self.mailbox = self.mailbox, None
            if frame is None:
                continue
            if not self.pixels.take(min(frame.width * frame.height, self.pixels.burst)):
                self.dropped += 1  # over this session's pixel budget: a later frame will do
                continue
            args = tuple(session.latest_args if session.latest_args is not None else session.stream.default_args)
            try:
                if self.batched:
                    arr = await session.run_blocking(self.conv.to_ndarray, frame, "rgb24")
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
            if array is None:
                continue
            if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3 or array.dtype.kind not in "uif":
                desc = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                session.report_handler_error(TypeError(f"handler returned a frame of {desc}; expected an (H, W, 3) uint8 array"))
                continue
            if array.shape[0] * array.shape[1] > self.max_pixels or min(array.shape[:2]) < 2:
                session.report_handler_error(ValueError(f"handler returned a frame of shape {array.shape}"))
                continue
            out_frame = await session.run_blocking(self.conv.to_frame, array, self.fmt, frame.pts, frame.time_base)
            self.processed += 1
            self.output.publish(out_frame)

    def _call_plain(self, frame: Any, args: tuple) -> Any:
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

    def __init__(self, session: Session, stream: Stream) -> None:
        super().__init__(getattr(session.handler, "fps", 30))
        self.session = session
        self.stream = stream
        self._gen: Any = None

    async def recv(self) -> Any:
        pts, tb = await self._pace()
        session = self.session
        sentinel = object()
        try:
            if self._gen is None:  # made here, not at negotiation: inputs may have arrived
                args = session.latest_args if session.latest_args is not None else self.stream.default_args
                self._gen = session.handler(*args)
            out = await session.run_blocking(next, self._gen, sentinel)
        except Exception as e:
            session.report_handler_error(e)
            out = sentinel
        if out is sentinel:
            self.stop()
            raise MediaStreamError
        return self._to_frame(session, out, pts, tb)
