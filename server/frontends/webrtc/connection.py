"""One WebRTC connection: its peer connection, its data channel, its tracks' tasks.

The data channel carries FastRTC's JSON messages (`send_input`, `fetch_output`, `log`,
`error`, ...); messages are bounded in size and rate. Incoming audio is resampled to the
handler's rate and layout and handed to the session; incoming video goes through the
session's `VideoPipeline`; reply audio comes from the session's output pump.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from ...emit import pump_outputs
from ...executors import media_executor
from ...frames import FrameConverter
from ...handlers import AsyncAudioVideoStreamHandler, AudioVideoStreamHandler, DataChannel, StreamHandlerBase
from ...limits import MAX_CHANNEL_MESSAGE_BURST, MAX_CHANNEL_MESSAGE_BYTES, MAX_CHANNEL_MESSAGES_PER_S, NO_MEDIA_TIMEOUT_S
from ...reply_on_pause import ReplyOnPause
from ...deadlines import CallTimedOut, call_deadlines
from ...session import Session
from ...utils import TokenBucket, call_on_loop, create_message, parse_json_message
from .dtx import GAP_WAIT_S, GapFiller
from .inline_decode import InlineAudioDecoder, decode_audio_on_loop
from .tracks import AudioOutputTrack, AVVideoOutputTrack, GeneratedVideoTrack, TrackAudioSink
from .video import VideoPipeline

if TYPE_CHECKING:
    from ...config import StreamConfig
    from ...registry import SessionRegistry

logger = logging.getLogger(__name__)


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


class WebRTCConnection:
    def __init__(
        self, config: StreamConfig, registry: SessionRegistry, session: Session, pc: RTCPeerConnection,
        channel: WebRTCChannel,
    ) -> None:
        self.config = config
        self.registry = registry
        self.session = session
        self.pc = pc
        self.channel = channel
        self.got_media = asyncio.Event()
        self.audio_out: AudioOutputTrack | None = None
        self.video_pipeline: VideoPipeline | None = None
        self.inline_decoder: InlineAudioDecoder | None = None  # None: aiortc's decoder thread
        self._messages = TokenBucket(MAX_CHANNEL_MESSAGES_PER_S, MAX_CHANNEL_MESSAGE_BURST)
        session.webrtc = self  # type: ignore[attr-defined]
        session.on_close(self._close)
        handler = session.handler
        if isinstance(handler, StreamHandlerBase):
            handler._clear_queue = self._clear_audio

        @pc.on("datachannel")
        def on_datachannel(ch: Any) -> None:
            channel.attach(ch)
            # Ask for the inputs' values at once; ReplyOnPause asks itself at each turn (as FastRTC).
            if config.additional_inputs and not isinstance(handler, ReplyOnPause):
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
        if self.config.mode == "receive":
            self._add_server_tracks()
        self.session.start_up()
        if self.config.mode != "receive":
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
            session.set_input(list(data["data"]))  # our extension
        # FastRTC echoes what the client sent as a `log` message.
        self.channel.send(create_message("log", f"Server received: {message[:200]}"))

    # -- tracks ------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        session, config = self.session, self.config
        if not session.active:
            return
        handler = session.handler
        if track.kind == "audio":  # no thread handoff per 20 ms packet (inline_decode.py)
            for transceiver in self.pc.getTransceivers():
                if transceiver.receiver.track is track:
                    self.inline_decoder = decode_audio_on_loop(transceiver.receiver)
        if track.kind == "video" and config.modality in ("video", "audio-video"):
            if isinstance(handler, (AudioVideoStreamHandler, AsyncAudioVideoStreamHandler)):
                session.spawn(self._feed_av_video(track), "video_in")
                if config.mode == "send-receive":
                    self.pc.addTrack(AVVideoOutputTrack(session))
                return
            self.video_pipeline = VideoPipeline(session, track, handler, self)
            if config.mode == "send-receive":
                self.pc.addTrack(self.video_pipeline.output)
        elif track.kind == "audio" and config.modality in ("audio", "audio-video"):
            session.spawn(self._feed_audio(track), "audio_in")
            # send mode: no audio back, but the handler's AdditionalOutputs still flow.
            self._start_audio_out(send_media=config.mode == "send-receive")
        else:  # allow_extra_tracks: received, not used
            session.spawn(self._drain(track), f"unused_{track.kind}")

    def _add_server_tracks(self) -> None:
        handler = self.session.handler
        if self.config.modality in ("audio", "audio-video"):
            self._start_audio_out()
        if self.config.modality in ("video", "audio-video"):
            if isinstance(handler, (AudioVideoStreamHandler, AsyncAudioVideoStreamHandler)):
                self.pc.addTrack(AVVideoOutputTrack(self.session))
            else:
                self.pc.addTrack(GeneratedVideoTrack(self.session))

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
        loop = asyncio.get_running_loop()
        gaps: GapFiller | None = None  # the media clock, from the first frame on (dtx.py)
        carry = 0  # silence samples at the frame rate not yet whole at the handler's rate

        async def silence(n: int, frame_rate: int) -> None:
            nonlocal carry
            total = n * rate + carry
            out, carry = divmod(total, frame_rate)
            if out:
                await self.session.receive((rate, np.zeros((channels, out), np.int16)))

        while True:
            try:
                frame = await self._next_frame(track, GAP_WAIT_S if gaps is not None and gaps.waiting else None)
            except MediaStreamError:
                self.session.close("client closed the audio track")
                return
            if frame is None:  # DTX, or the client stopped sending: the silence goes on
                assert gaps is not None
                n = gaps.on_wait(loop.time())
                if n:
                    await silence(n, gaps.rate)
                continue
            self.got_media.set()
            if gaps is None:
                gaps = GapFiller(frame.sample_rate)
            n = gaps.on_frame(frame.pts or 0, frame.samples, loop.time())
            if n:
                await silence(n, frame.sample_rate)
            for out in resampler.resample(frame):
                # planar s16: (channels, samples), what handlers get (FastRTC: (1, n) mono)
                await self.session.receive((rate, out.to_ndarray().reshape(channels, -1)))

    @staticmethod
    async def _next_frame(track: MediaStreamTrack, wait_s: float | None) -> Any | None:
        """The track's next frame, or None when `wait_s` passed without one. The wait is the
        loop's deadline watcher (`server/deadlines.py`), as for every handler call: no timer or
        task per frame. (`recv` is safe to cancel: a frame already queued stays queued.)"""
        if wait_s is None:
            return await track.recv()
        try:
            return await call_deadlines(asyncio.get_running_loop()).run(track.recv(), wait_s)
        except CallTimedOut:
            return None

    async def _feed_av_video(self, track: MediaStreamTrack) -> None:
        handler = self.session.handler
        conv = FrameConverter()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.got_media.set()
            arr = await asyncio.get_running_loop().run_in_executor(media_executor(), conv.to_ndarray, frame, "bgr24")
            try:
                await self.session.call(handler.video_receive, arr)
            except Exception as e:
                self.session.report_handler_error(e)

    async def _drain_channel(self, timeout: float) -> None:
        """Let the last messages (e.g. the error that says why the session ends) leave before
        the peer connection closes: closing it drops what the data channel still buffers."""
        await asyncio.sleep(0)  # sends scheduled from other threads run first
        ch = self.channel.channel
        deadline = asyncio.get_running_loop().time() + timeout
        while (ch is not None and ch.readyState == "open" and ch.bufferedAmount > 0
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.01)

    def _clear_audio(self) -> None:
        if self.audio_out is not None:
            call_on_loop(self.session.loop, self.audio_out.clear)

    async def _close(self) -> None:
        if self.video_pipeline is not None:
            self.video_pipeline.stop()
        await self._drain_channel(1.0)
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:
            logger.debug("pc.close failed for %s", self.session.log_id, exc_info=True)
