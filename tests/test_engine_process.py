"""One engine process, many front-end processes: `uvicorn --workers 2`, real processes,
real WebSocket clients, real speech (issue 13).

Which worker the kernel hands a new connection to is not ours to choose, so each test opens
connections until it has what it needs on both workers (and says so if it never does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from benchmarks.server_process import UvicornProcess
from benchmarks.ws_client import ulaw_encode
from server.engine.client import private_dir
from batching.process import SHM_PREFIX
from tests.test_websocket_reply import speech_48k
from tests.webrtc_client import FrameSource, connect

APP = "tests.engine_apps:echo"
FRAME = 960  # 20 ms at 48 kHz
SPEECH = "speech_pause_speech_16k.wav"  # two utterances: two replies


class Server(UvicornProcess):
    def __init__(self, workers: int = 2, app: str = APP, **env: str) -> None:
        super().__init__([app, "--workers", str(workers)], {"BATCHRTC_ICE_HOSTS": "127.0.0.1", **env},
                         name="engine_test", start_timeout_s=120)
        self.workers = workers

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket/offer"

    def health(self) -> dict:
        return httpx.get(f"{self.http}/health", timeout=10).json()

    def wait_ready(self, timeout: float = 120.0, restarts: int | None = None) -> dict:
        """Until the engine answers with every worker connected (and, if given, `restarts`)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                h = self.health()
                eng = h.get("engine", {})
                if eng.get("up") and eng.get("workers") == self.workers and (restarts is None or eng["restarts"] == restarts):
                    return h
                last = h
            except (httpx.HTTPError, ValueError) as e:
                last = e
            time.sleep(0.25)
        raise AssertionError(f"engine not ready: {last}\n{self.log_tail()}")

    def metric(self, name: str) -> dict[str, float]:
        """{labels: value} of one metric family from /metrics (any worker answers for all)."""
        text = httpx.get(f"{self.http}/metrics", timeout=10).text
        out = {}
        for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
            out[m.group(1) or ""] = float(m.group(2))
        return out

    def sessions_by_worker(self) -> dict[str, int]:
        return {re.search(r'worker="(\d+)"', k).group(1): int(v)
                for k, v in self.metric("batchrtc_engine_sessions").items()}


@pytest.fixture(scope="module")
def server():
    s = Server()
    with s:
        s.wait_ready()
        yield s
    s.cleanup_log()


class Client:
    """A held WebSocket session: open, then speak at real-time pace while replies arrive."""

    def __init__(self, url: str, sid: str) -> None:
        self.url, self.sid = url, sid
        self.tag = "untagged"  # what it answers `send_input` with (a turn waits for it)
        self.messages: list[dict] = []
        self.media = 0
        self.refusal: dict | None = None

    async def open(self) -> Client:
        self.ws = await websockets.connect(self.url, max_size=None)
        await self.ws.send(json.dumps({"event": "start", "websocket_id": self.sid}))
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if msg.get("event") == "media":
                    self.media += 1
                elif msg.get("status") == "failed":
                    self.refusal = msg["meta"]
                else:
                    self.messages.append(msg)
                    if msg.get("type") == "send_input":  # as FastRTC's clients: set the inputs
                        asyncio.create_task(self._answer())
        except websockets.ConnectionClosed:
            pass

    async def _answer(self) -> None:
        base = self.url.replace("ws://", "http://").split("/websocket/")[0]
        async with httpx.AsyncClient(timeout=10) as http:
            await http.post(f"{base}/tag/{self.sid}", params={"value": self.tag})

    async def speak(self, pcm: np.ndarray) -> None:
        t0 = time.monotonic()
        for i, start in enumerate(range(0, pcm.size, FRAME)):
            delay = t0 + i * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = base64.b64encode(ulaw_encode(pcm[start:start + FRAME])).decode()
            await self.ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))

    def logs(self, what: str) -> int:
        return sum(1 for m in self.messages if m.get("type") == "log" and m.get("data") == what)

    def outputs(self) -> list:
        return [m["data"] for m in self.messages if m.get("type") == "fetch_output"]

    async def close(self) -> None:
        try:
            await self.ws.send(json.dumps({"event": "stop"}))
        except websockets.ConnectionClosed:
            pass
        await self.ws.close()
        await asyncio.wait_for(self.reader, 10)


