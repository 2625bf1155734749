"""Sessions across front ends with BATCHRTC_ENGINE=ray (issue 15): the session directory.

The first tests need no Ray: the directory (`SessionDirectory`) and two front ends'
`SessionsClient`s in this process, calling it directly instead of through an actor: the global
limit, who-holds-what, relays, leases that run out, a new directory.

The rest run a real local Ray cluster on loopback (2 CPUs, started in this process), the real
deployment and directory actor, and two (then three) real front-end servers
(`uvicorn tests.engine_apps:echo`, BATCHRTC_ENGINE=ray) with real WebSocket clients speaking
real speech; they are skipped when Ray is not installed (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from server.engine.ray_directory import SessionDirectory, SessionsClient
from tests.ray_cluster import local_ray_cluster
from tests.waiting import wait_for



def direct(directory: SessionDirectory):
    """A `SessionsClient`'s `invoke` that calls the directory in this process."""

    async def invoke(name: str, *args):
        return await getattr(directory, name)(*args)

    return invoke


async def two_front_ends(lease_s: float = 10.0) -> tuple[SessionDirectory, SessionsClient, SessionsClient]:
    d = SessionDirectory(lease_s=lease_s)
    a = SessionsClient(direct(d), front="A")
    b = SessionsClient(direct(d), front="B")
    await a.start()
    await b.start()
    return d, a, b


# -- no Ray needed -------------------------------------------------------------------------------
async def test_the_limit_and_ids_hold_across_front_ends() -> None:
    d, a, b = await two_front_ends()
    try:
        assert await a.claim("s1", 2) is None
        assert await a.claim("s2", 2) is None
        assert await b.claim("s3", 2) == "concurrency_limit_reached"
        assert await b.claim("s1", 9) == "connection_already_exists"
        await wait_for(lambda: "s1" in b.remote_ids and "s2" in b.remote_ids, timeout=5.0, every=0.01, what="B learns A's ids")
        assert "s1" not in a.remote_ids  # a front end's own ids are not "elsewhere"
        assert all(len(x) == 32 and "s1" not in x for x in b.remote_ids.digests)  # digests, never ids
        a.release("s1")
        await wait_for(lambda: "s1" not in b.remote_ids, timeout=5.0, every=0.01, what="B learns s1 ended")
        assert await b.claim("s3", 2) is None
        assert (await d.stats())["front_ends"] == {"A": 1, "B": 1}
    finally:
        await a.close()
        await b.close()
    assert (await d.stats())["sessions"] == 0  # leaving releases a front end's sessions at once


async def test_a_request_for_a_session_reaches_the_front_end_holding_it() -> None:
    d, a, b = await two_front_ends()
    got: list[tuple[str, object]] = []

    async def set_input(sid: str, args: object) -> str:
        if sid != "held-by-a":
            raise LookupError(sid)
        got.append((sid, args))
        return "ok"

    a.local_ops["set_input"] = set_input
    try:
        assert await a.claim("held-by-a", 8) is None
        assert await b.forward("set_input", "held-by-a", ("blue",)) == "ok"
        assert got == [("held-by-a", ("blue",))]
        b.forward_nowait("set_input", "held-by-a", ("green",))
        await wait_for(lambda: len(got) == 2, timeout=5.0, every=0.01, what="the fire-and-forget relay")
        assert got[1] == ("held-by-a", ("green",))
        with pytest.raises(LookupError):
            await b.forward("set_input", "nobody", ("x",))
        with pytest.raises(LookupError):  # an id this front end holds itself is not relayed
            await a.forward("set_input", "held-by-a", ("x",))
    finally:
        await a.close()
        await b.close()


async def test_a_front_end_that_stops_polling_loses_its_sessions_after_its_lease() -> None:
    d, a, b = await two_front_ends(lease_s=0.6)
    try:
        assert await a.claim("a1", 2) is None
        assert await a.claim("a2", 2) is None
        assert await b.claim("b1", 2) == "concurrency_limit_reached"
        # A freezes (as a SIGKILLed process would): no more polls, no release, no leave.
        assert a._task is not None
        a._task.cancel()
        t0 = time.monotonic()
        while await b.claim("b1", 2) is not None:
            assert time.monotonic() - t0 < 0.6 + 0.5, "A's slots did not come back within its lease"
            await asyncio.sleep(0.05)
        assert time.monotonic() - t0 > 0.3  # not before the lease ran out
        await wait_for(lambda: "a1" not in b.remote_ids, timeout=5.0, every=0.01, what="B learns A's sessions ended")
        assert d.expired == 1
        # A comes back (a long pause, not a death): it rejoins and claims what is still free.
        await a._poll_once(0.0)
        assert a.rejoins == 1
        assert (await d.stats())["front_ends"] == {"A": 2, "B": 1}  # over the limit: already admitted
    finally:
        await a.close()
        await b.close()


