"""What an adversarial run broke in session lifetimes and handler threads, through real
WebSocket clients: sessions that never left the registry, a handler that froze the event
loop, hung handlers that used up the thread pool, VAD slots left behind."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import websockets

from server import AdditionalOutputs, AsyncStreamHandler, CloseStream, ReplyOnPause, Stream, StreamHandler
from server.vad_engine import get_vad_engine
from tests.test_stream_api import media, recv_json, recv_until
from tests.test_websocket_reply import speech_48k
from tests.ws_client import stream_audio


def echo(audio):
    yield audio


class ClosesSoon(AsyncStreamHandler):
    """Ends its own stream 50 ms after starting (CloseStream)."""

    def copy(self) -> ClosesSoon:
        return ClosesSoon()

    async def receive(self, frame) -> None:
        pass

    async def emit(self):
        await asyncio.sleep(0.05)
        return CloseStream("bye")


async def _client_closing_on_end_stream(url: str, sid: str) -> dict | None:
    """Streams media until the server says `end_stream` (or refuses), then closes at once:
    the client's close races the server's. Returns a refusal, if any."""
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": sid}))

        async def sender() -> None:
            while True:
                await ws.send(media(np.zeros(960, np.int16)))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(sender())
        try:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("status") == "failed":
                    return msg
                if msg.get("type") == "end_stream":
                    return None
        except websockets.ConnectionClosed:
            return None
        finally:
            task.cancel()
    return None


@pytest.mark.parametrize("ending", ["close_stream", "time_limit", "reply_on_pause_time_limit"])
async def test_sessions_leave_the_registry_however_both_ends_close(serve, ending):
    """Server-side end (CloseStream / time_limit) racing the client's close on `end_stream`:
    every session leaves the registry exactly once, so a limit-3 stream never locks up."""
    if ending == "close_stream":
        stream = Stream(ClosesSoon(), modality="audio", concurrency_limit=3)
    elif ending == "time_limit":
        stream = Stream(ClosesSoon(), modality="audio", concurrency_limit=3, time_limit=0.03)
    else:
        stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=3, time_limit=0.3)
    server = serve(stream)
    url = f"{server.ws}/websocket/offer"
    refusals = []
    for i in range(40):
        refusal = await _client_closing_on_end_stream(url, f"c{i}")
        if refusal is not None:
            refusals.append((i, refusal))
    assert not refusals, refusals[:3]
    deadline = time.monotonic() + 5
    while (stream.active_sessions or stream.registry.closing) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert stream.active_sessions == 0 and stream.registry.closing == 0


class NeverAwaits(AsyncStreamHandler):
    """emit() returns at once, forever, without awaiting anything."""

    def copy(self) -> NeverAwaits:
        return NeverAwaits()

    async def receive(self, frame) -> None:
        pass

    async def emit(self):
        return AdditionalOutputs("spam")


async def test_an_emit_that_never_awaits_hurts_only_its_session(serve, monkeypatch):
    """An async emit() that never awaits used to spin the event loop: /health timed out and
    the server stayed at 99% CPU after the client left. Now the loop stays responsive, the
    outputs are rate-limited, and the session is closed with a clear error."""
    import server.session as session_mod

    monkeypatch.setattr(session_mod, "SPIN_SECONDS", 1.5)
    monkeypatch.setattr(session_mod, "SPIN_CALLS", 100)
    stream = Stream(NeverAwaits(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "spinner"}))
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(5):
                t0 = time.monotonic()
                r = await http.get(f"{server.http}/health")
                assert r.status_code == 200
                assert time.monotonic() - t0 < 1.0
                await asyncio.sleep(0.1)
        err = await recv_until(ws, lambda m: m.get("type") == "error", timeout=10)
        assert "without awaiting" in err["message"]
        outputs = 0
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                msg = await recv_json(ws, timeout=5)
                outputs += msg.get("type") == "fetch_output"
    assert stream.active_sessions == 0


class HangsOnReceive(StreamHandler):
    """receive() hangs (until released) when the session id starts with 'hang'."""

    release = threading.Event()
    calls = 0

    def __init__(self) -> None:
        super().__init__(input_sample_rate=16000, output_sample_rate=16000)
        self.frames: list[np.ndarray] = []

    def copy(self) -> HangsOnReceive:
        return HangsOnReceive()

    def receive(self, frame) -> None:
        from server import get_current_context

        HangsOnReceive.calls += 1
        if get_current_context().webrtc_id.startswith("hang"):
            HangsOnReceive.release.wait(60)
        self.frames.append(frame[1])

    def emit(self):
        return (16000, self.frames.pop(0)) if self.frames else None


async def test_hung_sync_handlers_cost_capacity_not_progress(serve, monkeypatch):
    """Handlers whose receive() hangs used to keep their sessions registered and every pool
    thread busy, so new sessions' work queued forever. Now a timed-out call ends its session,
    its thread counts as lost and is replaced (a healthy session keeps working), and once too
    many threads are lost, new sessions are refused with a clear error."""
    monkeypatch.setenv("BATCHRTC_HANDLER_THREADS", "4")
    monkeypatch.setenv("BATCHRTC_HANDLER_THREADS_LOST", "6")
    HangsOnReceive.release.clear()
    stream = Stream(HangsOnReceive(), modality="audio", concurrency_limit=20, handler_timeout=0.5)
    server = serve(stream)
    url = f"{server.ws}/websocket/offer"
    try:
        async def hang(i: int) -> int | None:
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"event": "start", "websocket_id": f"hang{i}"}))
                await ws.send(media(np.zeros(320, np.int16)))
                try:
                    msg = await recv_until(ws, lambda m: m.get("type") == "error", timeout=10)
                    assert "did not return" in msg["message"]
                    await recv_json(ws, timeout=10)
                except websockets.ConnectionClosed as e:
                    return e.rcvd.code if e.rcvd else None
            return None

        # 5 hung sessions: more than the 4 worker threads
        await asyncio.gather(*(hang(i) for i in range(5)))
        await asyncio.sleep(0.5)
        assert stream.active_sessions == 0  # every hung session has ended
        assert stream.pool.lost == 5
        # a healthy session is served at once by a replacement thread
        rec = await stream_audio(url, "healthy", np.full(1600, 1000, np.int16), 16000, frame_ms=20, tail_s=1.0)
        assert sum(p.size for _, p in rec.media) > 0, rec.messages
        # one more hung session: 6 lost threads, the limit -> new sessions are refused clearly
        await hang(5)
        await asyncio.sleep(0.3)
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": "late"}))
            msg = await recv_json(ws)
        assert msg["status"] == "failed" and msg["meta"]["error"] == "server_overloaded"
        assert "stuck" in msg["meta"]["detail"]
        # operators see it: /health is 503 naming the threads, /metrics counts them
        async with httpx.AsyncClient(timeout=10) as http:
            health = await http.get(f"{server.http}/health")
            metrics = (await http.get(f"{server.http}/metrics")).text
        assert health.status_code == 503 and "handler_threads" in health.json()["failed"]
        assert health.json()["handler_threads"]["lost"] == 6
        assert 'batchrtc_handler_threads{state="lost"} 6.0' in metrics
    finally:
        HangsOnReceive.release.set()
    # released threads are counted back; new sessions are accepted again
    deadline = time.monotonic() + 5
    while stream.pool.lost and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert stream.pool.lost == 0
    rec = await stream_audio(url, "after", np.full(1600, 1000, np.int16), 16000, tail_s=1.0)
    assert sum(p.size for _, p in rec.media) > 0


async def test_vad_slots_are_released_when_clients_keep_sending_after_end_stream(serve):
    """With a time limit, clients that keep sending media after `end_stream` used to leave VAD
    state slots and batcher producers behind."""
    engine = get_vad_engine()
    slots0, producers0 = engine.state.in_use, engine.batcher.producers
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=8, time_limit=1.5)
    server = serve(stream)
    pcm = speech_48k("speech_pause_speech_16k.wav")

    async def stubborn(i: int) -> None:
        async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": f"v{i}"}))
            try:
                for k in range(0, pcm.size, 960):  # real time, and on after end_stream
                    await ws.send(media(pcm[k : k + 960]))
                    await asyncio.sleep(0.02 if k < 48000 * 1.3 else 0.0)
            except websockets.ConnectionClosed:
                pass

    await asyncio.gather(*(stubborn(i) for i in range(6)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (stream.active_sessions or stream.registry.closing):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert stream.active_sessions == 0
    assert engine.state.in_use == slots0, (engine.state.in_use, slots0)
    assert engine.batcher.producers == producers0, (engine.batcher.producers, producers0)


class Flood(AsyncStreamHandler):
    def copy(self) -> Flood:
        return Flood()

    async def receive(self, frame) -> None:
        pass

    async def emit(self):
        await asyncio.sleep(3600)


FLOODER = """
import asyncio, json, sys, websockets
async def main(url):
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "flooder"}))
        ping = json.dumps({"event": "ping"})
        try:
            for _ in range(1_000_000):
                await ws.send(ping)
            await asyncio.wait_for(ws.wait_closed(), 10)
        except websockets.ConnectionClosed:
            pass
        print(ws.close_code)
