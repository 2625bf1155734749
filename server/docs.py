"""Client docs for the three front ends: `GET /webrtc/docs`, `/websocket/docs`, `/telephone/docs`.

Each page says what a client sends and receives on that front end, with this stream's actual
settings (modality, mode, limits, the handler's sample rates), and ends with a complete
Python client in `<pre><code id="example">`. The examples are module constants filled in per
stream (`websocket_example`, `webrtc_example`, `telephone_example`), and the tests run the
code served on the pages against a real server, so the docs cannot drift from the protocol.
Pages are self-contained HTML: no scripts, no outside stylesheets or fonts.
"""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from . import telephone
from .websocket import MAX_MESSAGE_BYTES, START_TIMEOUT_S

DEFAULT_INPUT_RATE = 48000  # what the front ends assume for a handler without the attribute
DEFAULT_OUTPUT_RATE = 24000
PHONE_RATE = 8000

# --- the examples --------------------------------------------------------------------------
# Placeholders `@NAME@` are filled in per stream and request by the functions below.

_CODEC_AND_WAV = r'''

def ulaw_encode(pcm):
    """int16 samples -> G.711 mu-law bytes (the same bytes as audioop.lin2ulaw)."""
    x = pcm.astype(np.int32) >> 2
    mag = np.minimum(np.abs(x), 8158) + 33
    exp = np.floor(np.log2(mag)).astype(np.int32) - 5
    code = (exp << 4) | ((mag >> (exp + 1)) & 0x0F)
    return (code ^ np.where(x < 0, 0x7F, 0xFF)).astype(np.uint8).tobytes()


def ulaw_decode(data):
    """G.711 mu-law bytes -> int16 samples."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exp = (u >> 4) & 0x07
    mag = ((((u & 0x0F) << 3) + 0x84) << exp) - 0x84
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def load_wav(path, rate):
    """A 16-bit PCM WAV file as mono int16 samples at `rate`."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise SystemExit("expected a 16-bit PCM WAV file")
        src = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        x = x.reshape(-1, w.getnchannels())[:, 0]
    if src != rate:
        x = resample_poly(x.astype(np.float64), rate, src)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)
'''

WEBSOCKET_EXAMPLE = r'''"""FastRTC WebSocket client: stream a WAV file to the server, save the audio it answers.

    pip install websockets numpy scipy
    python ws_client.py speech.wav [URL]
"""
import asyncio
import base64
import json
import sys
import time
import uuid
import wave

import numpy as np
import websockets
from scipy.signal import resample_poly

URL = @URL@
INPUT_RATE = @INPUT_RATE@  # Hz of the mu-law samples the server expects
OUTPUT_RATE = @OUTPUT_RATE@  # Hz of the mu-law samples the server sends back
FRAME_MS = 20
@CODEC_AND_WAV@

async def main(url, wav_path, out_path=None):
    pcm = load_wav(wav_path, INPUT_RATE)
    # Trailing silence: a ReplyOnPause server answers once it hears a pause.
    pcm = np.concatenate([pcm, np.zeros(2 * INPUT_RATE, dtype=np.int16)])
    reply, messages = [], []
    play_end = [0.0]  # when the reply received so far will have played out

    async with websockets.connect(url, max_size=None) as ws:
        # 1. start (once), with an id of your choosing
        await ws.send(json.dumps({"event": "start", "websocket_id": str(uuid.uuid4())}))

        async def receive():
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("event") == "media":  # reply audio, mu-law at OUTPUT_RATE
                        pcm_out = ulaw_decode(base64.b64decode(msg["media"]["payload"]))
                        reply.append(pcm_out)
                        now = time.monotonic()
                        play_end[0] = max(play_end[0], now) + len(pcm_out) / OUTPUT_RATE
                    else:  # {"type": "log" | "error" | ...}, {"event": "pong"} or a refusal
                        messages.append(msg)
                        print("server:", msg)
            except websockets.ConnectionClosed as e:
                print("closed:", e)

        reader = asyncio.create_task(receive())
        # 2. media: 20 ms of mu-law at INPUT_RATE per message, at real-time pace
        step = INPUT_RATE * FRAME_MS // 1000
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), step)):
            await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
            if reader.done():
                break  # the server closed the socket (refusal, time limit, end of stream)
            payload = base64.b64encode(ulaw_encode(pcm[start:start + step])).decode("ascii")
            await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
        # 3. listen until the reply has played out, then stop
        deadline = time.monotonic() + 30
        while not reader.done() and time.monotonic() < deadline:
            if time.monotonic() > max(play_end[0], t0) + 1.5:
                break
            await asyncio.sleep(0.1)
        if not reader.done():
            await ws.send(json.dumps({"event": "stop"}))
        await asyncio.wait_for(reader, 10)

    audio = np.concatenate(reply) if reply else np.zeros(0, dtype=np.int16)
    if out_path:
        with wave.open(out_path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(OUTPUT_RATE)
            w.writeframes(audio.tobytes())
    return {"reply": audio, "rate": OUTPUT_RATE, "messages": messages}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    result = asyncio.run(main(sys.argv[2] if len(sys.argv) > 2 else URL, sys.argv[1], "reply.wav"))
    print(f"{len(result['reply']) / OUTPUT_RATE:.2f} s of reply audio -> reply.wav")
'''

