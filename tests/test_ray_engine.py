"""BATCHRTC_ENGINE=ray (issue 15): the VAD engine as a Ray Serve deployment.

The first tests need no Ray: the setting itself, the clear failure without Ray, and the
carried-state path (the replica core fed in-process) against the local engine on real speech.
The rest run a real local Ray cluster (started in this process with `ray.init`, stopped at the
end of the module), the real deployment, real Silero, and a real server process with real
WebSocket clients; they are skipped when Ray is not installed (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest

from server import ReplyOnPause, Stream
from server.config import load_settings
from server.engine import EngineTimeout, EngineUnavailable
from server.engine.ray_vad import RayVAD, StreamState, VADReplica, pack_call, unpack_call
from server.vad_engine import VADEngine
from tests.audio_fixtures import load_wav
from tests.ray_cluster import local_ray_cluster
from tests.waiting import wait_for
from tests.test_websocket_reply import speech_48k

HOP = 4608  # 96 ms at 48 kHz: ReplyOnPause's hop


def chunks(x: np.ndarray, n: int) -> list[np.ndarray]:
    return [x[i:i + n] for i in range(0, x.size, n)]


def speech_16k() -> np.ndarray:
    return load_wav("two_voices_noise_16k.wav")[1]


async def run_local(rate: int, pieces: list[np.ndarray]) -> list[np.ndarray]:
    eng = VADEngine(device="cpu", capacity=8)
    s = eng.open_stream(rate)
    try:
        return [await s.process(p) for p in pieces]
    finally:
        s.close()
        eng.close()


# -- no Ray needed -------------------------------------------------------------------------------
def test_engine_setting_accepts_local_and_ray(monkeypatch) -> None:
    for raw, want in (("local", "auto"), ("", "auto"), ("ray", "ray"), ("RAY", "ray"), ("process", "process")):
        monkeypatch.setenv("BATCHRTC_ENGINE", raw)
        assert load_settings().engine == want
    monkeypatch.setenv("BATCHRTC_ENGINE", "cluster")
    with pytest.raises(ValueError, match="local, auto, process, inprocess or ray"):
        load_settings()


async def test_engine_ray_without_ray_fails_at_start_with_a_clear_message(monkeypatch) -> None:
    monkeypatch.setenv("BATCHRTC_ENGINE", "ray")
    # None in sys.modules makes `import ray` raise ImportError, as on a machine without Ray.
    monkeypatch.setitem(sys.modules, "ray", None)
    stream = Stream(ReplyOnPause(lambda audio: None), modality="audio", mode="send-receive", verbose=False)
    with pytest.raises(RuntimeError, match=r'BATCHRTC_ENGINE=ray needs Ray Serve.*pip install -e "\.\[ray\]"'):
        async with stream.router.lifespan_context(stream):
            pass


def test_a_call_round_trips_through_its_wire_format() -> None:
    rng = np.random.default_rng(0)
    st = StreamState(rng.standard_normal(320).astype(np.float32), np.ones(100, np.float32),
                     np.full(60, 2, np.float32), np.full(2, 3, np.float32))
    items = [
        # (rate, samples, state): int16 and float32 samples, a fresh and a carried state
        (48000, rng.integers(-999, 999, HOP).astype(np.int16), st),
        (16000, rng.standard_normal(512).astype(np.float32), StreamState()),
    ]
    from server.engine.ray_vad import Item

    back = unpack_call(pack_call([Item(r, x, s, 0.04) for r, x, s in items]))
    for (rate, x, s), it in zip(items, back):
        assert it.rate == rate and it.samples.dtype == x.dtype
        np.testing.assert_array_equal(it.samples, x)
        for name in ("hcx", "pending", "hist", "carry"):
            np.testing.assert_array_equal(getattr(it.state, name), getattr(s, name))
        assert abs(it.budget_s - 0.04) < 1e-5
    assert st.nbytes == 4 * (320 + 100 + 60 + 2)


async def test_carried_state_matches_the_local_engine_on_real_speech() -> None:
    """The replica core, fed in-process: every chunk's probabilities equal the local engine's,
    at 48 kHz in 96 ms hops, at 16 kHz, and in odd-sized chunks (a resampler carry)."""
    x16 = speech_16k()
    x48 = speech_48k("two_voices_noise_16k.wav", tail_s=0)
    replica = VADReplica(device="cpu", capacity=64)
    vad = RayVAD(replica.process)
    try:
        for rate, x, n in ((48000, x48, HOP), (16000, x16, 1000), (48000, x48, 961)):
            pieces = chunks(x, n)
            want = await run_local(rate, pieces)
            s = vad.open_stream(rate)
            got = [await s.process(p) for p in pieces]
            assert [g.size for g in got] == [w.size for w in want]
            np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-6)
            assert np.concatenate(want).max() > 0.9  # real speech was heard
            assert s.state.nbytes < 4 * (320 + 512 + 60 + 3)
    finally:
        await vad.close()
        replica.engine.close()


async def test_a_front_end_bundles_its_streams_chunks_into_few_calls() -> None:
    replica = VADReplica(device="cpu", capacity=256)
    vad = RayVAD(replica.process)
    x48 = speech_48k("two_voices_noise_16k.wav", tail_s=0)
    streams = [vad.open_stream(48000) for _ in range(64)]
    try:
        for p in chunks(x48, HOP)[:5]:
            outs = await asyncio.gather(*(s.process(p) for s in streams))
            assert all(o.size == 3 for o in outs)  # 4608 samples at 48 kHz: 1536 at 16 kHz, 3 windows
    finally:
        await vad.close()
        replica.engine.close()
    st = vad.bundler.stats()
    assert st["items"] == 64 * 5
    # A round's 64 chunks are submitted in one turn of the event loop: one call each round.
    assert st["calls"] == 5, st
    assert replica.engine.batcher.stats.snapshot()["batch_size_hist"], "the replica batched nothing"


# -- a real Ray cluster ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on this machine (2 CPUs), stopped at the end of the module."""
    with local_ray_cluster() as address:
        yield address


