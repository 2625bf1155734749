"""The Stream API over real WebSocket clients: limits, inputs/outputs, errors, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import httpx
import numpy as np
import psutil
import pytest
import websockets
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server import (
    AdditionalOutputs,
    AsyncStreamHandler,
    CloseStream,
    ReplyOnPause,
    Stream,
    StreamHandler,
    UnknownConnection,
)
from server.codecs import ulaw_encode
from tests.test_websocket_reply import speech_48k
from tests.ws_client import stream_audio


def media(pcm: np.ndarray) -> str:
    return json.dumps({"event": "media", "media": {"payload": base64.b64encode(ulaw_encode(pcm)).decode()}})


async def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws, pred, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = await recv_json(ws, max(0.01, deadline - time.monotonic()))
        if pred(msg):
            return msg


class Body(BaseModel):
    webrtc_id: str
    gain: float


class Echo(StreamHandler):
    """A sync FastRTC-style handler: emit returns None until there is something."""

    def __init__(self) -> None:
        super().__init__(input_sample_rate=16000, output_sample_rate=16000)
        self.frames: list[np.ndarray] = []
        self.emits = 0

    def receive(self, frame):
        sr, arr = frame
        assert arr.ndim == 2 and arr.shape[0] == 1
        self.frames.append(arr)

    def emit(self):
        self.emits += 1
        if self.frames:
            return 16000, self.frames.pop(0)
        return None

    def copy(self):
        return Echo()


def test_stream_is_a_fastapi_app_and_validates_arguments():
    s = Stream(Echo(), modality="audio")
    assert isinstance(s, FastAPI)
    assert s.concurrency_limit == 1  # FastRTC's default
    with pytest.raises(ValueError, match="additional_outputs_handler"):
        Stream(Echo(), modality="audio", additional_outputs=[object()])
    with pytest.raises(ValueError, match="modality"):
        Stream(Echo(), modality="smell")  # type: ignore[arg-type]


async def test_sync_handler_echo_custom_route_and_mount(serve):
    stream = Stream(Echo(), modality="audio", concurrency_limit=2)

    @stream.get("/hello")
    async def hello():
        return {"hi": stream.active_sessions}

    app = FastAPI()
    stream.mount(app, path="/rtc")
    server = serve(stream)
    other = serve(app)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.http}/hello")).json() == {"hi": 0}
    tone = (np.sin(np.arange(3200) / 8) * 8000).astype(np.int16)
    for base in (f"{server.ws}/websocket/offer", f"{other.ws}/rtc/websocket/offer"):
        async with websockets.connect(base) as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": "a"}))
            await ws.send(media(tone))
            msg = await recv_until(ws, lambda m: m.get("event") == "media")
            assert msg["media"]["payload"]
            await ws.send(json.dumps({"event": "ping"}))
            await recv_until(ws, lambda m: m.get("event") == "pong")


async def test_concurrency_limit_refuses_with_fastrtc_code(serve):
    stream = Stream(Echo(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    url = f"{server.ws}/websocket/offer"
    async with websockets.connect(url) as a, websockets.connect(url) as b:
        await a.send(json.dumps({"event": "start", "websocket_id": "a"}))
        await b.send(json.dumps({"event": "start", "websocket_id": "b"}))
        await asyncio.sleep(0.2)
        assert stream.active_sessions == 2
        async with websockets.connect(url) as c:
            await c.send(json.dumps({"event": "start", "websocket_id": "c"}))
            msg = await recv_json(c)
            assert msg == {"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": 2}}
            with pytest.raises(websockets.ConnectionClosed):
                await recv_json(c)
        # Reusing a live id is refused too (no hijacking).
        async with websockets.connect(url) as d:
            await d.send(json.dumps({"event": "start", "websocket_id": "a"}))
            msg = await recv_json(d)
            assert msg["meta"]["error"] == "connection_already_exists"
    await asyncio.sleep(0.3)
    assert stream.active_sessions == 0


class Counting(AsyncStreamHandler):
    shutdowns = 0

    def __init__(self) -> None:
        super().__init__(input_sample_rate=16000)
        self.q: asyncio.Queue = asyncio.Queue()

    async def receive(self, frame):
        pass

    async def emit(self):
        return await self.q.get()

    def copy(self):
        return Counting()

    def shutdown(self):
        type(self).shutdowns += 1


async def test_time_limit_closes_session_and_runs_shutdown(serve):
    stream = Stream(Counting(), modality="audio", concurrency_limit=2, time_limit=0.5)
    server = serve(stream)
    Counting.shutdowns = 0
    async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "t"}))
        t0 = time.monotonic()
        msg = await recv_until(ws, lambda m: m.get("type") == "end_stream", timeout=5)
        assert "time limit" in msg["data"]
        with pytest.raises(websockets.ConnectionClosed):
            await recv_json(ws, timeout=5)
        assert 0.4 < time.monotonic() - t0 < 3
    assert stream.active_sessions == 0
    assert Counting.shutdowns == 1


async def test_set_input_output_stream_and_additional_outputs(serve):
    seen: list[tuple] = []

    def reply(audio, gain):
        seen.append((audio[1].shape, gain))
        yield AdditionalOutputs(f"gain={gain}", audio[1].shape[1])
        yield audio[0], (audio[1] * 0).astype(np.int16)

    class Slider:  # stands in for a gradio component: only `.value` is read
        value = 0.25

    stream = Stream(
        ReplyOnPause(reply),
        modality="audio",
        concurrency_limit=4,
        additional_inputs=[Slider()],
        additional_outputs=[object(), object()],
        additional_outputs_handler=lambda old, new: new,
    )

    @stream.post("/input_hook")
    async def input_hook(body: Body):
        stream.set_input(body.webrtc_id, body.gain)
        return {"status": "ok"}

    @stream.get("/outputs")
    async def outputs(webrtc_id: str):
        outputs = stream.output_stream(webrtc_id)  # unknown id -> 404 before streaming starts

        async def gen():
            async for out in outputs:
                yield f"event: output\ndata: {json.dumps(list(out.args))}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    server = serve(stream)
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{server.http}/input_hook", json={"webrtc_id": "nobody", "gain": 1})
        assert r.status_code == 404 and "unknown connection" in r.text
        assert (await client.get(f"{server.http}/outputs", params={"webrtc_id": "nobody"})).status_code == 404

        pcm = speech_48k("speech_pause_speech_16k.wav")
        sse_lines: list[str] = []
        gain = {"now": 0.25}  # what the client shows: the component's default at first

        async def answer(msg: dict) -> None:  # FastRTC's clients answer send_input
            if msg.get("type") == "send_input":
                r = await client.post(f"{server.http}/input_hook", json={"webrtc_id": "io", "gain": gain["now"]})
                assert r.status_code == 200

        async def read_sse():
            await asyncio.sleep(0.5)  # the session exists by then
            async with client.stream("GET", f"{server.http}/outputs", params={"webrtc_id": "io"}) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        sse_lines.append(line)

        async def set_gain_later():
            await asyncio.sleep(4.0)  # after the first reply, before the second utterance ends
            gain["now"] = 2.0
            r = await client.post(f"{server.http}/input_hook", json={"webrtc_id": "io", "gain": 2.0})
            assert r.status_code == 200

        sse = asyncio.create_task(read_sse())
        rec, _ = await asyncio.gather(
            stream_audio(f"{server.ws}/websocket/offer", "io", pcm, 48000, tail_s=2.5, on_message=answer),
            set_gain_later(),
        )
        await asyncio.wait_for(sse, 5)
    # Each turn got what the client answered: the default at first, then the new value.
    assert [g for _, g in seen] == [0.25, 2.0], seen
    assert all(shape[0] == 1 for shape, _ in seen)
    fetch = [m for m in rec.messages if m.get("type") == "fetch_output"]
    assert [m["data"][0] for m in fetch] == ["gain=0.25", "gain=2.0"]
    assert len(sse_lines) == 2 and "gain=0.25" in sse_lines[0] and "gain=2.0" in sse_lines[1]


async def test_raising_handler_only_hurts_its_own_session(serve):
    def reply(audio, who):
        if who == "bad":
            raise RuntimeError("boom from handler")
        yield audio

    class Who:
        value = "good"

    stream = Stream(ReplyOnPause(reply), modality="audio", concurrency_limit=4,
                    additional_inputs=[Who()])
    server = serve(stream)
    pcm = speech_48k("speech_pause_speech_16k.wav")

    def answer_as(who: str):
        def answer(msg: dict) -> None:  # each client answers send_input with its name
            if msg.get("type") == "send_input":
                stream.set_input(who, who)  # from this (the client's) thread
        return answer

    good, bad = await asyncio.gather(
        stream_audio(f"{server.ws}/websocket/offer", "good", pcm, 48000, tail_s=2.5, on_message=answer_as("good")),
        stream_audio(f"{server.ws}/websocket/offer", "bad", pcm, 48000, tail_s=2.5, on_message=answer_as("bad")),
    )
    errors = [m for m in bad.messages if m.get("type") == "error"]
    assert errors and "boom from handler" in errors[0]["message"]
    assert not bad.media
    assert len(good.replies()) == 2
    assert not [m for m in good.messages if m.get("type") == "error"]


async def test_bad_input_gets_clear_errors_and_server_carries_on(serve):
    stream = Stream(Echo(), modality="audio", concurrency_limit=8)
    server = serve(stream)
    url = f"{server.ws}/websocket/offer"
    async with websockets.connect(url) as ws:
        # media before start: error, then a clean close with policy-violation code
        await ws.send(media(np.zeros(160, np.int16)))
        msg = await recv_json(ws)
        assert msg["type"] == "error" and "start" in msg["message"]
        with pytest.raises(websockets.ConnectionClosed) as e:
            await recv_json(ws)
        assert e.value.rcvd.code == 1008
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "x"}))
        await ws.send("this is not json")
        assert "not valid JSON" in (await recv_json(ws))["message"]
        await ws.send(json.dumps({"no_event": 1}))
        assert '"event"' in (await recv_json(ws))["message"]
        await ws.send(json.dumps({"event": "teleport"}))
        assert "unknown event" in (await recv_json(ws))["message"]
        await ws.send(json.dumps({"event": "media", "media": {"payload": "@@not base64@@"}}))
        assert "base64" in (await recv_json(ws))["message"]
        await ws.send(json.dumps({"event": "media", "media": {}}))
        assert "payload" in (await recv_json(ws))["message"]
        # still alive
        await ws.send(json.dumps({"event": "ping"}))
        assert (await recv_json(ws)) == {"event": "pong"}
        # a huge message: error and close 1009
        await ws.send(json.dumps({"event": "media", "media": {"payload": "A" * (2 << 20)}}))
        msg = await recv_json(ws)
        assert "too large" in msg["message"]
        with pytest.raises(websockets.ConnectionClosed) as e:
            await recv_json(ws)
        assert e.value.rcvd.code == 1009
    await asyncio.sleep(0.2)
    assert stream.active_sessions == 0
    # and a new session works
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "y"}))
        await ws.send(media((np.ones(320) * 1000).astype(np.int16)))
        await recv_until(ws, lambda m: m.get("event") == "media")


async def test_close_stream_from_handler_ends_the_session(serve):
    def reply(audio):
        yield audio
        yield CloseStream("done talking")

    stream = Stream(ReplyOnPause(reply), modality="audio", concurrency_limit=2)
    server = serve(stream)
    pcm = speech_48k("speech_pause_speech_16k.wav")
    rec = await stream_audio(f"{server.ws}/websocket/offer", "cs", pcm, 48000, tail_s=1.0)
    ends = [m for m in rec.messages if m.get("type") == "end_stream"]
    assert ends and ends[0]["data"] == "done talking"
    assert len(rec.replies()) == 1  # the session ended after the first reply


@pytest.mark.parametrize("handler_kind", ["reply_on_pause", "sync_stream_handler"])
async def test_idle_sessions_cost_next_to_nothing(serve, handler_kind):
    handler = ReplyOnPause(lambda a: iter([a])) if handler_kind == "reply_on_pause" else Echo()
    stream = Stream(handler, modality="audio", concurrency_limit=32)
    server = serve(stream)
    url = f"{server.ws}/websocket/offer"
    sockets = [await websockets.connect(url) for _ in range(20)]
    try:
        for i, ws in enumerate(sockets):
            await ws.send(json.dumps({"event": "start", "websocket_id": f"idle{i}"}))
        await asyncio.sleep(1.0)
        assert stream.active_sessions == 20
        proc = psutil.Process(os.getpid())
        t0 = proc.cpu_times()
        w0 = time.monotonic()
        await asyncio.sleep(3.0)
        t1 = proc.cpu_times()
        used = (t1.user - t0.user + t1.system - t0.system) / (time.monotonic() - w0)
        # The whole test process (server + idle clients) stays under 5% of one core.
        assert used < 0.05, f"{used:.1%} of a core for 20 idle sessions"
        if handler_kind == "sync_stream_handler":
            emits = sum(s.handler.emits for s in stream.sessions.values())
            assert emits < 20 * 4 * 10, emits  # backoff: ~5/s per idle session, not 10,000/s
    finally:
        for ws in sockets:
            await ws.close()


def test_unknown_connection_is_an_http_404():
    s = Stream(Echo(), modality="audio")
    with pytest.raises(UnknownConnection) as e:
        s.set_input("ghost", 1)
    assert e.value.status_code == 404


def test_uvicorn_deflate_left_on_is_read_off_uvicorns_command_line():
    from server.config import uvicorn_deflate_left_on as on

    uv = ["/usr/bin/uvicorn", "server.echo_app:stream"]
    assert on(uv, {}) is True  # uvicorn's default
    assert on([*uv, "--ws-per-message-deflate", "false"], {}) is False
    assert on([*uv, "--ws-per-message-deflate=False"], {}) is False
    assert on([*uv, "--ws-per-message-deflate", "true"], {}) is True
    assert on(uv, {"UVICORN_WS_PER_MESSAGE_DEFLATE": "false"}) is False
    assert on(["/x/site-packages/uvicorn/__main__.py", "a:b"], {}) is True  # python -m uvicorn
    assert on(["/usr/bin/gunicorn", "a:b"], {}) is False  # not uvicorn's command line
    assert on([], {}) is False


def test_startup_freezes_what_the_server_built_so_far() -> None:
    """The lifespan moves the startup objects out of the cyclic GC's full collections
    (`freeze_startup_objects`)."""
    import gc

    from fastapi.testclient import TestClient

    from server import ReplyOnPause, Stream

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    stream = Stream(ReplyOnPause(lambda audio: iter(())), modality="audio", mode="send-receive")
    try:
        with TestClient(stream) as client:
            assert gc.get_freeze_count() > 10_000  # torch, FastAPI, Gradio, the stream
            assert client.get("/health").status_code == 200
    finally:
        gc.unfreeze()  # hand the objects back: the rest of the test session collects them