WEBRTC_EXAMPLE = r'''"""FastRTC WebRTC client (aiortc + httpx): send media, collect what comes back.

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

BASE_URL = @BASE_URL@  # the offer goes to BASE_URL + "/webrtc/offer"
MODALITY = @MODALITY@  # "audio", "video" or "audio-video"
MODE = @MODE@  # "send-receive", "send" (to the server only) or "receive" (from it only)
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
'''

TELEPHONE_EXAMPLE = r'''"""A simulated phone call in Twilio's Media Streams format: the provider's webhook, then
the call's audio (8 kHz mu-law, 20 ms per message) over the WebSocket the TwiML names.

    pip install httpx websockets numpy scipy
    python phone_call.py speech.wav [BASE_URL]
"""
import asyncio
import base64
import json
import sys
import time
import uuid
import wave
from xml.etree import ElementTree

import httpx
import numpy as np
import websockets
from scipy.signal import resample_poly

BASE_URL = @BASE_URL@  # the webhook is BASE_URL + "/telephone/incoming"
RATE = 8000  # phone audio both ways: 8 kHz mu-law
FRAME = 160  # samples per media message (20 ms)
@CODEC_AND_WAV@

async def main(base_url, wav_path):
    call_sid = "CA" + uuid.uuid4().hex
    stream_sid = "MZ" + uuid.uuid4().hex
    # 1. The number rings: the provider POSTs its voice webhook and gets TwiML back.
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            base_url + "/telephone/incoming",
            data={"CallSid": call_sid, "From": "+15005550006", "To": "+15005550001"},
        )
    r.raise_for_status()
    stream_url = ElementTree.fromstring(r.text).find("./Connect/Stream").get("url")

    # 2. The provider opens the media stream the TwiML names and speaks its protocol.
    pcm = np.concatenate([load_wav(wav_path, RATE), np.zeros(2 * RATE, dtype=np.int16)])
    reply, messages, clears, sids = [], [], [], set()
    play_end = [0.0]
    seq = iter(range(1, 1 << 30))
    async with websockets.connect(stream_url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": str(next(seq)), "streamSid": stream_sid,
            "start": {
                "streamSid": stream_sid, "callSid": call_sid, "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
                "customParameters": {},
            },
        }))

        async def receive():
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("event") == "media":  # what the caller hears
                        sids.add(msg.get("streamSid"))
                        pcm_out = ulaw_decode(base64.b64decode(msg["media"]["payload"]))
                        reply.append(pcm_out)
                        now = time.monotonic()
                        play_end[0] = max(play_end[0], now) + len(pcm_out) / RATE
                    elif msg.get("event") == "clear":  # the caller interrupted: drop unplayed audio
                        clears.append(msg)
                        play_end[0] = time.monotonic()
                    else:  # {"type": "log" | "error" | ...} or a refusal
                        messages.append(msg)
                        print("server:", msg)
            except websockets.ConnectionClosed as e:
                print("closed:", e)

        reader = asyncio.create_task(receive())
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), FRAME)):
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))
            if reader.done():
                break
            await ws.send(json.dumps({
                "event": "media", "sequenceNumber": str(next(seq)), "streamSid": stream_sid,
                "media": {
                    "track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                    "payload": base64.b64encode(ulaw_encode(pcm[start:start + FRAME])).decode("ascii"),
                },
            }))
            if i == 50:  # Twilio reports played-out marks like this; the server ignores them
                await ws.send(json.dumps({"event": "mark", "sequenceNumber": str(next(seq)),
                                          "streamSid": stream_sid, "mark": {"name": "one-second"}}))
        deadline = time.monotonic() + 30
        while not reader.done() and time.monotonic() < deadline:
            if time.monotonic() > max(play_end[0], t0) + 1.5:
                break
            await asyncio.sleep(0.1)
        if not reader.done():  # hang up
            await ws.send(json.dumps({
                "event": "stop", "sequenceNumber": str(next(seq)), "streamSid": stream_sid,
                "stop": {"callSid": call_sid},
            }))
        await asyncio.wait_for(reader, 10)

    audio = np.concatenate(reply) if reply else np.zeros(0, dtype=np.int16)
    return {"twiml": r.text, "stream_url": stream_url, "reply": audio, "rate": RATE,
            "stream_sids": sids, "stream_sid": stream_sid, "clears": clears, "messages": messages}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    result = asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else BASE_URL))
    print(f"{len(result['reply']) / RATE:.2f} s of reply audio, {len(result['clears'])} clear(s)")
'''