async def test_a_new_directory_gets_every_front_ends_sessions_again() -> None:
    d, a, b = await two_front_ends()
    try:
        assert await a.claim("a1", 8) is None
        assert await b.claim("b1", 8) is None
        fresh = SessionDirectory(lease_s=10.0)  # the actor restarted: empty, a new epoch
        a.invoke = b.invoke = direct(fresh)
        await a._poll_once(0.0)
        await b._poll_once(0.0)
        await a._poll_once(0.0)
        assert fresh.sessions == {"a1": "A", "b1": "B"}
        assert "b1" in a.remote_ids and "a1" in b.remote_ids
        assert await b.claim("a1", 8) == "connection_already_exists"
    finally:
        await a.close()
        await b.close()


# -- a real Ray cluster, real front-end servers ----------------------------------------------------
LEASE_S = 3.0
LIMIT = 2


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (2 CPUs, loopback), the VAD deployment on it, stopped at the end of
    the module."""
    with local_ray_cluster() as address:
        from server.config import load_settings
        from server.engine.ray_app import connect

        handle = connect(load_settings())  # deployed once here, not raced by two front ends
        yield address, handle


def front_end(address: str, name: str):
    from benchmarks.server_process import UvicornProcess

    return UvicornProcess(
        ["tests.engine_apps:echo", "--ws-per-message-deflate", "false"],
        {"BATCHRTC_ENGINE": "ray", "RAY_ADDRESS": address, "BATCHRTC_CONCURRENCY": str(LIMIT),
         "BATCHRTC_RAY_LEASE_S": str(LEASE_S)},
        name=f"ray_sessions_{name}", start_timeout_s=120)


@pytest.fixture(scope="module")
def front_ends(ray_cluster):
    address, _ = ray_cluster
    a, b = front_end(address, "a"), front_end(address, "b")
    with a, b:
        yield a, b
    a.cleanup_log()
    b.cleanup_log()


async def directory_stats() -> dict:
    import ray

    from server.config import load_settings
    from server.engine.ray_app import NAMESPACE, directory_name

    actor = ray.get_actor(directory_name(load_settings()), namespace=NAMESPACE)
    return await actor.stats.remote()


async def until_sessions(n: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = await directory_stats()
        if st["sessions"] == n:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"the directory holds {st['sessions']} sessions, not {n}: {st}")
        await asyncio.sleep(0.1)


def ws(server) -> str:
    return f"ws://127.0.0.1:{server.port}/websocket/offer"


def http(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def make_client(server, sid: str, answer_to=None):
    """A WebSocket session on `server` that answers `send_input` (sets its tag) through
    `answer_to`'s `/tag/{id}` route (the other front end, to test the relay)."""
    from tests.test_engine_process import Client

    class RelayingClient(Client):
        async def _answer(self) -> None:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(f"{http(answer_to or server)}/tag/{self.sid}", params={"value": self.tag})
                self.answers.append((r.status_code, r.json().get("pid")))

    c = RelayingClient(ws(server), sid)
    c.answers = []
    return c


async def test_sessions_on_two_front_ends_get_replies_and_meet_in_one_batch(ray_cluster, front_ends) -> None:
    from tests.test_engine_process import SPEECH
    from tests.test_websocket_reply import speech_48k

    _, handle = ray_cluster
    a, b = front_ends
    stats = handle.options(method_name="stats")
    before = await stats.remote()
    ca = await make_client(a, "mix-a").open()
    cb = await make_client(b, "mix-b").open()
    await until_sessions(2)
    pcm = speech_48k(SPEECH)
    await asyncio.gather(ca.speak(pcm), cb.speak(pcm))
    await asyncio.sleep(3.0)
    for c in (ca, cb):
        await c.close()
    for c in (ca, cb):  # both utterances of each session got their reply
        assert c.logs("pause_detected") == 2 and c.media > 0, (c.sid, c.messages[-3:], a.log_tail(), b.log_tail())
    after = await stats.remote()
    assert after["mixed_batches"] > before["mixed_batches"], after
    origins = {o: n - before["items_by_origin"].get(o, 0) for o, n in after["items_by_origin"].items()}
    for server in (a, b):  # each front end's items reached the replica (origin "host:pid:nonce")
        assert any(f":{server.pid}:" in o and n > 0 for o, n in origins.items()), (server.pid, origins)
    await until_sessions(0)