async def open_on_both(server: Server, prefix: str, at_most: int = 40) -> list[Client]:
    """Open sessions until both workers hold at least one."""
    clients: list[Client] = []
    for i in range(at_most):
        clients.append(await Client(server.ws, f"{prefix}-{i}").open())
        await asyncio.sleep(0.1)
        per = await asyncio.to_thread(server.sessions_by_worker)
        if len(per) == 2 and all(n > 0 for n in per.values()):
            return clients
    raise AssertionError(f"{at_most} connections never reached both workers: {per}")


def owner_of(server: Server, sid: str) -> tuple[int, int]:
    """(pid of the worker holding `sid`, pid of the other one), asking over fresh connections."""
    seen: dict[bool, int] = {}
    for _ in range(60):
        r = httpx.get(f"{server.http}/owner/{sid}", timeout=10).json()
        seen[r["here"]] = r["pid"]
        if len(seen) == 2:
            return seen[True], seen[False]
    raise AssertionError(f"60 fresh connections reached one worker only: {seen}")


async def test_sessions_on_two_workers_meet_in_one_batch(server):
    pcm = speech_48k(SPEECH)
    before = server.metric("batchrtc_engine_mixed_batches_total")
    clients = await open_on_both(server, "mix")
    await asyncio.gather(*(c.speak(pcm) for c in clients))
    await asyncio.sleep(3.0)
    for c in clients:
        await c.close()
    for c in clients:  # every session, on either worker, got both replies
        assert c.logs("pause_detected") == 2 and c.media > 0, (c.sid, c.messages[-3:])
    items = server.metric("batchrtc_engine_batch_items_count")
    workers = {re.search(r'worker="(\d+)"', k).group(1) for k, v in items.items() if "silero_vad" in k and v > 0}
    assert len(workers) == 2, items
    mixed = server.metric("batchrtc_engine_mixed_batches_total")
    assert mixed.get('{batcher="silero_vad"}', 0) > before.get('{batcher="silero_vad"}', 0), mixed


async def test_requests_for_a_session_work_on_either_worker(server):
    c = await Client(server.ws, "fw-1").open()
    c.tag = "blue"
    await asyncio.sleep(0.3)
    owner, other = await asyncio.to_thread(owner_of, server, "fw-1")

    # set_input over fresh connections until one lands on the worker that does not hold it
    answered = set()
    for _ in range(60):
        r = await asyncio.to_thread(httpx.post, f"{server.http}/tag/fw-1", params={"value": "blue"}, timeout=10)
        assert r.status_code == 200, r.text
        answered.add(r.json()["pid"])
        if other in answered:
            break
    assert other in answered, answered

    # the outputs stream, read from the other worker
    outs: list = []

    async def read_outputs() -> None:
        while True:
            async with httpx.AsyncClient(timeout=30) as h, h.stream("GET", f"{server.http}/outputs/fw-1") as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                first = [await anext(lines) for _ in range(2)][1]
                if int(first.split(": ", 1)[1]) != other:
                    continue  # landed on the owner: try again for the other one
                async for line in lines:
                    if line.startswith("data: "):
                        outs.append(json.loads(line[6:]))
                        return

    reader = asyncio.create_task(read_outputs())
    await asyncio.sleep(1.0)
    await c.speak(speech_48k(SPEECH))
    await asyncio.wait_for(reader, 20)
    await c.close()
    assert outs == [["blue"]]
    assert ["blue"] in c.outputs()

    # an id nobody holds is still a clear 404 on every worker
    codes = {(await asyncio.to_thread(httpx.post, f"{server.http}/tag/nobody", params={"value": "x"})).status_code
             for _ in range(6)}
    assert codes == {404}


async def test_concurrency_limit_and_ids_are_global():
    s = Server(BATCHRTC_CONCURRENCY="3")
    with s:
        s.wait_ready()
        held = [await Client(s.ws, f"lim-{i}").open() for i in range(3)]
        await asyncio.sleep(0.5)
        assert all(c.refusal is None for c in held)
        assert sum(s.sessions_by_worker().values()) == 3
        extra = [await Client(s.ws, f"over-{i}").open() for i in range(8)]
        dup = [await Client(s.ws, "lim-0").open() for _ in range(4)]
        await asyncio.sleep(1.0)
        # refused on whichever worker they landed: the limit is 3 in all, not per worker
        assert [c.refusal and c.refusal["error"] for c in extra] == ["concurrency_limit_reached"] * 8
        assert [c.refusal and c.refusal["error"] for c in dup] == ["connection_already_exists"] * 4
        await held[0].close()
        await asyncio.sleep(0.5)
        again = await Client(s.ws, "lim-new").open()
        await asyncio.sleep(0.5)
        assert again.refusal is None
        for c in [*held[1:], again]:
            await c.close()
    s.cleanup_log()


