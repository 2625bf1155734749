"""FastRTC WebRTC client (aiortc + httpx): send media, collect what comes back.

    pip install aiortc httpx numpy scipy
    python webrtc_client.py [speech.wav] [BASE_URL]
"""
import asyncio
import fractions
import json
import sys
import time
import uuid
import wave

import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame
from scipy.signal import resample_poly

BASE_URL = "http://127.0.0.1:8000"  # the offer goes to BASE_URL + "/webrtc/offer"
MODALITY = "audio"  # "audio", "video" or "audio-video"
MODE = "send-receive"  # "send-receive", "send" (to the server only) or "receive" (from it only)
SEND = MODE in ("send-receive", "send")
RECEIVE = MODE in ("send-receive", "receive")


def load_wav(path, rate):
    """A 16-bit PCM WAV file as mono int16 samples at `rate`."""
    with wave.open(path, "rb") as w:
        src = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        x = x.reshape(-1, w.getnchannels())[:, 0]
    if src != rate:
        x = resample_poly(x.astype(np.float64), rate, src)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


class WavTrack(MediaStreamTrack):
    """A WAV file (or silence) as 48 kHz mono 20 ms frames at real-time pace."""

    kind = "audio"

    def __init__(self, path=None):
        super().__init__()
        self.pcm = load_wav(path, 48000) if path else np.zeros(0, dtype=np.int16)
        self.start = None
        self.i = 0

    async def recv(self):
        if self.start is None:
            self.start = time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.i * 0.02 - time.monotonic()))
        chunk = self.pcm[self.i * 960:(self.i + 1) * 960]
        chunk = np.concatenate([chunk, np.zeros(960 - len(chunk), dtype=np.int16)])
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        self.i += 1
        return frame


class PatternTrack(MediaStreamTrack):
    """A 320x240 test pattern at 15 fps: an orange background with a moving white bar."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self.start = None
        self.i = 0

    async def recv(self):
        if self.start is None:
            self.start = time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.i / 15 - time.monotonic()))
        img = np.empty((240, 320, 3), dtype=np.uint8)
        img[:] = (200, 128, 0)
        x = (self.i * 8) % 300
        img[:, x:x + 20] = 255
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = self.i * 6000
        frame.time_base = fractions.Fraction(1, 90000)
        self.i += 1
        return frame


async def main(base_url, wav_path=None, seconds=None):
    # No STUN/TURN here (both ends on one network); add iceServers to reach remote peers.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    # The data channel goes first, as FastRTC's clients do: server messages arrive on it.
    channel = pc.createDataChannel("text")
    messages, audio, frames, tasks = [], [], [], []

    @channel.on("message")
    def on_message(raw):
        msg = json.loads(raw)
        messages.append(msg)
        print("server:", msg)
        # msg["type"] == "send_input": send the current values of the additional inputs,
        # e.g. channel.send(json.dumps({"type": "set_input", "data": [0.5]})).

    async def collect(track):
        try:
            while True:
                frame = await track.recv()
                if track.kind == "audio":
                    samples = frame.to_ndarray().reshape(-1)[::len(frame.layout.channels)]
                    audio.append(samples.copy())
                else:
                    frames.append(frame.to_ndarray(format="rgb24"))
        except MediaStreamError:
            pass

    @pc.on("track")
    def on_track(track):
        tasks.append(asyncio.ensure_future(collect(track)))

    if "audio" in MODALITY:
        if SEND:
            pc.addTrack(WavTrack(wav_path))
        else:
            pc.addTransceiver("audio", direction="recvonly")
    if "video" in MODALITY:
        if SEND:
            pc.addTrack(PatternTrack())
        else:
            pc.addTransceiver("video", direction="recvonly")

    # aiortc gathers its ICE candidates before the offer is set: nothing to trickle.
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": str(uuid.uuid4())}
    async with httpx.AsyncClient(timeout=30) as http:
        answer = (await http.post(base_url + "/webrtc/offer", json=body)).json()
    if answer.get("status") == "failed":  # {"status": "failed", "meta": {"error": CODE, ...}}
        await pc.close()
        raise RuntimeError(f"offer refused: {answer['meta']}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    if seconds is None:
        speech = len(load_wav(wav_path, 48000)) / 48000 if wav_path else 0.0
        seconds = speech + 4.0 if speech else 5.0
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await pc.close()
    loud = [a for a in audio if np.abs(a.astype(np.int32)).mean() > 300]
    return {
        "messages": messages,
        "audio_frames": len(audio),
        "loud_audio_seconds": 0.02 * len(loud),
        "video_frames": len(frames),
        "last_frame": frames[-1] if frames else None,
    }


if __name__ == "__main__":
    wav = sys.argv[1] if len(sys.argv) > 1 else None
    result = asyncio.run(main(sys.argv[2] if len(sys.argv) > 2 else BASE_URL, wav))
    print({k: v for k, v in result.items() if k != "last_frame"})