asyncio.run(main(sys.argv[1]))
"""


async def test_a_ping_flood_is_closed_and_other_sessions_keep_their_latency(serve):
    """A client (its own process) sending pings as fast as it can used to delay another
    session's reply from 3.0 s to 5.4 s. Now it is closed for flooding within a second and
    the other session's replies come as without it."""
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=4)
    server = serve(stream)
    url = f"{server.ws}/websocket/offer"
    pcm = speech_48k("speech_pause_speech_16k.wav")
    calm = await stream_audio(url, "calm", pcm, 48000, tail_s=2.5)
    flooder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOODER, url, stdout=asyncio.subprocess.PIPE
    )
    seen_flooder = []

    async def watch() -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            seen_flooder.append(("flooder" in stream.sessions, time.monotonic() - t0))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    rec = await stream_audio(url, "victim", pcm, 48000, tail_s=2.5)
    out, _ = await asyncio.wait_for(flooder.communicate(), 30)
    await watcher
    # disconnected: 1008 when the close frame gets through the client's own flood, else the
    # TCP connection simply drops (1006); and within a second or so of starting
    assert out.decode().strip() in ("1008", "1006"), out
    assert not any(present for present, t in seen_flooder if t > 1.5), seen_flooder
    # the other session: every utterance answered, the first about as soon as without the
    # flood (the flooding process itself takes one of this box's two cores)
    calm_audio = sum(a.size for _, a in calm.replies())
    assert sum(a.size for _, a in rec.replies()) == calm_audio > 0
    assert rec.replies()[0][0] < calm.replies()[0][0] + 1.5, (rec.replies()[0][0], calm.replies()[0][0])
    errors = [m for m in rec.messages if m.get("type") == "error"]
    assert not errors, errors