def _shm_of(pids: set[int]) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX) and int(n[len(SHM_PREFIX):].split("_")[0]) in pids]


def _children(pid: int) -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.add(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


async def test_sigkill_a_worker_then_the_engine_and_the_rest_carries_on():
    s = Server()
    pids: set[int] = set()
    with s:
        first = s.wait_ready()
        engine = first["engine"]["pid"]
        clients = await open_on_both(s, "k")
        per = s.sessions_by_worker()
        victim = int(next(iter(per)))
        pids |= {int(p) for p in per} | {engine}
        survivors = [c for c in clients if (await asyncio.to_thread(owner_of, s, c.sid))[0] != victim]
        assert survivors

        os.kill(victim, signal.SIGKILL)
        s.wait_ready()  # uvicorn brings a worker back; the engine sees two again
        await asyncio.sleep(1.0)
        assert sum(s.sessions_by_worker().values()) == len(survivors)  # the dead worker's ids are free
        pcm = speech_48k(SPEECH)
        await asyncio.gather(*(c.speak(pcm) for c in survivors))
        await asyncio.sleep(3.0)
        assert all(c.logs("pause_detected") == 2 for c in survivors), [c.messages[-2:] for c in survivors]

        os.kill(engine, signal.SIGKILL)
        h = s.wait_ready(restarts=1)
        assert h["engine"]["pid"] != engine
        pids |= {h["engine"]["pid"]} | _children(s.pid)
        before = [c.logs("pause_detected") for c in survivors]
        await asyncio.gather(*(c.speak(pcm) for c in survivors))  # VAD restarts from zero state
        await asyncio.sleep(3.0)
        assert [c.logs("pause_detected") - b for c, b in zip(survivors, before)] == [2] * len(survivors)
        fresh = await Client(s.ws, "after").open()
        await fresh.speak(pcm)
        await asyncio.sleep(3.0)
        assert fresh.logs("pause_detected") == 2
        for c in [*survivors, fresh]:
            await c.close()
        assert s.metric("batchrtc_engine_restarts_total") == {"": 1.0}
    # the engine exits within a second or two of its owner, unlinking its socket and lock
    files = lambda: list(Path(private_dir()).glob(f"engine-{s.pid}.*"))  # noqa: E731
    deadline = time.monotonic() + 15
    while (_shm_of(pids) or files()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _shm_of(pids) == []
    assert files() == []
    s.cleanup_log()


async def test_churn_across_workers_leaks_nothing(server):
    pcm = speech_48k(SPEECH)[: FRAME * 40]  # 0.8 s: enough to take a VAD slot and run chunks

    async def cycle(i: int) -> None:
        c = await Client(server.ws, f"churn-{i}").open()
        for start in range(0, pcm.size, FRAME * 10):
            payload = base64.b64encode(ulaw_encode(pcm[start:start + FRAME * 10])).decode()
            await c.ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
        await c.close()

    for i in range(0, 500, 10):
        await asyncio.gather(*(cycle(j) for j in range(i, i + 10)))
    await asyncio.sleep(2.0)
    h = server.health()
    assert h["engine"]["sessions"] == 0
    status = httpx.get(f"{server.http}/health", timeout=10).json()["engine"]
    assert status["workers"] == 2
    slots = server.metric("batchrtc_engine_vad_slots_in_use")
    assert slots == {"": 0.0}, slots
    segments = [n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)]
    assert len(segments) <= 8, segments  # each worker's arena reuses its blocks


def _frame(i: int) -> np.ndarray:
    img = np.zeros((240, 320, 3), np.uint8)
    img[:, :160, 0] = 200
    img[..., 1] = 128
    return img


async def test_batched_video_from_two_workers_in_one_engine_batch():
    s = Server(app="tests.engine_apps:video")
    clients = []
    with s:
        s.wait_ready()
        try:
            for i in range(30):
                c, answer = await connect(s.http, f"cam-{i}", video=FrameSource(_frame), recv_video=True)
                assert answer.get("type") == "answer", answer
                clients.append(c)
                per = await asyncio.to_thread(s.sessions_by_worker)
                if len(per) == 2 and all(n > 0 for n in per.values()):
                    break
            else:
                raise AssertionError(f"30 connections never reached both workers: {per}")
            deadline = time.monotonic() + 30
            while any(len(c.frames) < 20 for c in clients):
                assert time.monotonic() < deadline, [len(c.frames) for c in clients]
                await asyncio.sleep(0.1)
            for c in clients:  # processed by the engine: inverted (VP8 is lossy: coarse means)
                arr = c.frames[-1][1]
                left = arr[:, :160].reshape(-1, 3).mean(0)
                assert abs(left[0] - 55) < 25 and abs(left[1] - 127) < 25, left
            mixed = s.metric("batchrtc_engine_mixed_batches_total")
            assert mixed.get('{batcher="video:invert_batch"}', 0) > 0, mixed

            # a trickled candidate for a connection reaches it whichever worker gets the request
            cand = {"candidate": "candidate:1 1 UDP 2130706431 127.0.0.1 40000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
            answered = {}
            for _ in range(60):
                r = await asyncio.to_thread(httpx.post, f"{s.http}/webrtc/offer", timeout=10,
                                            json={"type": "ice-candidate", "webrtc_id": clients[0].webrtc_id, "candidate": cand})
                answered[r.headers["x-worker-pid"]] = r.json()
                if len(answered) == 2:
                    break
            assert len(answered) == 2 and all(v == {"status": "success"} for v in answered.values()), answered
        finally:
            for c in clients:
                await c.close()
    s.cleanup_log()



async def test_a_hung_engine_is_killed_and_replaced():
    s = Server(BATCHRTC_ENGINE_HANG_S="2")
    with s:
        engine = s.wait_ready()["engine"]["pid"]
        c = await Client(s.ws, "hang-1").open()
        await asyncio.sleep(0.5)
        assert sum(s.sessions_by_worker().values()) == 1
        os.kill(engine, signal.SIGSTOP)  # alive but silent: pings go unanswered
        try:
            h = s.wait_ready(timeout=60, restarts=1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
        assert h["engine"]["pid"] != engine
        deadline = time.monotonic() + 10
        while _alive(engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(engine)
        await c.speak(speech_48k(SPEECH))  # the session carries on with the new engine
        await asyncio.sleep(3.0)
        assert c.logs("pause_detected") == 2
        await c.close()
    s.cleanup_log()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_an_item_failing_with_a_timeout_error_is_not_an_engine_hang(tmp_path, monkeypatch):
    """A frame dropped as late fails with DeadlineExceeded, a TimeoutError: the engine answered,
    so it must not be taken for hung and killed (it was, under load, before this test)."""
    from server import engine
    from tests.engine_apps import times_out

    monkeypatch.setenv("BATCHRTC_ENGINE_DIR", str(tmp_path))
    client = await engine.acquire_client(shm_bytes=64 << 20)
    try:
        await client.register_handler(*times_out.engine_spec())
        pid = client.engine_pid
        frame = np.zeros((48, 64, 3), np.uint8)
        for _ in range(3):
            with pytest.raises(TimeoutError, match="own timeout"):
                await times_out.submit(frame, ())
        await client.call("ping", timeout=10)
        assert client.connected and client.engine_pid == pid and client.connects == 1
    finally:
        await engine.release_client()
    deadline = time.monotonic() + 10
    while list(tmp_path.glob("engine-*.sock")) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def test_batch_histogram_reports_what_prometheus_histogram_would():
    """The engine fills its queue-wait histogram a batch at a time; the exposition must be the
    one `prometheus_client.Histogram` gives for the same values, item by item."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from server.engine.main import _TIME_BUCKETS, BatchHistogram

    values = [*np.random.default_rng(0).exponential(0.01, 500), 0.001, 0.0025, 5.0]  # incl. values on a bound
    reference = CollectorRegistry()
    h = Histogram("wait_seconds", "doc", ["batcher"], buckets=_TIME_BUCKETS, registry=reference)
    for v in values:
        h.labels("vad").observe(v)
    ours = CollectorRegistry()
    b = BatchHistogram("wait_seconds", "doc", _TIME_BUCKETS)
    ours.register(b)
    b.observe_many("vad", values[:200])
    b.observe_many("vad", values[200:])

    def samples(r: CollectorRegistry) -> dict[str, float]:
        lines = [ln for ln in generate_latest(r).decode().splitlines() if not ln.startswith("#") and "_created" not in ln]
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines}

    want, got = samples(reference), samples(ours)
    assert want.keys() == got.keys()
    assert all(got[k] == pytest.approx(v) for k, v in want.items()), (want, got)