async def test_set_input_sent_to_the_other_front_end_reaches_the_session(ray_cluster, front_ends) -> None:
    from tests.test_engine_process import SPEECH
    from tests.test_websocket_reply import speech_48k

    a, b = front_ends
    c = make_client(a, "relay-1", answer_to=b)  # held by A; its inputs are posted to B
    c.tag = "blue"
    await c.open()
    await until_sessions(1)
    await c.speak(speech_48k(SPEECH))
    await asyncio.sleep(3.0)
    await c.close()
    assert c.logs("pause_detected") == 2, c.messages[-3:]
    assert c.answers and all(code == 200 and pid == b.pid for code, pid in c.answers), c.answers
    assert c.outputs() and all(o == ["blue"] for o in c.outputs()), c.outputs()  # B's value reached A's session
    # an id nobody holds is still a clear 404 on either front end
    for server in (a, b):
        r = await asyncio.to_thread(httpx.post, f"{http(server)}/tag/nobody", params={"value": "x"}, timeout=10)
        assert r.status_code == 404, r.text
    await until_sessions(0)


async def test_the_concurrency_limit_is_global(ray_cluster, front_ends) -> None:
    a, b = front_ends
    held = [await make_client(a, f"lim-{i}").open() for i in range(LIMIT)]
    await until_sessions(LIMIT)
    third = await make_client(b, "lim-b").open()
    dup = await make_client(b, "lim-0").open()
    await asyncio.sleep(1.0)
    assert all(c.refusal is None for c in held)
    assert third.refusal == {"error": "concurrency_limit_reached", "limit": LIMIT}, third.refusal
    assert dup.refusal is not None and dup.refusal["error"] in ("connection_already_exists", "concurrency_limit_reached")
    await held[0].close()
    await until_sessions(LIMIT - 1)
    again = await make_client(b, "lim-b2").open()
    await asyncio.sleep(1.0)
    assert again.refusal is None
    st = await until_sessions(LIMIT)
    assert sorted(st["front_ends"].values()) == [1, 1], st  # one on A, one on B
    for c in (*held[1:], again, third, dup):
        await c.close()
    await until_sessions(0)


async def test_a_killed_front_end_gives_its_slots_back_within_the_lease(ray_cluster, front_ends) -> None:
    address, _ = ray_cluster
    _, b = front_ends
    victim = front_end(address, "victim")
    with victim:
        held = [await make_client(victim, f"dead-{i}").open() for i in range(LIMIT)]
        await until_sessions(LIMIT)
        os.kill(victim.pid, signal.SIGKILL)  # no shutdown, no release, no leave
        t0 = time.monotonic()
        refused = await make_client(b, "after-kill-0").open()
        await asyncio.sleep(0.5)
        assert refused.refusal and refused.refusal["error"] == "concurrency_limit_reached", refused.refusal
        await refused.close()
        admitted = None
        while time.monotonic() - t0 < LEASE_S + 3.0:
            c = await make_client(b, f"after-kill-{time.monotonic():.2f}").open()
            await asyncio.sleep(0.3)
            if c.refusal is None:
                admitted = c
                break
            await c.close()
        elapsed = time.monotonic() - t0
        assert admitted is not None, f"no slot came back within {LEASE_S + 3.0} s"
        # The lease ran out: not before it (less the time the kill took to land), and soon after.
        assert LEASE_S - 1.5 < elapsed < LEASE_S + 3.0, elapsed
        st = await directory_stats()
        assert st["expired"] >= 1 and st["sessions"] == 1, st
        await admitted.close()
        for c in held:
            c.reader.cancel()
    victim.cleanup_log()
    await until_sessions(0)
