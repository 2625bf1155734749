"""An AudioVideoStreamHandler over one WebRTC connection carrying both tracks."""

from __future__ import annotations

import asyncio
import queue

import numpy as np

from server import AudioVideoStreamHandler, Stream
from tests.webrtc_client import AudioSource, FrameSource, connect


class Mirror(AudioVideoStreamHandler):
    def __init__(self) -> None:
        super().__init__(input_sample_rate=48000, output_sample_rate=48000)
        self.audio: queue.Queue = queue.Queue(maxsize=200)
        self.frame: np.ndarray | None = None

    def receive(self, frame):
        try:
            self.audio.put_nowait(frame)
        except queue.Full:
            pass

    def emit(self):
        try:
            return self.audio.get(timeout=0.1)
        except queue.Empty:
            return None

    def video_receive(self, frame):
        self.frame = frame

    def video_emit(self):
        return None if self.frame is None else 255 - self.frame

    def copy(self):
        return Mirror()


async def test_audio_video_handler_round_trip(serve):
    stream = Stream(Mirror(), modality="audio-video", concurrency_limit=2)
    server = serve(stream)
    tone = (np.sin(np.arange(48000 * 3) * 2 * np.pi * 300 / 48000) * 10000).astype(np.int16)
    grey = np.full((120, 160, 3), 60, np.uint8)
    client, answer = await connect(
        server.http, "av", audio=AudioSource(tone), video=FrameSource(lambda i: grey, fps=15)
    )
    try:
        assert answer["type"] == "answer", answer
        await asyncio.sleep(2.5)
        assert client.frames and abs(client.frames[-1][1].mean() - 195) < 20  # inverted grey
        loud = [a for _, a in client.audio if np.abs(a.astype(np.int32)).mean() > 1500]
        assert len(loud) > 25, len(loud)  # the tone came back
    finally:
        await client.close()
