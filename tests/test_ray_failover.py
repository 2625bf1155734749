"""BATCHRTC_ENGINE=ray (issue 15): the engine replica's process is SIGKILLed while live
WebSocket sessions stream speech through a front end.

A real local Ray cluster on loopback (2 CPUs, started in this process), the real deployment
(one replica, real Silero), a real front-end server (`uvicorn tests.engine_apps:echo`,
BATCHRTC_ENGINE=ray) and real WebSocket clients that keep speaking real speech at real-time
pace. Skipped when Ray is not installed (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.ray_cluster import local_ray_cluster
from tests.waiting import wait_for

SESSIONS = 4


@pytest.fixture(scope="module")
def ray_handle():
    """A local Ray cluster and the VAD deployment on it (one replica); stopped after."""
    with local_ray_cluster() as address:
        from server.config import load_settings
        from server.engine.ray_app import connect

        yield address, connect(load_settings())


class Speaker:
    """A WebSocket session that speaks the fixture again and again until stopped."""

    def __init__(self, url: str, sid: str, pcm) -> None:
        from tests.test_engine_process import Client

        self.client = Client(url, sid)
        self.pcm = pcm
        self.task: asyncio.Task | None = None

    async def start(self) -> Speaker:
        await self.client.open()
        self.task = asyncio.create_task(self._speak())
        return self

    async def _speak(self) -> None:
        while True:
            await self.client.speak(self.pcm)

    @property
    def pauses(self) -> int:
        return self.client.logs("pause_detected")

    @property
    def errors(self) -> list:
        return [m for m in self.client.messages if m.get("type") == "error"]

    async def close(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


async def test_sessions_recover_when_the_replica_is_killed_and_nothing_leaks(ray_handle) -> None:
    """SIGKILL the replica's process (its pid asked of the replica through Serve) under
    SESSIONS live sessions: while it is gone, `/metrics` still answers at once and says the
    replicas' statistics are down; once Serve has started a new replica every session gets
    replies again on the same connection; after the clients close, the front end holds no
    session, the directory no slot, and neither the front end nor the new replica any work."""
    from benchmarks.server_process import UvicornProcess

    address, handle = ray_handle
    server = UvicornProcess(["tests.engine_apps:echo", "--ws-per-message-deflate", "false"],
                            {"BATCHRTC_ENGINE": "ray", "RAY_ADDRESS": address}, name="ray_failover",
                            start_timeout_s=120)
    async with httpx.AsyncClient(timeout=10) as http:
        with server:
            await kill_the_replica_under_sessions(server, http, handle.options(method_name="stats"))
    server.cleanup_log()


async def kill_the_replica_under_sessions(server, http: httpx.AsyncClient, stats) -> None:
    from tests.test_engine_process import SPEECH
    from tests.test_metrics import parse, val
    from tests.test_ray_sessions import directory_stats
    from tests.test_websocket_reply import speech_48k

    base = f"http://127.0.0.1:{server.port}"
    slowest = [0.0]

    async def scrape() -> dict:
        t0 = time.monotonic()
        r = await http.get(f"{base}/metrics")
        slowest[0] = max(slowest[0], time.monotonic() - t0)
        assert r.status_code == 200, r.text
        return parse(r.text)[0]

    pcm = speech_48k(SPEECH)
    speakers = [await Speaker(f"ws://127.0.0.1:{server.port}/websocket/offer", f"failover-{i}", pcm).start()
                for i in range(SESSIONS)]
    try:
        await wait_for(lambda: all(s.pauses >= 1 for s in speakers), timeout=30,
                       what="a reply in every session before the kill")
        old = await stats.remote()
        m = await scrape()
        assert val(m, "batchrtc_replica_info", replica=old["replica"], application="batchrtc",
                   deployment="silero_vad", pid=str(old["pid"])) == 1
        os.kill(old["pid"], signal.SIGKILL)  # the replica's process: no shutdown, no goodbye
        killed_at = time.monotonic()

        async def stats_down() -> bool:
            return val(await scrape(), "batchrtc_replica_stats_up") == 0

        await wait_for(stats_down, timeout=20, every=0.2, what="/metrics says the replica stats are down")

        async def new_replica() -> bool:
            m = await scrape()
            return (val(m, "batchrtc_replica_stats_up") == 1
                    and not any(dict(k[1]).get("replica") == old["replica"] for k in m))

        await wait_for(new_replica, timeout=60, every=0.5, what="Serve restarted the replica")
        restarted_s = time.monotonic() - killed_at
        assert slowest[0] < 4.0, slowest[0]  # no scrape waited on the dead replica (2 s fetch timeout)
        new = await stats.remote()
        assert new["replica"] != old["replica"] and new["pid"] != old["pid"], (old, new)
        # Every session, on its same connection, gets replies from the new replica.
        after_restart = [s.pauses for s in speakers]
        await wait_for(lambda: all(s.pauses >= n + 2 for s, n in zip(speakers, after_restart)), timeout=30,
                       what=f"two more replies in every session after the restart ({restarted_s:.1f} s)")
        assert all(not s.client.reader.done() for s in speakers), "the server closed a session"
    finally:
        for s in speakers:
            await s.close()
    for s in speakers:
        assert s.client.media > 0 and s.client.refusal is None, (s.client.sid, s.client.messages[-3:])
        assert not s.errors, (s.client.sid, s.errors[:3], server.log_tail())

    async def released() -> bool:
        m = await scrape()
        health = (await http.get(f"{base}/health")).json()
        directory = await directory_stats()
        return (val(m, "batchrtc_sessions", modality="audio", kind="websocket") == 0
                and val(m, "batchrtc_sessions_closing") == 0 and health["sessions"] == 0
                and health["ray_engine"]["pending"] == 0 and health["ray_engine"]["inflight"] == 0
                and directory["sessions"] == 0
                and val(m, "batchrtc_replica_batcher_producers", replica=new["replica"]) == 0
                and val(m, "batchrtc_replica_batcher_queue_depth", replica=new["replica"]) == 0)

    await wait_for(released, timeout=15, every=0.25,
                   what="sessions, directory slots and engine work released after the clients closed")