def _fill(template: str, **values: Any) -> str:
    out = template.replace("@CODEC_AND_WAV@", "\n\n" + _CODEC_AND_WAV.strip("\n") + "\n")
    for key, value in values.items():
        # Strings become Python string literals (a Host header cannot break out of them).
        out = out.replace(f"@{key}@", json.dumps(value) if isinstance(value, str) else str(value))
    return out


def rates(stream: Any) -> tuple[int, int]:
    """(input, output) sample rates of the handler, as the WebSocket front end uses them."""
    h = stream.handler
    return int(getattr(h, "input_sample_rate", DEFAULT_INPUT_RATE)), int(
        getattr(h, "output_sample_rate", DEFAULT_OUTPUT_RATE)
    )


def websocket_example(stream: Any, url: str = "ws://127.0.0.1:8000/websocket/offer") -> str:
    """The WebSocket client example for `stream`, connecting to `url` by default."""
    inp, out = rates(stream)
    return _fill(WEBSOCKET_EXAMPLE, URL=url, INPUT_RATE=inp, OUTPUT_RATE=out)


def webrtc_example(stream: Any, base_url: str = "http://127.0.0.1:8000") -> str:
    """The aiortc + httpx client example for `stream` (its modality and mode filled in)."""
    return _fill(WEBRTC_EXAMPLE, BASE_URL=base_url, MODALITY=stream.modality, MODE=stream.mode)


def telephone_example(stream: Any, base_url: str = "http://127.0.0.1:8000") -> str:
    """The simulated Twilio call example for `stream`."""
    return _fill(TELEPHONE_EXAMPLE, BASE_URL=base_url)


def telephone_messages(stream_sid: str = "MZ0123", call_sid: str = "CA0123") -> str:
    """The Twilio Media Streams message sequence of a call, one JSON message per line."""
    media_in = {"event": "media", "sequenceNumber": "2", "streamSid": stream_sid,
                "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "/////w=="}}
    rows = [
        ("provider -> server", {"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        ("provider -> server", {"event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
                                "start": {"streamSid": stream_sid, "callSid": call_sid, "tracks": ["inbound"],
                                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                          "channels": 1}}}),
        ("provider -> server", media_in),
        ("  ... one media message per 20 ms of the caller's audio ...", None),
        ("server -> provider", {"type": "log", "data": "started_talking"}),
        ("server -> provider", {"type": "log", "data": "pause_detected"}),
        ("server -> provider", {"type": "log", "data": "response_starting"}),
        ("server -> provider", {"event": "media", "streamSid": stream_sid, "media": {"payload": "BASE64 mu-law, 8 kHz"}}),
        ("  ... reply audio, sent at about real time ...", None),
        ("provider -> server", {"event": "mark", "sequenceNumber": "40", "streamSid": stream_sid,
                                "mark": {"name": "my-label"}}),
        ("server -> provider", {"event": "clear", "streamSid": stream_sid}),
        ("  (clear: the caller spoke over the reply; drop the reply audio not yet played)", None),
        ("provider -> server", {"event": "stop", "sequenceNumber": "99", "streamSid": stream_sid,
                                "stop": {"callSid": call_sid}}),
    ]
    lines = []
    for who, msg in rows:
        lines.append(who if msg is None else f"{who}: {json.dumps(msg)}")
    return "\n".join(lines)


