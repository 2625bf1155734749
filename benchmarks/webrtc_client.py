"""An aiortc client that speaks FastRTC's offer protocol, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


class FrameSource(MediaStreamTrack):
    """Video frames from `make(i) -> (H, W, 3) uint8 RGB` at `fps`; records send times. Frame
    i is due at `start + i / fps` (`start`: a `time.monotonic()` value shared by several
    sources to send in step; default: the first `recv`)."""

    kind = "video"

    def __init__(
        self, make: Callable[[int], np.ndarray], fps: int = 30, limit: int | None = None,
        start: float | None = None,
    ) -> None:
        super().__init__()
        self.make = make
        self.fps = fps
        self.limit = limit
        self.sent: dict[int, float] = {}  # pts -> send time
        self._start = start
        self._i = 0

    async def recv(self) -> av.VideoFrame:
        if self.limit is not None and self._i >= self.limit:
            self.stop()
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._i / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.VideoFrame.from_ndarray(self.make(self._i), format="rgb24")
        frame.pts = self._i * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        self.sent[frame.pts] = time.monotonic()
        self._i += 1
        return frame


class AudioSource(MediaStreamTrack):
    """Mono int16 audio at 48 kHz in 20 ms frames at real time, then silence."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray) -> None:
        super().__init__()
        self.pcm = pcm
        self._start: float | None = None
        self._i = 0

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._i * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self.pcm[self._i * 960 : (self._i + 1) * 960]
        if chunk.size < 960:
            chunk = np.concatenate([chunk, np.zeros(960 - chunk.size, np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        self._i += 1
        return frame


@dataclass
class Client:
    pc: RTCPeerConnection
    webrtc_id: str
    frames: list[tuple[float, np.ndarray, int]] = field(default_factory=list)  # (arrival, rgb, pts)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    channel: Any = None

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await self.pc.close()


async def _collect_video(track: MediaStreamTrack, client: Client, keep: int) -> None:
    try:
        while True:
            frame = await track.recv()
            t = time.monotonic()
            # rgb24 conversion is this loop's dearest step: skip it for frames not kept
            arr = frame.to_ndarray(format="rgb24") if len(client.frames) < keep else None
            client.frames.append((t, arr, frame.pts))
    except MediaStreamError:
        return


async def _collect_audio(track: MediaStreamTrack, client: Client) -> None:
    try:
        while True:
            frame = await track.recv()
            client.audio.append((time.monotonic(), frame.to_ndarray().reshape(-1)[:: len(frame.layout.channels)].copy()))
    except MediaStreamError:
        return


async def connect(
    base_url: str,
    webrtc_id: str,
    *,
    video: MediaStreamTrack | None = None,
    audio: MediaStreamTrack | None = None,
    recv_video: bool = False,
    recv_audio: bool = False,
    keep_frames: int = 10_000,
    configuration: RTCConfiguration | None = None,
) -> tuple[Client, dict]:
    """Connect like FastRTC's Python client: data channel first, then the offer.
    `configuration`: the client's ICE servers and policy (default: none, host candidates)."""
    pc = RTCPeerConnection(configuration or RTCConfiguration(iceServers=[]))
    client = Client(pc, webrtc_id)
    channel = pc.createDataChannel("text")
    client.channel = channel

    @channel.on("message")
    def on_message(msg: str) -> None:
        client.messages.append(json.loads(msg))

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            client.tasks.append(asyncio.create_task(_collect_video(track, client, keep_frames)))
        else:
            client.tasks.append(asyncio.create_task(_collect_audio(track, client)))

    if video is not None:
        pc.addTrack(video)
    elif recv_video:
        pc.addTransceiver("video", direction="recvonly")
    if audio is not None:
        pc.addTrack(audio)
    elif recv_audio:
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{base_url}/webrtc/offer",
            json={"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": webrtc_id},
        )
    body = r.json()
    if r.status_code == 200 and body.get("type") == "answer":
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
    else:
        await pc.close()
    body["_status"] = r.status_code
    return client, body
