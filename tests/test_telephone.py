"""Phone calls: Twilio-format clients on loopback with real speech, the TwiML webhook, limits,
interruption (`clear`), bad input, and `fastphone`."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import types
from dataclasses import dataclass, field
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
import websockets
from fastapi import FastAPI
from scipy.signal import resample_poly

from server import ReplyOnPause, Stream, twilio
from server.frontends import telephone
from server.codecs import ulaw_decode, ulaw_encode
from tests.audio_fixtures import load_wav, speech_spans
from tests.test_websocket_reply import best_match, echo
from tests.waiting import wait_for

RATE = 8000
FRAME = 160  # 20 ms at 8 kHz


def speech_8k(name: str, tail_s: float = 1.5, upto_s: float | None = None) -> np.ndarray:
    """A 16 kHz speech fixture as 8 kHz int16 phone audio, with `tail_s` of silence after."""
    _, x = load_wav(name)
    if upto_s is not None:
        x = x[: int(upto_s * 16000)]
    y = resample_poly(x.astype(np.float64), 1, 2)
    y = np.concatenate([y, np.zeros(int(tail_s * RATE))])
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def media_msg(sid: str, pcm: np.ndarray, seq: int = 0) -> str:
    payload = base64.b64encode(ulaw_encode(pcm)).decode()
    return json.dumps({
        "event": "media", "sequenceNumber": str(seq), "streamSid": sid,
        "media": {"track": "inbound", "chunk": str(seq), "timestamp": str(seq * 20), "payload": payload},
    })


def start_msg(sid: str, call_sid: str = "CA0001") -> str:
    return json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {
            "accountSid": "AC0001", "streamSid": sid, "callSid": call_sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {},
        },
    })


CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


@dataclass
class Call:
    """What the provider's side of a call received."""

    sid: str
    media: list[tuple[float, str | None, np.ndarray]] = field(default_factory=list)  # (t, streamSid, pcm)
    clears: list[tuple[float, dict]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    close_code: int | None = None

    def replies(self, gap_s: float = 0.4) -> list[tuple[float, np.ndarray]]:
        out: list[tuple[float, list[np.ndarray]]] = []
        play_end = -1e9
        for t, _, pcm in self.media:
            if t > play_end + gap_s:
                out.append((t, []))
                play_end = t
            out[-1][1].append(pcm)
            play_end = max(play_end, t) + pcm.size / RATE
        return [(t, np.concatenate(c)) for t, c in out]

    def logs(self) -> list[str]:
        return [m.get("data") for m in self.messages if m.get("type") == "log"]

    def errors(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "error"]


async def phone_call(url: str, sid: str, pcm: np.ndarray, *, tail_s: float = 2.0) -> Call:
    """One call in Twilio's Media Streams format: `connected`, `start`, 20 ms mu-law `media`
    messages at real-time pace (a `mark` each second, as Twilio echoes marks), `stop`."""
    call = Call(sid)
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(CONNECTED)
        await ws.send(start_msg(sid))
        t0 = time.monotonic()

        async def reader() -> None:
            try:
                async for raw in ws:
                    now = time.monotonic() - t0
                    msg = json.loads(raw)
                    if msg.get("event") == "media":
                        call.media.append((now, msg.get("streamSid"), ulaw_decode(base64.b64decode(msg["media"]["payload"]))))
                    elif msg.get("event") == "clear":
                        call.clears.append((now, msg))
                    else:
                        call.messages.append(msg)
            except websockets.ConnectionClosed as e:
                call.close_code = e.rcvd.code if e.rcvd else None

        task = asyncio.create_task(reader())
        for i, start in enumerate(range(0, pcm.size, FRAME)):
            delay = t0 + i * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await ws.send(media_msg(sid, pcm[start : start + FRAME], i + 2))
                if i % 50 == 49:
                    await ws.send(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": f"m{i}"}}))
            except websockets.ConnectionClosed:
                break
        await asyncio.sleep(tail_s)
        try:
            await ws.send(json.dumps({"event": "stop", "streamSid": sid, "stop": {"callSid": "CA0001"}}))
        except websockets.ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.TimeoutError:
            task.cancel()
    return call


async def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def dominant_hz(pcm: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.argmax(spec) * RATE / pcm.size)


# --- a call gets its reply ---------------------------------------------------------------------


async def test_phone_call_gets_the_echo_after_each_pause(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=2)
    server = serve(stream)
    name = "speech_pause_speech_16k.wav"
    pcm = speech_8k(name)
    call = await phone_call(f"{server.ws}/telephone/handler", "MZ-echo", pcm, tail_s=2.5)

    spans = speech_spans(name)
    replies = call.replies()
    assert len(replies) == len(spans), [(t, len(r)) for t, r in replies]
    assert {sid for _, sid, _ in call.media} == {"MZ-echo"}  # every media event names the call
    assert call.logs().count("pause_detected") == len(spans)
    assert not call.errors()
    sent = ulaw_decode(ulaw_encode(pcm)).astype(np.float64)
    chunk = 0.6
    for (t_first, reply), (s0, s1) in zip(replies, spans):
        assert t_first > s1, (t_first, s1)  # after the pause, not during the utterance
        assert t_first < s1 + 3 * chunk + 0.5, (t_first, s1)
        off, corr = best_match(sent, reply)
        assert corr > 0.9, corr  # the caller's own words, at 8 kHz mu-law
        start, end = off / RATE, (off + reply.size) / RATE
        assert s0 - chunk - 0.05 <= start <= s0 + 0.05, (start, s0)
        assert s1 - 0.05 <= end <= s1 + 2 * chunk + 0.05, (end, s1)
    await wait_for(lambda: stream.active_sessions == 0)


# --- interruption ------------------------------------------------------------------------------


def tone_reply(turns: list[int], *, paced: bool, seconds: float = 8.0):
    """A reply like a streaming TTS: 0.2 s pieces of a tone, 400 Hz for the first turn,
    1000 Hz after; `paced` generates them at about real time (still generating while the
    caller hears it), else all at once."""

    def reply(audio):
        turns.append(1)
        hz = 400.0 if len(turns) == 1 else 1000.0
        sr = 16000
        t = np.arange(int(0.2 * sr)) / sr
        piece = (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16).reshape(1, -1)
        for _ in range(int(seconds / 0.2)):
            if paced:
                time.sleep(0.18)
            yield sr, piece

    return reply


async def _interrupted_call(serve, paced: bool) -> tuple[Call, list[tuple[float, float]]]:
    turns: list[int] = []
    handler = ReplyOnPause(tone_reply(turns, paced=paced), can_interrupt=True)
    stream = Stream(handler, modality="audio", concurrency_limit=2)
    server = serve(stream)
    name = "speech_pause_speech_16k.wav"
    # The second sentence starts ~1.5 s into the first (8 s) reply: the caller talks over it.
    pcm = speech_8k(name, tail_s=3.0)
    call = await phone_call(f"{server.ws}/telephone/handler", "MZ-int", pcm, tail_s=1.0)
    return call, speech_spans(name)


def interrupting_clear(call: Call, second_end: float) -> tuple[float, dict]:
    """The one `clear` sent for the second turn. A `clear` at the first pause (FastRTC sends
    one on every pause when `can_interrupt`) is allowed, but only before any reply audio."""
    late = [c for c in call.clears if c[0] > second_end]
    assert len(late) == 1, call.clears
    first_media = call.media[0][0] if call.media else float("inf")
    assert all(t <= first_media for t, _ in call.clears if t <= second_end), call.clears
    return late[0]


async def test_talking_over_a_reply_sends_clear_and_drops_the_old_reply(serve):
    call, spans = await _interrupted_call(serve, paced=True)
    (_, first_end), (_, second_end) = spans
    assert call.logs().count("pause_detected") == 2
    t_clear, clear = interrupting_clear(call, second_end)
    assert clear == {"event": "clear", "streamSid": "MZ-int"}
    # Sent once the second utterance's pause is detected, not before.
    assert second_end < t_clear < second_end + 3 * 0.6 + 0.5, (t_clear, second_end)
    before = [(t, pcm) for t, _, pcm in call.media if t < t_clear]
    after = [(t, pcm) for t, _, pcm in call.media if t > t_clear]
    assert before and after
    assert all(abs(dominant_hz(p) - 400) < 30 for _, p in before)  # the first reply, cut short
    assert sum(p.size for _, p in before) / RATE < 7.0
    # Nothing of the interrupted reply after the clear: all of it is the new reply ...
    assert all(abs(dominant_hz(p) - 1000) < 30 for _, p in after), [dominant_hz(p) for _, p in after]
    # ... which starts at once, not after the old reply's remaining playout time.
    assert after[0][0] - t_clear < 1.0, after[0][0] - t_clear
    assert {sid for _, sid, _ in call.media} == {"MZ-int"}


async def test_talking_over_a_fully_generated_reply_sends_clear(serve):
    call, spans = await _interrupted_call(serve, paced=False)
    t_clear, _ = interrupting_clear(call, spans[1][1])
    after = [pcm for t, _, pcm in call.media if t > t_clear]
    assert after and all(abs(dominant_hz(p) - 1000) < 30 for p in after)


# --- limits ------------------------------------------------------------------------------------


async def test_phone_calls_count_against_the_concurrency_limit(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=1)
    server = serve(stream)
    phone, ws_url = f"{server.ws}/telephone/handler", f"{server.ws}/websocket/offer"
    refused = {"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": 1}}

    async def assert_refused(url: str, start: str) -> None:
        async with websockets.connect(url) as ws:
            await ws.send(start)
            assert await recv_json(ws) == refused
            with pytest.raises(websockets.ConnectionClosed) as e:
                await recv_json(ws)
            assert e.value.rcvd.code == 1008

    async with websockets.connect(phone) as a:
        await a.send(CONNECTED)
        await a.send(start_msg("MZ-a"))
        await wait_for(lambda: stream.active_sessions == 1)
        assert stream.sessions["MZ-a"].kind == "telephone"
        await assert_refused(phone, start_msg("MZ-b"))  # a second call
        await assert_refused(ws_url, json.dumps({"event": "start", "websocket_id": "w"}))  # a WebSocket
        # The call still works after the refusals.
        await a.send(json.dumps({"event": "ping"}))
        assert await recv_json(a) == {"event": "pong"}
        await a.send(json.dumps({"event": "stop", "streamSid": "MZ-a"}))
    await wait_for(lambda: stream.active_sessions == 0)

    async with websockets.connect(ws_url) as w:
        await w.send(json.dumps({"event": "start", "websocket_id": "w2"}))
        await wait_for(lambda: stream.active_sessions == 1)
        await assert_refused(phone, start_msg("MZ-c"))  # a WebSocket session blocks a call
    await wait_for(lambda: stream.active_sessions == 0)


async def test_a_live_stream_sid_cannot_be_reused(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=4)
    server = serve(stream)
    url = f"{server.ws}/telephone/handler"
    async with websockets.connect(url) as a, websockets.connect(url) as b:
        await a.send(start_msg("MZ-same"))
        await wait_for(lambda: stream.active_sessions == 1)
        await b.send(start_msg("MZ-same"))
        msg = await recv_json(b)
        assert msg["meta"]["error"] == "connection_already_exists" and msg["status"] == "failed"
        assert stream.active_sessions == 1


# --- bad input -----------------------------------------------------------------------------------


async def test_bad_messages_get_clean_errors_and_other_calls_carry_on(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=4)
    server = serve(stream)
    url = f"{server.ws}/telephone/handler"
    name = "speech_pause_speech_16k.wav"

    async def misbehave() -> None:
        await asyncio.sleep(0.5)  # the good call is under way
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(CONNECTED)
            await ws.send("this is not json")
            assert "not valid JSON" in (await recv_json(ws))["message"]
            await ws.send(json.dumps({"streamSid": "MZ-bad"}))
            assert '"event"' in (await recv_json(ws))["message"]
            await ws.send(start_msg("MZ-bad"))
            await ws.send(json.dumps({"event": "media", "streamSid": "MZ-bad", "media": {"payload": "@@not base64@@"}}))
            assert "base64" in (await recv_json(ws))["message"]
            await ws.send(json.dumps({"event": "dtmf", "streamSid": "MZ-bad", "dtmf": {"digit": "1"}}))
            await ws.send(json.dumps({"event": "mark", "streamSid": "MZ-bad", "mark": {"name": "x"}}))
            await ws.send(json.dumps({"event": "ping"}))
            assert await recv_json(ws) == {"event": "pong"}  # dtmf and mark: no error, still alive
            await ws.send(json.dumps({"event": "media", "streamSid": "MZ-bad", "media": {"payload": "A" * (2 << 20)}}))
            assert "too large" in (await recv_json(ws))["message"]
            with pytest.raises(websockets.ConnectionClosed) as e:
                await recv_json(ws)
            assert e.value.rcvd.code == 1009
        async with websockets.connect(url) as ws:  # media before start
            await ws.send(media_msg("MZ-early", np.zeros(FRAME, np.int16)))
            msg = await recv_json(ws)
            assert msg["type"] == "error" and "start" in msg["message"]
            with pytest.raises(websockets.ConnectionClosed) as e:
                await recv_json(ws)
            assert e.value.rcvd.code == 1008
        async with websockets.connect(url) as ws:  # start without a streamSid
            await ws.send(json.dumps({"event": "start", "start": {"callSid": "CA1"}}))
            assert "streamSid" in (await recv_json(ws))["message"]
            with pytest.raises(websockets.ConnectionClosed) as e:
                await recv_json(ws)
            assert e.value.rcvd.code == 1008

    good, _ = await asyncio.gather(
        phone_call(url, "MZ-good", speech_8k(name), tail_s=2.5),
        misbehave(),
    )
    assert len(good.replies()) == 2
    assert good.logs().count("pause_detected") == 2
    assert not good.errors()
    await wait_for(lambda: stream.active_sessions == 0)


# --- the webhook ---------------------------------------------------------------------------------


def stream_url_of(twiml: str) -> str:
    root = ElementTree.fromstring(twiml)
    assert root.tag == "Response"
    tags = [child.tag for child in root]
    assert tags[:2] == ["Say", "Connect"], tags  # a greeting, then the media stream
    assert root[0].text
    node = root.find("./Connect/Stream")
    assert node is not None
    return node.get("url")


async def test_incoming_call_webhook_answers_twiml(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio")
    server = serve(stream)
    twilio_form = {"CallSid": "CA123", "From": "+15005550006", "To": "+15005550001"}
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{server.http}/telephone/incoming", data=twilio_form)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/xml")
        assert stream_url_of(r.text) == f"{server.ws}/telephone/handler"  # plain http on loopback
        r = await client.post(f"{server.http}/telephone/incoming", headers={"Host": "example.com"})
        assert stream_url_of(r.text) == "wss://example.com/telephone/handler"
        r = await client.post(f"{server.http}/telephone/incoming", headers={"Host": "localhost:5000"})
        assert stream_url_of(r.text) == "ws://localhost:5000/telephone/handler"
        r = await client.post(f"{server.http}/telephone/incoming", headers={"Host": "abc.ngrok.app:443"})
        assert stream_url_of(r.text) == "wss://abc.ngrok.app:443/telephone/handler"
        assert (await client.get(f"{server.http}/telephone/incoming")).status_code == 405
    # Odd characters in the URL stay inside the attribute.
    assert stream_url_of(twilio.twiml('wss://a"b<c>&d/telephone/handler')) == 'wss://a"b<c>&d/telephone/handler'


async def test_incoming_call_under_a_mount_prefix_connects_the_call(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=2)
    app = FastAPI()
    stream.mount(app, "/rtc")
    server = serve(app)
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{server.http}/rtc/telephone/incoming", headers={"Host": "abc.ngrok.app"})
        assert stream_url_of(r.text) == "wss://abc.ngrok.app/rtc/telephone/handler"
        r = await client.post(f"{server.http}/rtc/telephone/incoming", data={"CallSid": "CA9"})
    url = stream_url_of(r.text)
    assert url == f"{server.ws}/rtc/telephone/handler"
    # The URL the provider is given works: a call on it is answered.
    name = "speech_pause_speech_16k.wav"
    (s0, s1), _ = speech_spans(name)
    call = await phone_call(url, "MZ-mounted", speech_8k(name, upto_s=s1 + 0.3), tail_s=3.0)
    replies = call.replies()
    assert len(replies) == 1 and replies[0][0] > s1
    assert abs(replies[0][1].size / RATE - (s1 - s0)) < 2 * 0.6 + 0.3
    assert {sid for _, sid, _ in call.media} == {"MZ-mounted"}


async def test_incoming_call_refused_for_a_video_stream(serve):
    stream = Stream(lambda frame: frame, modality="video")
    server = serve(stream)
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{server.http}/telephone/incoming")
    assert r.status_code == 400
    body = r.json()
    assert body["status"] == "failed" and body["meta"]["error"] == "unsupported_modality"
    assert "audio" in body["meta"]["detail"]


# --- fastphone -----------------------------------------------------------------------------------


def test_fastphone_raises_a_clear_error_without_going_online(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fastphone must not try to reach anything")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    stream = Stream(ReplyOnPause(echo), modality="audio")
    calls = [
        lambda: telephone.fastphone(stream),
        lambda: telephone.fastphone(stream, token="hf_xxx", host="0.0.0.0", port=7860, share=True),
        lambda: types.MethodType(telephone.fastphone, stream)(),  # as `Stream.fastphone`
    ]
    if getattr(Stream, "fastphone", None) is not None:
        calls.append(lambda: stream.fastphone())
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            call()
        assert time.monotonic() - t0 < 1.0
        text = str(e.value)
        assert "fastphone" in text and "cannot reach" in text
        assert "https://YOUR_HOST/telephone/incoming" in text and "Twilio" in text