@pytest.fixture(scope="module")
def ray_handle(ray_cluster):
    """The deployment, deployed the way a front end finds it missing and deploys it."""
    from server.engine.ray_app import connect

    return connect(load_settings())


async def test_ray_engine_matches_the_local_engine_on_real_speech(ray_handle) -> None:
    from server.engine.ray_app import RayEngine

    eng = RayEngine(ray_handle, timeout_s=30)
    x48 = speech_48k("two_voices_noise_16k.wav", tail_s=0)
    pieces = chunks(x48, HOP)
    want = np.concatenate(await run_local(48000, pieces))
    try:
        streams = [eng.vad.open_stream(48000) for _ in range(8)]
        got: list[list[np.ndarray]] = [[] for _ in streams]
        for p in pieces:  # eight streams of the same speech, chunk by chunk, together
            for out, res in zip(got, await asyncio.gather(*(s.process(p) for s in streams))):
                out.append(res)
        for out in got:
            np.testing.assert_allclose(np.concatenate(out), want, atol=1e-5)
        st = eng.vad.bundler.stats()
        assert st["items"] == 8 * len(pieces) and st["calls"] < st["items"] / 2, st
        assert st["failed_calls"] == 0
    finally:
        await eng.close()


async def test_killing_the_replica_fails_chunks_in_flight_and_streams_go_on(ray_handle) -> None:
    """A replica killed while a call is in flight: that call's chunks fail with
    EngineUnavailable (or EngineTimeout), nothing hangs, and once Serve has a new replica every
    stream goes on from its last good state: its outputs equal a local stream's fed the chunks
    that went through."""
    import ray

    from server.engine.ray_app import RayEngine

    eng = RayEngine(ray_handle, timeout_s=15)
    name = await ray_handle.options(method_name="replica_actor").remote()
    assert name.startswith("SERVE_REPLICA::"), name
    x48 = speech_48k("two_voices_noise_16k.wav", tail_s=0)
    pieces = chunks(x48, HOP)
    n = 6
    streams = [eng.vad.open_stream(48000) for _ in range(n)]
    passed: list[list[int]] = [[] for _ in range(n)]
    outs: list[list[np.ndarray]] = [[] for _ in range(n)]
    failures: list[BaseException] = []

    async def feed(k: int) -> None:
        for i, p in enumerate(pieces):
            t0 = time.monotonic()
            try:
                out = await streams[k].process(p)
            except (EngineUnavailable, EngineTimeout) as e:
                failures.append(e)
                assert time.monotonic() - t0 < 15 + 5  # bounded by the call timeout
                await asyncio.sleep(0.2)
                continue
            passed[k].append(i)
            outs[k].append(out)
            await asyncio.sleep(0.01)

    async def kill_mid_call() -> list[object]:
        """A burst of 256 chunks in one call; the replica is killed while it is in flight."""
        while min(len(p) for p in passed) < 3:
            await asyncio.sleep(0.01)
        burst = [eng.vad.open_stream(48000) for _ in range(256)]
        calls = eng.vad.bundler.calls
        t0 = time.monotonic()
        task = asyncio.ensure_future(asyncio.gather(*(s.process(pieces[10]) for s in burst), return_exceptions=True))
        while eng.vad.bundler.calls == calls or eng.vad.bundler.stats()["inflight"] == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.03)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        results = await task
        assert time.monotonic() - t0 < 15 + 5
        return results

    try:
        *_, burst = await asyncio.wait_for(asyncio.gather(*(feed(k) for k in range(n)), kill_mid_call()), 180)
    finally:
        await eng.close()
    assert all(isinstance(r, (EngineUnavailable, EngineTimeout)) for r in burst), {type(r).__name__ for r in burst}
    assert any(isinstance(r, EngineUnavailable) and "ActorDiedError" in str(r) for r in burst), burst[0]
    new = await ray_handle.options(method_name="replica_actor").remote()
    assert new != name  # Serve replaced it
    for k in range(n):
        assert passed[k] and passed[k][-1] == len(pieces) - 1, (k, passed[k])  # the stream went on
        want = await run_local(48000, [pieces[i] for i in passed[k]])
        np.testing.assert_allclose(np.concatenate(outs[k]), np.concatenate(want), atol=1e-5)