# --- pages ---------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;line-height:1.45;color:#222}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
pre{background:#f5f5f5;border:1px solid #ddd;padding:.8rem;overflow-x:auto}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}nav a{margin-right:1rem}.note{background:#fff6d6;border:1px solid #e6c200;padding:.5rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A table; cells are trusted HTML (callers escape values with `_e`)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _base(request: Request, suffix: str) -> tuple[str, str, str]:
    """(http base URL, ws base URL, prefix) of the stream's routes, from a docs request."""
    path = request.url.path
    prefix = path[: -len(suffix)] if path.endswith(suffix) else ""
    prefix = prefix.rstrip("/")
    host = request.headers.get("host") or request.url.netloc or "127.0.0.1:8000"
    secure = request.url.scheme in ("https", "wss")
    return (
        f"{'https' if secure else 'http'}://{host}{prefix}",
        f"{'wss' if secure else 'ws'}://{host}{prefix}",
        prefix,
    )


def _facts(stream: Any, *, phone: bool = False) -> str:
    inp, out = rates(stream)
    h = stream.handler
    name = getattr(h, "__name__", None) or type(h).__name__
    audio = stream.modality in ("audio", "audio-video")
    rows: list[tuple[Any, ...]] = [
        ("handler", f"<code>{_e(name)}</code>"),
        ("modality", f"<code>{_e(stream.modality)}</code>"),
        ("mode", f"<code>{_e(stream.mode)}</code>"),
        ("concurrency_limit", f"{_e(stream.concurrency_limit)} connection(s) at once, all front ends "
                              "together (WebRTC, WebSocket and phone calls share it)"),
        ("time_limit", "none" if stream.time_limit is None else f"{_e(stream.time_limit)} s per connection"),
        ("active connections", _e(stream.active_sessions)),
    ]
    if phone:
        rows.append(("audio in / out", "G.711 mu-law, 8000 Hz mono, both ways (the handler gets 8 kHz)"))
    elif audio:
        rows.append(("input_sample_rate", f"{inp} Hz (what the handler receives)"))
        rows.append(("output_sample_rate", f"{out} Hz (what the handler emits)"))
    if hasattr(h, "can_interrupt"):
        rows.append(("ReplyOnPause can_interrupt", _e(h.can_interrupt)))
    if stream.additional_inputs:
        rows.append(("additional inputs", f"{len(stream.additional_inputs)} (the server asks with "
                                          "<code>send_input</code>)"))
    if stream.additional_outputs:
        rows.append(("additional outputs", f"{len(stream.additional_outputs)} (announced with "
                                           "<code>fetch_output</code>)"))
    return _table(("setting", "value"), rows)


_CHANNEL_MESSAGES = [
    ("send_input", "data: []", "send the current values of the stream's additional inputs "
                               "(to the app's own route that calls <code>stream.set_input</code>)"),
    ("fetch_output", "data: [values...]", "the handler emitted <code>AdditionalOutputs</code>; the values"),
    ("log", "data: text", "progress: <code>started_talking</code>, <code>pause_detected</code>, "
                          "<code>response_starting</code> (ReplyOnPause)"),
    ("error", "<b>message</b>: text", "the handler raised or the input was bad (note: "
                                      "<code>message</code>, not <code>data</code>)"),
    ("warning", "<b>message</b>: text", "the handler raised <code>Warning</code>; the stream goes on"),
    ("end_stream", "data: reason", "the stream ends (time limit, or the handler emitted "
                                   "<code>CloseStream</code>)"),
    ("stopword", "data: ...", "a stop word was heard (handler-defined)"),
    ("update_connection", "data: {...}", "handler-defined connection update"),
]


def _channel_table() -> str:
    rows = [(f"<code>{t}</code>", f"<code>{d}</code>", what) for t, d, what in _CHANNEL_MESSAGES]
    return _table(("type", "payload", "meaning"), rows)


def _page(title: str, current: str, prefix: str, body: str) -> str:
    nav = "".join(
        f'<a href="{_e(prefix)}/{p}/docs"{" aria-current=page" if p == current else ""}>{p}</a>'
        for p in ("webrtc", "websocket", "telephone")
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<nav>{nav}</nav><h1>{_e(title)}</h1>{body}</body></html>"
    )


def _example(code: str) -> str:
    return f'<pre><code id="example">{_e(code)}</code></pre>'


def websocket_page(stream: Any, request: Request) -> str:
    http_base, ws_base, prefix = _base(request, "/websocket/docs")
    inp, out = rates(stream)
    url = f"{ws_base}/websocket/offer"
    note = ""
    if stream.modality not in ("audio", "audio-video"):
        note = (f'<p class=note>This stream\'s modality is <code>{_e(stream.modality)}</code>: the '
                "WebSocket front end carries audio only, so use WebRTC for it.</p>")
    client_table = _table(("event", "fields", "notes"), [
        ("<code>start</code>", '<code>{"event": "start", "websocket_id": ID}</code>',
         "first, once; ID is a non-empty string you choose (unique among live connections). "
         f"Without it within {START_TIMEOUT_S:.0f} s the socket is closed."),
        ("<code>media</code>", '<code>{"event": "media", "media": {"payload": BASE64}}</code>',
         f"base64 of G.711 mu-law bytes, mono, <b>{inp} Hz</b> (the handler's input rate); 20 ms "
         f"({inp // 50} samples) per message is typical; send at real-time pace"),
        ("<code>ping</code>", '<code>{"event": "ping"}</code>', 'answered with <code>{"event": "pong"}</code>'),
        ("<code>stop</code>", '<code>{"event": "stop"}</code>', "ends the connection (the server closes with 1000)"),
    ])
    server_table = _table(("message", "notes"), [
        ('<code>{"event": "media", "media": {"payload": BASE64}}</code>',
         f"reply audio: mu-law, mono, <b>{out} Hz</b> (the handler's output rate), sent at about real time"),
        ('<code>{"event": "pong"}</code>', "answer to <code>ping</code>"),
        ('<code>{"type": TYPE, "data": ...}</code> / <code>{"type": "error", "message": ...}</code>',
         "data-channel messages, below"),
        ('<code>{"status": "failed", "meta": {"error": CODE, ...}}</code>',
         "refusal of <code>start</code>, then a close (1008)"),
    ])
    errors_table = _table(("code / message", "when"), [
        ('<code>concurrency_limit_reached</code> (with <code>"limit": N</code>)',
         f"already {stream.concurrency_limit} connection(s); then the socket closes with 1008"),
        ('<code>connection_already_exists</code> (with <code>"webrtc_id"</code>)', "the id is in use; close 1008"),
        ("<code>unknown_connection</code>, <code>invalid_candidate_format</code>, <code>invalid_sdp</code>",
         "WebRTC offer codes; not sent on this front end"),
        (_e('error "message is not valid JSON", "message must be a JSON object with an "event" field", '
            '"unknown event", "media payload is not valid base64", "media event needs {"media": {"payload": BASE64}}"'),
         "the message is ignored; the connection goes on"),
        (_e('error "send a "start" event before media"'), "close 1008"),
        (_e(f'error "message too large" (over {MAX_MESSAGE_BYTES} bytes)'), "close 1009"),
        ("error with the handler's exception", "the handler raised; the connection goes on"),
    ])
    body = f"""
<p>Audio over one WebSocket, FastRTC's protocol: <code>WS {_e(prefix)}/websocket/offer</code>
(<code>{_e(url)}</code>). Every frame is a JSON text frame.</p>{note}
<h2>This stream</h2>{_facts(stream)}
<h2>Client &rarr; server</h2>{client_table}
<h2>Server &rarr; client</h2>{server_table}
<h3>Data-channel messages</h3>{_channel_table()}
<h3>Refusals and errors</h3>{errors_table}
<p>Close codes: 1000 normal end (<code>stop</code>, time limit, <code>CloseStream</code>), 1008
protocol or policy (refused, no <code>start</code>, media before <code>start</code>), 1009 too large.</p>
<h2>Example</h2>
<p>Streams a WAV file (any rate; resampled to {inp} Hz) and saves the reply
(<code>python ws_client.py speech.wav {_e(url)}</code>):</p>
{_example(websocket_example(stream, url))}
"""
    return _page("WebSocket front end", "websocket", prefix, body)


def webrtc_page(stream: Any, request: Request) -> str:
    http_base, _, prefix = _base(request, "/webrtc/docs")
    inp, out = rates(stream)
    media_rows: list[tuple[Any, ...]] = []
    if stream.modality in ("audio", "audio-video"):
        media_rows.append(("audio", f"Opus (48 kHz on the wire). The handler receives mono int16 "
                                    f"<code>(1, n)</code> arrays at <b>{inp} Hz</b> and emits audio at "
                                    f"<b>{out} Hz</b>, sent back as 20 ms frames."))
    if stream.modality in ("video", "audio-video"):
        media_rows.append(("video", "VP8 or H.264. The handler receives <code>(H, W, 3)</code> uint8 "
                                    "frames (BGR; RGB for batched handlers); only the freshest frame "
                                    "is processed, older ones are dropped, never queued."))
    directions = {
        "send-receive": "the client sends media and receives the processed media",
        "send": "the client sends media only",
        "receive": "the client receives media only (offer <code>recvonly</code> transceivers)",
    }[stream.mode]
    request_table = _table(("field", "type", "notes"), [
        ("<code>webrtc_id</code>", "string, required", "an id you choose for the connection (422 without it)"),
        ("<code>type</code>", "string",
         '<code>"offer"</code> starts a connection; <code>"ice-candidate"</code> adds a trickled candidate'),
        ("<code>sdp</code>", "string", "the offer SDP (for <code>offer</code>)"),
        ("<code>candidate</code>", "object",
         '<code>{"candidate": "candidate:...", "sdpMid": ..., "sdpMLineIndex": ...}</code> '
         "(for <code>ice-candidate</code>)"),
    ])
    response_table = _table(("response", "when"), [
        ('<code>{"sdp": ANSWER, "type": "answer"}</code>', "the offer is accepted"),
        ('<code>{"status": "success"}</code>', "the candidate was added"),
        ('<code>{"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}</code>',
         f"HTTP 200: already {stream.concurrency_limit} connection(s)"),
        ('<code>{"status": "failed", "meta": {"error": "connection_already_exists", "webrtc_id": ID}}</code>',
         "HTTP 200: the id is in use"),
        ('<code>{"status": "failed", "meta": {"error": "unknown_connection"}}</code>',
         "HTTP 200: an <code>ice-candidate</code> for an id with no connection"),
        ('<code>{"status": "failed", "meta": {"error": "invalid_candidate_format", "detail": ...}}</code>',
         "HTTP 400: the candidate could not be parsed"),
        ('<code>{"status": "failed", "meta": {"error": "invalid_sdp", "detail": ...}}</code>',
         "HTTP 400: no SDP, or an SDP that cannot be negotiated (nothing is left behind)"),
        ('<code>{"status": "failed", "meta": {"error": "invalid_type", "detail": ...}}</code>',
         'HTTP 400: <code>type</code> is neither <code>"offer"</code> nor <code>"ice-candidate"</code>'),
    ])
    media_table = _table(("track", "details"), media_rows) if media_rows else "<p>none</p>"
    body = f"""
<p>Media over WebRTC, FastRTC's offer protocol: <code>POST {_e(prefix)}/webrtc/offer</code>
(<code>{_e(http_base)}/webrtc/offer</code>). Mode <code>{_e(stream.mode)}</code>: {directions}.</p>
<h2>This stream</h2>{_facts(stream)}
<h2>Request</h2>{request_table}
<p>Create the data channel <b>before</b> the offer: the server's messages come on it.</p>
<h2>Responses</h2>{response_table}
<h2>Media</h2>{media_table}
<p>A connection that sends no media for 30 s is dropped.</p>
<h2>Data channel</h2>
<p>Server messages are JSON <code>{{"type": TYPE, "data": ...}}</code>, except <code>error</code>
and <code>warning</code>, which carry their text under <code>"message"</code>:</p>{_channel_table()}
<p>Anything the client sends on the channel is echoed back as a <code>log</code>
(<code>Server received: ...</code>); <code>{{"type": "set_input", "data": [values...]}}</code>
also sets the connection's additional inputs (this server's extension).</p>
<h2>Example</h2>
<p>aiortc + httpx, as a Python peer (<code>python webrtc_client.py speech.wav {_e(http_base)}</code>):</p>
{_example(webrtc_example(stream, http_base))}
"""
    return _page("WebRTC front end", "webrtc", prefix, body)


def telephone_page(stream: Any, request: Request) -> str:
    http_base, ws_base, prefix = _base(request, "/telephone/docs")
    host = request.headers.get("host") or "YOUR_HOST"
    local = telephone._host_name(host).lower() in telephone.LOCAL_HOSTS
    handler_url = f"{'ws' if request.url.scheme == 'http' and local else 'wss'}://{host}{prefix}/telephone/handler"
    note = ""
    if stream.modality != "audio":
        note = (f'<p class=note>This stream\'s modality is <code>{_e(stream.modality)}</code>: phone calls '
                "carry audio only, so <code>/telephone/incoming</code> answers HTTP 400 "
                '<code>{"status": "failed", "meta": {"error": "unsupported_modality"}}</code>.</p>')
    in_table = _table(("provider &rarr; server", "notes"), [
        ("<code>connected</code>", "ignored"),
        ("<code>start</code>", "<code>streamSid</code> (top level or in <code>start</code>) names the call: "
                               "required, unique among live connections"),
        ("<code>media</code>", "<code>media.payload</code>: base64 G.711 mu-law, <b>8000 Hz</b> mono "
                               "(20 ms = 160 bytes per message)"),
        ("<code>mark</code>, <code>dtmf</code>", "ignored"),
        ("<code>stop</code>", "the call ended; the server closes the socket"),
    ])
    out_table = _table(("server &rarr; provider", "notes"), [
        ('<code>{"event": "media", "streamSid": SID, "media": {"payload": BASE64}}</code>',
         "what the caller hears: mu-law, 8000 Hz, sent at about real time"),
        ('<code>{"event": "clear", "streamSid": SID}</code>',
         "the caller spoke over a reply (<code>ReplyOnPause(can_interrupt=True)</code>): drop buffered audio"),
        ('<code>{"type": TYPE, "data"/"message": ...}</code>',
         "FastRTC's data-channel messages (below); Twilio does not use them"),
        ('<code>{"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}</code>',
         f"a call over the limit ({stream.concurrency_limit}; phone calls count with every other "
         "connection); then close 1008"),
        ('<code>{"status": "failed", "meta": {"error": "connection_already_exists", ...}}</code>',
         "the <code>streamSid</code> is in use; close 1008"),
    ])
    body = f"""
<p>Phone calls through a telephony provider (Twilio Media Streams format). Point your number's
voice webhook ("A call comes in", HTTP POST) at <code>https://YOUR_HOST{_e(prefix)}/telephone/incoming</code>
(here: <code>{_e(http_base)}/telephone/incoming</code>). It answers TwiML that connects the call's
audio to <code>WS {_e(prefix)}/telephone/handler</code>. FastRTC's temporary numbers
(<code>stream.fastphone()</code>) need an outside service and are not offered.</p>{note}
<h2>This stream</h2>{_facts(stream, phone=True)}
<h2>Webhook: <code>POST {_e(prefix)}/telephone/incoming</code></h2>
<p>Any body (the provider's form fields are not needed). The answer, <code>application/xml</code>:</p>
<pre><code id="twiml">{_e(telephone.twiml(handler_url))}</code></pre>
<p>The stream URL uses this request's Host header and mount path; <code>wss://</code> unless the
request is plain http to localhost.</p>
<h2>Media stream: <code>WS {_e(prefix)}/telephone/handler</code></h2>
{in_table}{out_table}
<p>Bad input is answered like on <a href="{_e(prefix)}/websocket/docs">the WebSocket front end</a>: an
<code>error</code> message (not JSON, no <code>event</code>, bad base64; the call goes on), or an
<code>error</code> and a close (media before <code>start</code>: 1008; a message over
{MAX_MESSAGE_BYTES} bytes: 1009). <code>unknown_connection</code>, <code>invalid_candidate_format</code>
and <code>invalid_sdp</code> are WebRTC offer codes and do not occur here.</p>
<h3>Data-channel messages</h3>{_channel_table()}
<h3>A call, message by message</h3>
<pre><code id="sequence">{_e(telephone_messages())}</code></pre>
<h2>Example</h2>
<p>A simulated call: the webhook, then a WAV file as the caller's voice
(<code>python phone_call.py speech.wav {_e(http_base)}</code>):</p>
{_example(telephone_example(stream, http_base))}
"""
    return _page("Telephone front end", "telephone", prefix, body)


def add_routes(router: APIRouter, stream: Any) -> None:
    """Add the three docs pages."""

    async def webrtc_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(webrtc_page(stream, request))

    async def websocket_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(websocket_page(stream, request))

    async def telephone_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(telephone_page(stream, request))

    router.add_api_route("/webrtc/docs", webrtc_docs, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/websocket/docs", websocket_docs, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/telephone/docs", telephone_docs, methods=["GET"], response_class=HTMLResponse)
