"""ReplyOnPause's FastRTC options through real clients: `model=` (a PauseDetectionModel, here
FastRTC's own per-call Silero over onnxruntime), `needs_args`, `expected_layout="stereo"`."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
from pydantic import BaseModel
from scipy.signal import resample_poly

import server.reply_on_pause as rop
from server import PauseDetectionModel, ReplyOnPause, SileroVADModel, Stream, get_silero_model
from server.pause_detection import to_16k
from server.vad_engine import get_vad_engine
from tests.audio_fixtures import load_wav, speech_spans
from tests.test_websocket_reply import echo, speech_48k
from tests.ws_client import stream_audio

FIXTURE = "speech_pause_speech_16k.wav"


class CountingModel:
    """Wraps a PauseDetectionModel: counts calls and records where they ran."""

    def __init__(self, inner: PauseDetectionModel) -> None:
        self.inner = inner
        self.calls = 0
        self.durations: list[float] = []
        self.on_a_loop = 0
        self.lock = threading.Lock()

    def vad(self, audio, options):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        dur, chunks = self.inner.vad(audio, options)
        with self.lock:
            self.calls += 1
            self.durations.append(dur)
            self.on_a_loop += on_loop
        return dur, chunks

    def warmup(self) -> None:
        self.inner.warmup()


def test_silero_onnx_model_finds_the_speech_in_a_fixture() -> None:
    sr, x = load_wav(FIXTURE)
    dur, chunks = get_silero_model().vad((sr, x), None)
    spans = speech_spans(FIXTURE)
    assert len(chunks) == len(spans), chunks
    for c, (a, b) in zip(chunks, spans):  # each segment covers its span (400 ms padding)
        assert c["start"] / 16000 <= a + 0.1 and c["end"] / 16000 >= b - 0.1, (c, a, b)
    assert sum(b - a for a, b in spans) < dur < sum(b - a for a, b in spans) + 2 * 0.8 * len(spans)
    # Same audio at 48 kHz (resampled inside vad): the same segments within a window.
    x48 = np.round(resample_poly(x.astype(np.float64), 3, 1)).astype(np.int16)
    dur48, chunks48 = get_silero_model().vad((48000, x48), None)
    assert len(chunks48) == len(chunks)
    assert abs(dur48 - dur) < 2 * 512 / 16000


def test_to_16k_matches_resample_poly() -> None:
    _, x = load_wav(FIXTURE)
    x48 = resample_poly(x.astype(np.float64), 3, 1).astype(np.float32) / 32768
    ours = to_16k(48000, x48)
    ref = resample_poly(x48.astype(np.float64), 1, 3)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5  # same filter design; float32 arithmetic


async def test_model_argument_runs_per_call_silero_and_replies(serve):
    """`ReplyOnPause(echo, model=...)` with FastRTC's per-call Silero (onnxruntime): every
    0.6 s chunk goes to the model, on a worker thread, and the batched engine is not used."""
    model = CountingModel(SileroVADModel())
    stream = Stream(ReplyOnPause(echo, model=model), modality="audio", concurrency_limit=2)
    server = serve(stream)
    engine_before = get_vad_engine().batcher.stats.snapshot()["submitted"]
    pcm = speech_48k(FIXTURE)
    rec = await stream_audio(f"{server.ws}/websocket/offer", "onnx-1", pcm, 48000, tail_s=2.5)
    spans = speech_spans(FIXTURE)
    replies = rec.replies()
    assert len(replies) == len(spans), [(t, len(r)) for t, r in replies]
    for (t_first, _), (_, s1) in zip(replies, spans):
        assert s1 < t_first < s1 + 3 * 0.6 + 0.5, (t_first, s1)
    assert not [m for m in rec.messages if m.get("type") == "error"]
    assert model.calls == pcm.size // 28800  # one call per full 0.6 s chunk
    assert model.on_a_loop == 0  # never on an event loop
    assert max(model.durations) > 0.2 and min(model.durations) < 0.1
    assert get_vad_engine().batcher.stats.snapshot()["submitted"] == engine_before


async def test_model_decides_the_turns(serve):
    """A model that says "speech" for three chunks, then "silence": a reply arrives even though
    the audio is digital silence (the batched VAD would never start a turn on it)."""

    class Scripted:
        def __init__(self) -> None:
            self.calls = 0

        def vad(self, audio, options):
            self.calls += 1
            sr, x = audio
            assert x.ndim == 1 and sr == 48000 and x.size == 28800
            return (0.5 if self.calls <= 3 else 0.0), []

        def warmup(self) -> None:
            pass

    model = Scripted()
    stream = Stream(ReplyOnPause(echo, model=model), modality="audio", concurrency_limit=2)
    server = serve(stream)
    silence = np.zeros(48000 * 3, np.int16)
    rec = await stream_audio(f"{server.ws}/websocket/offer", "scripted", silence, 48000, tail_s=3.0)
    logs = [m["data"] for m in rec.messages if m.get("type") == "log"]
    assert logs.count("started_talking") == 1 and logs.count("pause_detected") == 1, logs
    replies = rec.replies()
    assert len(replies) == 1
    # The utterance is the three "speech" chunks plus the pause chunk, echoed at 24 kHz.
    assert abs(replies[0][1].size - 4 * 0.6 * 24000) < 24000 * 0.1, replies[0][1].size
    assert model.calls == 5


class Gain(BaseModel):
    webrtc_id: str
    gain: float


def _input_stream(fn, **kw) -> Stream:
    stream = Stream(ReplyOnPause(fn, **kw), modality="audio", concurrency_limit=2)

    @stream.post("/input_hook")
    async def input_hook(body: Gain):
        stream.set_input(body.webrtc_id, body.gain)
        return {"status": "ok"}

    return stream


@pytest.mark.parametrize("how", ["needs_args", "two_parameters"])
async def test_handler_that_needs_inputs_asks_for_them_and_gets_them(serve, how):
    """At each pause the server asks with `send_input` (FastRTC's), waits until the client's
    `set_input` arrives, then calls fn with it."""
    seen: list[tuple] = []

    if how == "needs_args":
        def reply(audio, *args):
            seen.append(args)
            yield audio

        stream = _input_stream(reply, needs_args=True)
    else:
        def reply(audio, gain):
            seen.append((gain,))
            yield audio

        stream = _input_stream(reply)
    server = serve(stream)
    asked: list[float] = []
    loop = asyncio.get_running_loop()

    async with httpx.AsyncClient(timeout=10) as client:
        async def on_message(msg: dict) -> None:
            if msg.get("type") == "send_input":
                asked.append(loop.time())
                await asyncio.sleep(0.3)  # the turn must wait for us
                r = await client.post(f"{server.http}/input_hook", json={"webrtc_id": "args", "gain": 0.7})
                assert r.status_code == 200

        pcm = speech_48k(FIXTURE)
        rec = await stream_audio(f"{server.ws}/websocket/offer", "args", pcm, 48000, tail_s=2.5,
                                 on_message=on_message)
    assert len(asked) == 2  # asked every turn, as FastRTC does
    assert seen == [(0.7,), (0.7,)], seen
    assert len(rec.replies()) == 2
    assert not [m for m in rec.messages if m.get("type") == "error"]


async def test_inputs_that_never_arrive_are_an_error_for_that_session(serve, monkeypatch):
    monkeypatch.setattr(rop, "ARGS_TIMEOUT_S", 0.5)
    called: list = []

    def reply(audio, gain):
        called.append(gain)
        yield audio

    stream = _input_stream(reply)
    server = serve(stream)
    pcm = speech_48k(FIXTURE)
    rec = await stream_audio(f"{server.ws}/websocket/offer", "noargs", pcm, 48000, tail_s=2.5)
    asks = [m for m in rec.messages if m.get("type") == "send_input"]
    errors = [m["message"] for m in rec.messages if m.get("type") == "error"]
    assert len(asks) == 2  # one per turn: nothing ever arrived
    assert errors and "set_input" in errors[0], errors
    assert not called and not rec.media


async def test_stereo_handler_gets_two_channels(serve):
    """`expected_layout="stereo"`: fn gets the utterance as (2, n), channels in order; the VAD
    runs on their mix. The WebSocket wire carries mono, so the stereo frames are handed to
    the session's handler directly (`Session.receive`, the call every front end makes) inside
    a real WebSocket session; the reply goes back to the client over that socket."""
    got: list[np.ndarray] = []

    def reply(audio):
        sr, x = audio
        got.append(x)
        yield sr, x[:1]

    stream = Stream(ReplyOnPause(reply, expected_layout="stereo"), modality="audio", concurrency_limit=2)
    server = serve(stream)
    import websockets

    left = speech_48k(FIXTURE)
    right = (left // 2).astype(np.int16)
    frames = np.stack([left, right])  # (2, n)
    async with websockets.connect(f"{server.ws}/websocket/offer", max_size=None) as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "stereo"}))
        for _ in range(100):
            if "stereo" in stream.sessions:
                break
            await asyncio.sleep(0.02)
        session = stream.sessions["stereo"]
        for i in range(0, frames.shape[1], 960):  # 20 ms frames, as a front end delivers them
            fut = asyncio.run_coroutine_threadsafe(session.receive((48000, frames[:, i : i + 960])), session.loop)
            await asyncio.wrap_future(fut)
            await asyncio.sleep(0.01)  # twice real time: each turn's reply starts before the next
        media: list[dict] = []  # the reply comes back over the socket (one message per yield)
        while not media:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg.get("event") == "media":
                media.append(msg)
        for _ in range(100):  # fn runs on a worker thread: give the last turn time to start
            if len(got) >= 2:
                break
            await asyncio.sleep(0.05)
    spans = speech_spans(FIXTURE)
    assert len(got) == len(spans)
    for x in got:
        assert x.shape[0] == 2 and x.dtype == np.int16 and x.shape[1] > 0.6 * 48000
    whole = np.concatenate(got, axis=1)
    assert np.array_equal(whole[1], (whole[0] // 2).astype(np.int16))  # channel order kept


def test_unknown_layout_and_non_model_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="expected_layout"):
        ReplyOnPause(echo, expected_layout="5.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PauseDetectionModel"):
        ReplyOnPause(echo, model=object())  # type: ignore[arg-type]
