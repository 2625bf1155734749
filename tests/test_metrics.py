"""`/metrics` and `/health`: scraped from real servers, parsed as Prometheus text."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import types

import httpx
import numpy as np
import torch
import websockets
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server import ReplyOnPause, Stream, StreamHandler
from server import metrics as m
from server.metrics import gpu as gpu_module
from server.codecs import ulaw_encode
from server.vad_engine import get_vad_engine
from server.video import BatchedHandler, batched
from tests.waiting import wait_for
from tests.webrtc_client import FrameSource, connect
from tests.ws_client import stream_audio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def echo(audio):
    yield audio


def parse(text: str) -> tuple[Samples, set[str]]:
    samples: Samples = {}
    families: set[str] = set()
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples, families


def val(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def has(samples: Samples, metric: str, /, **labels: str) -> bool:
    return (metric, tuple(sorted(labels.items()))) in samples


async def scrape(base: str) -> tuple[Samples, set[str]]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{base}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def scrape_local(stream: Stream) -> tuple[Samples, set[str]]:
    return parse(generate_latest(stream.metrics_registry).decode())


def noise_48k(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(48000 * seconds)) * 3000).clip(-32768, 32767).astype(np.int16)


VAD = "silero_vad"


def vad_counts(s: Samples) -> dict[str, float]:
    return {
        "submitted": val(s, "batchrtc_batcher_items_submitted_total", batcher=VAD),
        "completed": val(s, "batchrtc_batcher_items_completed_total", batcher=VAD),
        "failed": val(s, "batchrtc_batcher_items_failed_total", batcher=VAD),
        "batches": val(s, "batchrtc_batcher_batches_total", batcher=VAD),
        "hist_count": val(s, "batchrtc_batcher_batch_size_count", batcher=VAD),
        "hist_inf": val(s, "batchrtc_batcher_batch_size_bucket", batcher=VAD, le="+Inf"),
        "hist_sum": val(s, "batchrtc_batcher_batch_size_sum", batcher=VAD),
    }


# -- sessions and the VAD batcher, end to end ------------------------------------------------
async def test_vad_batches_and_websocket_session_move_the_metrics(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=7)
    server = serve(stream)
    engine = get_vad_engine()  # the process-wide engine ReplyOnPause sessions share

    s0, _ = await scrape(server.http)
    assert val(s0, "batchrtc_concurrency_limit") == 7
    for kind in ("websocket", "webrtc", "telephone"):
        assert val(s0, "batchrtc_sessions", modality="audio", kind=kind) == 0
    before = vad_counts(s0)
    assert val(s0, "batchrtc_batcher_up", batcher=VAD) == 1
    assert val(s0, "batchrtc_batcher_max_batch_size", batcher=VAD) == engine.batcher.max_batch_size

    # 4 streams x 5 chunks of 100 ms at 48 kHz, pushed concurrently: 20 items, batched.
    vads = [engine.open_stream(48000) for _ in range(4)]
    try:
        async def push(v, seed):
            x = noise_48k(0.5, seed)
            for i in range(5):
                await v.process(x[i * 4800 : (i + 1) * 4800])

        await asyncio.gather(*(push(v, i) for i, v in enumerate(vads)))
    finally:
        for v in vads:
            v.close()

    s1, _ = await scrape(server.http)
    after = vad_counts(s1)
    d = {k: after[k] - before[k] for k in before}
    assert d["submitted"] == 20 and d["completed"] == 20 and d["failed"] == 0, d
    assert d["batches"] >= 1 and d["hist_count"] == d["batches"] == d["hist_inf"], d
    assert d["hist_sum"] == 20, d  # items run, from the exact-size histogram
    # cumulative buckets: monotone, and 1 <= le=1 count <= count
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in s1.items()
        if k[0] == "batchrtc_batcher_batch_size_bucket" and dict(k[1])["batcher"] == VAD
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][0] == float("inf") and buckets[-2][0] == engine.batcher.max_batch_size
    for q in ("0.5", "0.95", "0.99"):
        assert val(s1, "batchrtc_batcher_queue_wait_seconds", batcher=VAD, quantile=q) >= 0
        assert 0 < val(s1, "batchrtc_batcher_run_seconds", batcher=VAD, quantile=q) < 10
    assert val(s1, "batchrtc_batcher_queue_depth", batcher=VAD) == 0
    for reason in ("late", "cancelled", "closed"):
        assert has(s1, "batchrtc_batcher_items_dropped_total", batcher=VAD, reason=reason)
    assert has(s1, "batchrtc_batcher_items_rejected_total", batcher=VAD)

    # A WebSocket session: the gauge shows it while connected, and its audio reaches the VAD.
    seen: dict[str, float] = {}

    async def connected() -> bool:
        s, _ = await scrape(server.http)
        seen["ws"] = val(s, "batchrtc_sessions", modality="audio", kind="websocket")
        return seen["ws"] == 1

    client = asyncio.create_task(
        stream_audio(f"{server.ws}/websocket/offer", "metrics-ws", noise_48k(1.5, 7), 48000, tail_s=0.5)
    )
    try:
        await wait_for(connected, 10)
    finally:
        await client
    await wait_for(lambda: stream.active_sessions == 0, 10)
    s2, _ = await scrape(server.http)
    assert val(s2, "batchrtc_sessions", modality="audio", kind="websocket") == 0
    assert vad_counts(s2)["submitted"] >= after["submitted"] + 2  # 1.5 s in 0.6 s chunks


async def test_two_streams_each_serve_their_own_metrics(serve):
    @batched(max_batch_size=8, max_queue_delay_ms=1, device="cpu")
    def metrics_probe(frames: torch.Tensor, args: list) -> torch.Tensor:
        return 255 - frames

    audio = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=3)
    video = Stream(metrics_probe, modality="video", concurrency_limit=5)
    a_srv, v_srv = serve(audio), serve(video)

    sv, _ = await scrape(v_srv.http)
    assert not has(sv, "batchrtc_batcher_up", batcher="video:metrics_probe")  # not created yet
    try:
        await _check_two_streams(metrics_probe, audio, video, a_srv, v_srv)
    finally:
        metrics_probe.close()


async def _check_two_streams(metrics_probe, audio, video, a_srv, v_srv) -> None:
    out = await metrics_probe.submit(np.zeros((4, 6, 3), np.uint8), ())
    assert out.shape == (4, 6, 3) and out.max() == 255

    (sa, _), (sv, _) = await asyncio.gather(scrape(a_srv.http), scrape(v_srv.http))
    assert val(sa, "batchrtc_concurrency_limit") == 3
    assert val(sv, "batchrtc_concurrency_limit") == 5
    assert has(sa, "batchrtc_sessions", modality="audio", kind="websocket")
    assert has(sv, "batchrtc_sessions", modality="video", kind="webrtc")
    assert not has(sa, "batchrtc_sessions", modality="video", kind="webrtc")
    # the video stream's batcher is on the video stream only
    assert not has(sa, "batchrtc_batcher_up", batcher="video:metrics_probe")
    assert val(sv, "batchrtc_batcher_up", batcher="video:metrics_probe") == 1
    assert val(sv, "batchrtc_batcher_items_completed_total", batcher="video:metrics_probe") == 1
    assert val(sv, "batchrtc_batcher_batch_size_bucket", batcher="video:metrics_probe", le="1.0") == 1
    assert val(sv, "batchrtc_batcher_max_batch_size", batcher="video:metrics_probe") == 8
    # separate registries, each its own
    assert audio.metrics_registry is not video.metrics_registry


# -- video frames (real WebRTC peer), lifetime totals ----------------------------------------
async def test_webrtc_video_frames_live_and_lifetime(serve):
    def invert(frame: np.ndarray) -> np.ndarray:
        return 255 - frame

    stream = Stream(invert, modality="video", concurrency_limit=2)
    server = serve(stream)
    client, answer = await connect(
        server.http, "mv1", video=FrameSource(lambda i: np.full((96, 128, 3), 90, np.uint8), fps=15),
        recv_video=True, keep_frames=0,
    )
    try:
        assert answer["type"] == "answer", answer
        await wait_for(lambda: len(client.frames) >= 5, 20)
        s1, _ = await scrape(server.http)
        assert val(s1, "batchrtc_sessions", modality="video", kind="webrtc") == 1
        live = val(s1, "batchrtc_video_session_frames", outcome="received")
        assert live >= 5 and val(s1, "batchrtc_video_session_frames", outcome="processed") >= 1
        assert val(s1, "batchrtc_video_frames_total", outcome="received") == live
        # a plain handler has no batcher (the process-wide VAD's may be listed, if it exists)
        assert not [k for k in s1 if k[0] == "batchrtc_batcher_up" and dict(k[1])["batcher"] != VAD]
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 15)
    s2, _ = await scrape(server.http)
    assert val(s2, "batchrtc_sessions", modality="video", kind="webrtc") == 0
    assert val(s2, "batchrtc_video_session_frames", outcome="received") == 0
    # the ended session's frames stay in the lifetime counter (folded in when it closed)
    total = val(s2, "batchrtc_video_frames_total", outcome="received")
    assert total >= live, (total, live)
    for k in ("received", "processed", "dropped"):
        assert val(s2, "batchrtc_video_frames_total", outcome=k) >= val(s1, "batchrtc_video_frames_total", outcome=k)


class _FakeVideo:
    def __init__(self, received: int, processed: int, dropped: int) -> None:
        self.received, self.processed, self.dropped = received, processed, dropped


class _FakeSession:
    """Just what the collector reads of a `Session`."""

    def __init__(self, stream: Stream, sid: str, kind: str, video: _FakeVideo | None) -> None:
        self.stream, self.webrtc_id, self.kind = stream, sid, kind
        if video is not None:
            self.video = video
        self.closed = threading.Event()
        self._on_close: list = []
        stream.registry._active[sid] = self  # type: ignore[assignment]

    def on_close(self, fn) -> None:
        self._on_close.append(fn)

    def close(self, hook: bool = False) -> None:
        self.closed.set()
        for fn in self._on_close:
            fn()
        if hook:
            m.session_closed(self)
        del self.stream.registry._active[self.webrtc_id]


def test_lifetime_video_counter_is_monotone_and_counts_each_session_once():
    stream = Stream(lambda f: f, modality="video", concurrency_limit=10)

    def frames(outcome: str, live: bool = False) -> float:
        s, _ = scrape_local(stream)
        return val(s, "batchrtc_video_session_frames" if live else "batchrtc_video_frames_total", outcome=outcome)

    a = _FakeSession(stream, "a", "webrtc", _FakeVideo(10, 8, 2))
    _FakeSession(stream, "ws", "websocket", None)  # no video: counted as a session only
    s, _ = scrape_local(stream)
    assert val(s, "batchrtc_sessions", modality="video", kind="webrtc") == 1
    assert val(s, "batchrtc_sessions", modality="video", kind="websocket") == 1
    assert frames("received") == 10 and frames("received", live=True) == 10
    a.video.received, a.video.processed = 15, 12
    a.close()  # seen by a scrape: folded in by the on_close callback registered then
    assert frames("received") == 15 and frames("processed") == 12 and frames("received", live=True) == 0
    b = _FakeSession(stream, "b", "webrtc", _FakeVideo(4, 4, 0))
    b.close(hook=True)  # never scraped alive: the `session_closed` hook counts it
    m.session_closed(b)  # idempotent
    m.session_closed(a)  # already counted
    assert frames("received") == 19 and frames("processed") == 16 and frames("dropped") == 2
    c = _FakeSession(stream, "c", "webrtc", _FakeVideo(3, 3, 0))
    scrape_local(stream)
    c.video.received = 5
    c.closed.set()  # ending, callbacks already run, still registered: read now, once
    assert frames("received") == 24
    c.video.received = 50  # a straggler after it ended is not counted
    assert frames("received") == 24


# -- handler errors --------------------------------------------------------------------------
def test_record_handler_error_counts_by_kind_and_class():
    from server.utils import Warning as FastRTCWarning

    stream = Stream(lambda f: f, modality="video")
    sess = types.SimpleNamespace(stream=stream, kind="webrtc")
    m.record_handler_error(sess, RuntimeError("x"))
    m.record_handler_error(sess, RuntimeError("y"))
    m.record_handler_error(sess, FastRTCWarning("careful"))
    m.record_handler_error(object(), RuntimeError("no stream"))  # never raises
    s, _ = scrape_local(stream)
    assert val(s, "batchrtc_handler_errors_total", kind="webrtc", **{"class": "error"}) == 2
    assert val(s, "batchrtc_handler_errors_total", kind="webrtc", **{"class": "warning"}) == 1
    assert val(s, "batchrtc_handler_errors_total", kind="websocket", **{"class": "error"}) == 0


class _Boom(StreamHandler):
    def receive(self, frame) -> None:
        raise ValueError("boom")

    def emit(self):
        return None

    def copy(self) -> _Boom:
        return _Boom()


async def test_handler_errors_counted_end_to_end(serve):
    stream = Stream(_Boom(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    payload = base64.b64encode(ulaw_encode(noise_48k(0.02))).decode()
    async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "boom"}))
        await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert msg["type"] == "error" and "boom" in msg["message"], msg
        s, _ = await scrape(server.http)
        # one media frame sent, one raise: counted once (Session.report_handler_error's hook)
        assert val(s, "batchrtc_handler_errors_total", kind="websocket", **{"class": "error"}) == 1


# -- batcher discovery -----------------------------------------------------------------------
def test_batchers_are_reported_explicitly_never_found_by_walking_objects():
    """The stream's own batched handler (once its batcher exists) and whatever the app
    registers: nothing is discovered by walking attributes or closures."""
    @batched(device="cpu")
    def own(frames, args):
        return frames

    @batched(device="cpu")
    def held_in_closure(frames, args):
        return frames

    def handler(frame):
        return held_in_closure, frame

    stream = Stream(own, modality="video")
    assert [n for n, _ in stream.engines.batchers()] == []  # reading never creates a batcher
    own.batcher  # noqa: B018 - create it
    held_in_closure.batcher  # noqa: B018
    try:
        assert [n for n, _ in stream.engines.batchers()] == ["video:own"]
        s, _ = scrape_local(stream)
        assert val(s, "batchrtc_batcher_up", batcher="video:own") == 1
        other = Stream(handler, modality="video")
        assert [n for n, _ in other.engines.batchers()] == []  # inside a closure: not found
        m.register_batcher(other, held_in_closure.batcher)
        assert [n for n, _ in other.engines.batchers()] == ["video:held_in_closure"]
    finally:
        own.close()
        held_in_closure.close()

    # same-named batchers get distinct labels
    from batching import DynamicBatcher

    stream = Stream(lambda f: f, modality="video")
    b1 = DynamicBatcher(lambda xs: xs, name="custom")
    b2 = DynamicBatcher(lambda xs: xs, name="custom")
    m.register_batcher(stream, b1)
    m.register_batcher(stream, b2)
    s, _ = scrape_local(stream)
    assert has(s, "batchrtc_batcher_up", batcher="custom") and has(s, "batchrtc_batcher_up", batcher="custom#2")


# -- the Ray engine's replicas (BATCHRTC_ENGINE=ray), without Ray --------------------------------
async def replica_with_work(n_streams: int, chunks: int):
    """A real `VADReplica` (the core of a Serve replica: its own engine and batcher), fed real
    carried-state calls in this process."""
    from server.engine.ray_vad import RayVAD, VADReplica

    replica = VADReplica(device="cpu", capacity=64)
    vad = RayVAD(replica.process)
    streams = [vad.open_stream(48000) for _ in range(n_streams)]
    x = noise_48k(0.1 * chunks, n_streams)
    for i in range(chunks):
        await asyncio.gather(*(s.process(x[i * 4800:(i + 1) * 4800]) for s in streams))
    await vad.close()
    return replica


def replica_registry(fetch, **kw):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    collector = m.ReplicaCollector(fetch, **kw)
    registry.register(collector)
    return registry, collector


async def test_replica_batchers_are_reported_per_replica_and_fetched_once_per_ttl():
    """Each replica's batcher under `batchrtc_replica_batcher_*{replica=...}` (the same
    families as a local batcher), its calls and items, and the fetch cached for ttl_s."""
    r1 = await replica_with_work(3, 4)  # 12 chunks
    r2 = await replica_with_work(2, 2)  # 4 chunks
    try:
        now = [100.0]
        asked: list[float] = []

        def fetch(timeout_s: float):
            asked.append(timeout_s)
            return [{**r1.stats(), "replica": "r1", "application": "batchrtc", "deployment": "silero_vad", "pid": 11},
                    {**r2.stats(), "replica": "r2", "application": "batchrtc", "deployment": "silero_vad", "pid": 22}]

        registry, _ = replica_registry(fetch, ttl_s=1.0, timeout_s=0.5, clock=lambda: now[0])
        s, families = parse(generate_latest(registry).decode())
        assert asked == [0.5]  # the collector's timeout reaches the fetch
        assert val(s, "batchrtc_replica_stats_up") == 1 and val(s, "batchrtc_replicas_answering") == 2
        assert val(s, "batchrtc_replica_info", replica="r2", application="batchrtc", deployment="silero_vad", pid="22") == 1
        for rid, rep, n in (("r1", r1, 12), ("r2", r2, 4)):
            snap = rep.engine.batcher.stats.snapshot()
            assert val(s, "batchrtc_replica_items_total", replica=rid) == n
            assert val(s, "batchrtc_replica_calls_total", replica=rid) == rep.calls > 0
            assert val(s, "batchrtc_replica_batcher_items_completed_total", replica=rid) == n == snap["completed"]
            assert val(s, "batchrtc_replica_batcher_batch_size_count", replica=rid) == snap["batches"] >= 1
            assert val(s, "batchrtc_replica_batcher_batch_size_sum", replica=rid) == n
            assert val(s, "batchrtc_replica_batcher_batch_size_bucket", replica=rid, le="+Inf") == snap["batches"]
            assert val(s, "batchrtc_replica_batcher_up", replica=rid) == 1
            assert val(s, "batchrtc_replica_batcher_max_batch_size", replica=rid) == rep.engine.batcher.max_batch_size
            assert val(s, "batchrtc_replica_batcher_run_seconds", replica=rid, quantile="0.5") > 0
        assert val(s, "batchrtc_replica_stats_failures_total", reason="timeout") == 0
        # Within ttl_s a scrape shows the cached fetch; after it, a new one.
        now[0] += 0.5
        s, _ = parse(generate_latest(registry).decode())
        assert len(asked) == 1 and val(s, "batchrtc_replica_stats_age_seconds") == 0.5
        now[0] += 0.6
        generate_latest(registry)
        assert len(asked) == 2
    finally:
        r1.engine.close()
        r2.engine.close()


async def test_a_failed_replica_stats_fetch_is_a_metric_not_a_failed_scrape(caplog):
    r1 = await replica_with_work(1, 2)
    try:
        now = [0.0]
        answer: list = []

        def fetch(timeout_s: float):
            if isinstance(answer[0], BaseException):
                raise answer[0]
            return answer[0]

        registry, _ = replica_registry(fetch, ttl_s=1.0, clock=lambda: now[0])

        def scrape_at(t: float, result) -> Samples:
            now[0] = t
            answer[:] = [result]
            return parse(generate_latest(registry).decode())[0]

        with caplog.at_level(logging.WARNING, logger="server.metrics.replicas"):
            s = scrape_at(0.0, TimeoutError("Timed out waiting for broadcast results."))
        assert "could not be fetched" in caplog.text
        assert val(s, "batchrtc_replica_stats_up") == 0 and val(s, "batchrtc_replicas_answering") == 0
        assert val(s, "batchrtc_replica_stats_failures_total", reason="timeout") == 1
        assert not any(k[0].startswith("batchrtc_replica_batcher_") for k in s)  # nothing stale is shown
        s = scrape_at(0.5, [])  # cached: the failure is counted once, not per scrape
        assert val(s, "batchrtc_replica_stats_failures_total", reason="timeout") == 1
        s = scrape_at(2.0, RuntimeError("Deployment(name='silero_vad', app='batchrtc')"))
        assert val(s, "batchrtc_replica_stats_failures_total", reason="error") == 1
        # One replica answers, one's call failed (its actor died): the one is shown, up is 0.
        s = scrape_at(4.0, [{**r1.stats(), "replica": "alive"}, RuntimeError("ActorDiedError")])
        assert val(s, "batchrtc_replica_stats_up") == 0 and val(s, "batchrtc_replicas_answering") == 1
        assert val(s, "batchrtc_replica_stats_failures_total", reason="replica") == 1
        assert val(s, "batchrtc_replica_batcher_items_completed_total", replica="alive") == 2
        s = scrape_at(6.0, [{**r1.stats(), "replica": "alive"}])
        assert val(s, "batchrtc_replica_stats_up") == 1
        # No Ray engine (fetch says None): no replica families at all.
        s = scrape_at(8.0, None)
        assert not any(k[0].startswith("batchrtc_replica") for k in s)
    finally:
        r1.engine.close()
    # A stream served locally reports no replica families (its EngineRegistry has no Ray engine).
    s, families = scrape_local(Stream(ReplyOnPause(echo), modality="audio"))
    assert not any(f.startswith("batchrtc_replica") for f in families)


# -- GPU metrics -----------------------------------------------------------------------------
async def test_gpu_metrics_absent_without_nvml_and_nothing_logged(serve, caplog, monkeypatch):
    nvml = m.Nvml()
    monkeypatch.setattr(gpu_module, "nvml", nvml)
    stream = Stream(lambda f: f, modality="video")
    server = serve(stream)
    with caplog.at_level(logging.DEBUG, logger="server.metrics"):
        s, fams = await scrape(server.http)
        s, fams = await scrape(server.http)
    gpu = {f for f in fams if f.startswith("batchrtc_gpu_")}
    if nvml.module() is None:  # this machine: no NVML library / driver
        assert gpu == set()
    else:  # a GPU machine: one series per device
        assert "batchrtc_gpu_memory_total_bytes" in gpu
    assert not [r for r in caplog.records if r.name == "server.metrics" and r.levelno >= logging.INFO]
    assert val(s, "batchrtc_concurrency_limit") == 1  # the rest is there regardless


def _fake_pynvml(init_calls: list) -> types.SimpleNamespace:
    class NVMLError(Exception):
        pass

    def get_util(h):
        if h == 1:
            raise NVMLError("Not Supported")  # e.g. a MIG instance
        return types.SimpleNamespace(gpu=37, memory=5)

    return types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: init_calls.append(1),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"Fake H200" if h == 0 else "Fake A10",
        nvmlDeviceGetUtilizationRates=get_util,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30, free=0),
        nvmlDeviceGetTemperature=lambda h, sensor: 50 + h,
    )


def test_gpu_metrics_per_device_with_nvml(monkeypatch):
    init_calls: list = []
    monkeypatch.setattr(gpu_module, "nvml", m.Nvml(loader=lambda: _fake_pynvml(init_calls)))
    stream = Stream(lambda f: f, modality="video")
    scrape_local(stream)
    s, _ = scrape_local(stream)
    assert init_calls == [1]  # initialised once
    g0 = {"gpu": "0", "name": "Fake H200"}
    g1 = {"gpu": "1", "name": "Fake A10"}
    assert val(s, "batchrtc_gpu_utilization_percent", **g0) == 37
    assert not has(s, "batchrtc_gpu_utilization_percent", **g1)  # unsupported: left out
    assert val(s, "batchrtc_gpu_memory_used_bytes", **g1) == 2 * 2**30
    assert val(s, "batchrtc_gpu_memory_total_bytes", **g0) == 80 * 2**30
    assert val(s, "batchrtc_gpu_temperature_celsius", **g1) == 51


def test_nvml_init_failure_is_tried_once(monkeypatch):
    calls: list = []

    def loader():
        calls.append(1)
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    nvml = m.Nvml(loader=loader)
    assert nvml.devices() == [] and nvml.devices() == []
    assert calls == [1]


# -- /health ---------------------------------------------------------------------------------
async def test_health_ok_with_fields(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=2)
    server = serve(stream)
    get_vad_engine()
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{server.http}/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["sessions"] == 0
    expected = "cuda:0" if get_vad_engine().device.type == "cuda" else "cpu"
    assert body["device"] == expected
    vad = body["batchers"][VAD]
    assert vad["ok"] is True and vad["queue_depth"] == 0
    # the batching policy, with Triton's names, as the engine runs it
    assert vad["config"] == get_vad_engine().batcher.config.as_dict()
    assert set(vad["config"]) == {"max_batch_size", "max_queue_delay_ms", "max_queue_size", "deadline_ms", "drop_if_late"}


async def test_health_503_when_a_batcher_is_closed(serve):
    @batched(device="cpu")
    def health_probe(frames, args):
        return frames

    stream = Stream(health_probe, modality="video")
    server = serve(stream)
    assert isinstance(stream.handler, BatchedHandler)
    health_probe.batcher  # noqa: B018 - create it
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{server.http}/health")
        assert r.status_code == 200 and r.json()["batchers"]["video:health_probe"]["ok"] is True
        health_probe.close()
        r = await http.get(f"{server.http}/health")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "error" and body["failed"] == ["video:health_probe"]
        assert body["batchers"]["video:health_probe"]["ok"] is False
    s, _ = await scrape(server.http)
    assert val(s, "batchrtc_batcher_up", batcher="video:health_probe") == 0