class BigOutputs(AsyncStreamHandler):
    """Emits a 20 KB AdditionalOutputs every 5 ms: a client that never reads fills its queue."""

    def copy(self) -> BigOutputs:
        return BigOutputs()

    async def receive(self, frame) -> None:
        pass

    async def emit(self):
        await asyncio.sleep(0.005)
        return AdditionalOutputs("x" * 20_000)


def _raw_ws_client(port: int, path: str) -> socket.socket:
    """A WebSocket client that never reads: the handshake by hand, then nothing is read."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head, head
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    data, mask = text.encode(), os.urandom(4)
    n = len(data)
    header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


async def test_repeated_warnings_of_a_session_are_rate_limited(serve, caplog):
    """A client that never reads used to produce one identical warning per dropped message
    (18,966 lines in the adversarial run). Log lines of one session are now rate-limited."""
    stream = Stream(BigOutputs(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    caplog.set_level(logging.WARNING)
    sock = _raw_ws_client(server.port, "/websocket/offer")
    try:
        _send_text(sock, json.dumps({"event": "start", "websocket_id": "noisy"}))
        await asyncio.sleep(4.0)  # never reads: TCP buffers, then the send queue, fill up
    finally:
        sock.close()
    lines = [r for r in caplog.records if "send queue full" in r.getMessage()]
    assert 1 <= len(lines) <= 2, len(lines)