@pytest.fixture(scope="module")
def front_end(ray_cluster, ray_handle):
    """A real server process with BATCHRTC_ENGINE=ray, joining the cluster by RAY_ADDRESS."""
    from benchmarks.server_process import UvicornProcess

    server = UvicornProcess(["tests.engine_apps:echo"], {"BATCHRTC_ENGINE": "ray", "RAY_ADDRESS": ray_cluster},
                            name="ray_engine_test", start_timeout_s=120)
    with server:
        yield server
    server.cleanup_log()


async def test_reply_on_pause_sessions_get_replies_from_a_server_on_the_ray_engine(front_end) -> None:
    """A real server process with BATCHRTC_ENGINE=ray (joining the cluster by RAY_ADDRESS) and
    real WebSocket clients speaking real speech: each utterance gets its reply."""
    from tests.test_engine_process import SPEECH, Client

    url = f"ws://127.0.0.1:{front_end.port}/websocket/offer"
    pcm = speech_48k(SPEECH)
    clients = [await Client(url, f"ray-{i}").open() for i in range(3)]
    await asyncio.gather(*(c.speak(pcm) for c in clients))
    await asyncio.sleep(3.0)
    for c in clients:
        await c.close()
    log = front_end.log_tail()
    for c in clients:
        assert c.logs("pause_detected") == 2 and c.media > 0, (c.sid, c.messages[-3:], log)
    assert "not judged" not in log, log


async def test_the_front_ends_metrics_show_the_replicas_batcher(front_end, ray_handle) -> None:
    """`/metrics` of a Ray-engine front end: the replica's batcher and calls, labelled by its
    Serve replica id, read from the live replica at scrape time."""
    import httpx

    from tests.test_engine_process import SPEECH, Client
    from tests.test_metrics import parse, val

    stats = ray_handle.options(method_name="stats")
    c = await Client(f"ws://127.0.0.1:{front_end.port}/websocket/offer", "ray-metrics").open()
    await c.speak(speech_48k(SPEECH))
    await wait_for(lambda: c.logs("pause_detected") == 2, timeout=15, what="both replies")
    await c.close()
    before = await stats.remote()
    mine = sum(n for o, n in before["items_by_origin"].items() if f":{front_end.pid}:" in o)
    assert mine > 0, before["items_by_origin"]  # this front end's chunks reached the replica
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"http://127.0.0.1:{front_end.port}/metrics")
    assert r.status_code == 200, r.text
    s, _ = parse(r.text)
    after = await stats.remote()
    rid = before["replica"]
    assert after["replica"] == rid and rid
    assert val(s, "batchrtc_replica_stats_up") == 1 and val(s, "batchrtc_replicas_answering") == 1
    assert val(s, "batchrtc_replica_info", replica=rid, application="batchrtc", deployment="silero_vad",
               pid=str(before["pid"])) == 1
    # Read from the replica between `before` and `after`: its counters at that moment.
    for metric, key in (("batchrtc_replica_items_total", "items"), ("batchrtc_replica_calls_total", "calls"),
                        ("batchrtc_replica_batcher_items_completed_total", "completed"),
                        ("batchrtc_replica_batcher_batch_size_count", "batches")):
        assert before[key] <= val(s, metric, replica=rid) <= after[key], (metric, before[key], after[key])
    assert val(s, "batchrtc_replica_batcher_max_batch_size", replica=rid) == before["max_batch_size"] == 512
    assert val(s, "batchrtc_replica_stats_failures_total", reason="timeout") == 0
    assert not any(k[0] == "batchrtc_batcher_up" and dict(k[1]).get("batcher") == "silero_vad" for k in s)
