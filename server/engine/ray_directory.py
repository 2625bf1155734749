"""The session directory of a Ray cluster (`BATCHRTC_ENGINE=ray`), without Ray itself.

Front ends on many machines share one directory: which session ids exist, which front end
holds each, and the `concurrency_limit` across all of them; and it relays requests for a
session (`set_input`, a trickled ICE candidate) to the front end that holds it. It is the
engine process's registry (`server/engine/main.py`) with a lease per front end instead of a
socket whose end says "this worker is gone": `server/engine/ray_app.py` runs
`SessionDirectory` as a named, detached Ray actor and gives each front end a `SessionsClient`.

- **Leases.** A front end long-polls the directory (`poll`); each poll renews its lease for
  `lease_s`. A front end that stops polling (SIGKILLed, its machine gone, cut off) has its
  sessions released when the lease runs out, so its slots come back. One that polls again
  after that is told so (`rejoined`) and claims its sessions again.
- **Relays.** A poll also carries what the front end must do: requests other front ends
  relayed for its sessions, answered with `reply`. The front end runs no actor of its own (a
  Ray driver cannot host one): it pulls its work.
- **Who holds what.** `Stream.set_input` is synchronous, so a front end must know without
  asking whether another one holds an id: each poll brings the changes to that set. Front
  ends learn digests of ids (`id_digest`), never the ids: a `webrtc_id` is a bearer secret,
  and only the directory and the front end holding a session need it.
- **A new directory** (the actor restarted, or a fresh cluster) has a new `epoch`; front ends
  see it on their next poll and claim their sessions again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Changes queued for a front end that does not poll: past this many it gets a snapshot.
MAX_QUEUED_CHANGES = 50_000


def id_digest(webrtc_id: str) -> str:
    """What other front ends know of a session id: enough to tell it exists, not to use it."""
    return hashlib.sha256(webrtc_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def front_end_id() -> str:
    """This process's name in the directory (unique: a pid can be reused after a crash)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Front:
    expires: float
    changes: list[tuple[str, str]] = field(default_factory=list)  # ("+" | "-", digest)
    calls: list[tuple[int, str, str, Any]] = field(default_factory=list)  # (key, op, id, args)
    resync: bool = False  # too many changes queued: send a snapshot instead
    wake: asyncio.Event | None = None


class SessionDirectory:
    """Session ids, their owners and the limit, for every front end of a cluster.

    All methods are coroutines (a Ray async actor runs them on one event loop, so each runs
    alone between its awaits: two claims cannot race past the limit)."""

    def __init__(self, lease_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.lease_s = lease_s
        self.epoch = uuid.uuid4().hex
        self._clock = clock
        self.sessions: dict[str, str] = {}  # webrtc_id -> front-end id
        self.fronts: dict[str, _Front] = {}
        self._waiting: dict[int, tuple[str, asyncio.Future[Any]]] = {}  # key -> (asking front, answer)
        self._keys = itertools.count(1)
        self._sweeper: asyncio.Task[Any] | None = None
        self.expired = 0  # front ends whose lease ran out

    # -- leases ------------------------------------------------------------------------------
    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 4)
            self.sweep()

    def sweep(self) -> list[str]:
        """Drop the front ends whose lease ran out, with their sessions; return them."""
        now = self._clock()
        gone = [f for f, st in self.fronts.items() if st.expires < now]
        for f in gone:
            self._drop(f)
            self.expired += 1
        if gone:
            logger.warning("session directory: %d front end(s) stopped renewing their lease; their sessions "
                           "were released", len(gone))
        return gone

    def _drop(self, front: str) -> None:
        st = self.fronts.pop(front, None)
        if st is None:
            return
        for sid in [s for s, o in self.sessions.items() if o == front]:
            del self.sessions[sid]
            self._tell_others(front, "-", sid)
        for key, _, _, _ in st.calls:  # relayed requests it will never answer
            self._answer(key, (False, "gone", "the front end holding that session stopped answering"))
        for key, (asker, fut) in list(self._waiting.items()):
            if asker == front and not fut.done():
                fut.set_result((False, "gone", "the front end that asked is gone"))
        if st.wake is not None:
            st.wake.set()

    def _tell_others(self, front: str, op: str, sid: str) -> None:
        d = id_digest(sid)
        for f, st in self.fronts.items():
            if f == front or st.resync:
                continue
            if len(st.changes) >= MAX_QUEUED_CHANGES:
                st.changes.clear()
                st.resync = True
            else:
                st.changes.append((op, d))
            if st.wake is not None:
                st.wake.set()

    def _snapshot(self, front: str) -> list[str]:
        return [id_digest(s) for s, o in self.sessions.items() if o != front]

    async def poll(self, front: str, epoch: str | None, wait_s: float) -> dict[str, Any]:
        """Renew `front`'s lease and return what it must know or do, waiting up to `wait_s`
        (less than the lease) for something to arrive.

        `rejoined`: the directory did not hold `front` (first poll, an expired lease, or a new
        directory): `snapshot` then lists every session other front ends hold, and the front end
        must `adopt` its own sessions again."""
        self._start_sweeper()
        self.sweep()
        wait_s = max(0.0, min(wait_s, self.lease_s / 2))
        st = self.fronts.get(front)
        rejoined = st is None or epoch != self.epoch
        if st is None:
            st = self.fronts[front] = _Front(expires=0.0)
        # Renewed when the poll starts, not when it returns: a front end killed while its poll
        # waits loses its sessions `lease_s` after it last asked.
        st.expires = self._clock() + self.lease_s
        if not rejoined and not st.changes and not st.calls and not st.resync and wait_s > 0:
            st.wake = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(st.wake.wait(), wait_s)
            st.wake = None
            if self.fronts.get(front) is not st:
                return {"epoch": self.epoch, "rejoined": True, "snapshot": self._snapshot(front), "changes": [],
                        "calls": []}
        out: dict[str, Any] = {"epoch": self.epoch, "rejoined": rejoined, "calls": st.calls}
        if rejoined or st.resync:
            out["snapshot"], out["changes"] = self._snapshot(front), []
        else:
            out["snapshot"], out["changes"] = None, st.changes
        st.calls, st.changes, st.resync = [], [], False
        return out

    # -- the registry --------------------------------------------------------------------------
    async def claim(self, front: str, sid: str, limit: int) -> str | None:
        """None if `sid` is now `front`'s, else FastRTC's refusal code."""
        self.sweep()  # a lease that ran out frees its slots before this claim is counted
        if front not in self.fronts:
            return "directory_lost_this_front_end"  # its lease ran out: it rejoins on its next poll
        owner = self.sessions.get(sid)
        if owner is not None:
            return None if owner == front else "connection_already_exists"
        if len(self.sessions) >= limit:
            return "concurrency_limit_reached"
        self.sessions[sid] = front
        self._tell_others(front, "+", sid)
        return None

    async def adopt(self, front: str, sids: list[str]) -> list[str]:
        """`front` (re)joined holding `sids`, already admitted: take them with no limit. Returns
        the ids another front end holds meanwhile (they stay with it)."""
        if front not in self.fronts:
            return list(sids)
        lost = []
        for sid in sids:
            owner = self.sessions.get(sid)
            if owner is None:
                self.sessions[sid] = front
                self._tell_others(front, "+", sid)
            elif owner != front:
                lost.append(sid)
        return lost

    async def release(self, front: str, sid: str) -> None:
        if self.sessions.get(sid) == front:
            del self.sessions[sid]
            self._tell_others(front, "-", sid)

    async def leave(self, front: str) -> None:
        """`front` shuts down: its sessions are released now, not when its lease runs out."""
        self._drop(front)

    # -- relays --------------------------------------------------------------------------------
    async def forward(self, front: str, sid: str, op: str, args: Any, timeout_s: float) -> tuple[Any, ...]:
        """Run `op` on the front end that holds `sid`: (True, result) or (False, kind, message),
        kind "unknown" (no other front end holds it), "gone", "timeout" or "error"."""
        owner = self.sessions.get(sid)
        st = self.fronts.get(owner) if owner is not None else None
        if st is None or owner == front:
            return (False, "unknown", "unknown connection")
        key = next(self._keys)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[key] = (front, fut)
        st.calls.append((key, op, sid, args))
        if st.wake is not None:
            st.wake.set()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            return (False, "timeout", f"the front end holding that session did not answer within {timeout_s} s")
        finally:
            self._waiting.pop(key, None)

    async def reply(self, front: str, key: int, result: tuple[Any, ...]) -> None:
        self._answer(key, result)

    def _answer(self, key: int, result: tuple[Any, ...]) -> None:
        w = self._waiting.get(key)
        if w is not None and not w[1].done():
            w[1].set_result(result)

    # -- reports (counts only: never an id) ------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        per: dict[str, int] = {f: 0 for f in self.fronts}
        for o in self.sessions.values():
            per[o] = per.get(o, 0) + 1
        return {"sessions": len(self.sessions), "front_ends": per, "expired": self.expired,
                "lease_s": self.lease_s, "epoch": self.epoch}


# -- a front end's side --------------------------------------------------------------------------
Invoke = Callable[..., Awaitable[Any]]  # invoke(method_name, *args): a call on the directory


class DigestSet:
    """`webrtc_id in s` for a set of id digests (what `SessionRegistry.held_elsewhere` asks)."""

    def __init__(self) -> None:
        self.digests: set[str] = set()

    def __contains__(self, webrtc_id: object) -> bool:
        return isinstance(webrtc_id, str) and id_digest(webrtc_id) in self.digests

    def __len__(self) -> int:
        return len(self.digests)


class SessionsClient:
    """A front end's line to the directory, with the interface `SessionRegistry` uses for a
    shared registry (`claim`, `release`, `remote_ids`, `forward`, `forward_nowait`,
    `forward_stream`, `local_ops`, `local_stream`), as `EngineClient` has in engine mode.

    `invoke(name, *args)` calls a directory method (a Ray actor call in production, the
    in-process `SessionDirectory` in tests)."""

    def __init__(self, invoke: Invoke, *, front: str | None = None, lease_s: float = 10.0,
                 timeout_s: float = 10.0) -> None:
        self.invoke = invoke
        self.front = front or front_end_id()
        self.lease_s = lease_s  # ours; the directory's own governs (see `start`)
        self.timeout_s = timeout_s
        self.remote_ids = DigestSet()
        self.local_ops: dict[str, Callable[[str, Any], Awaitable[Any]]] = {}
        self.local_stream: Callable[[str], AsyncIterator[Any]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.epoch: str | None = None
        self.rejoins = 0
        self.polls = 0
        self._claims: set[str] = set()
        self._task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def start(self) -> None:
        """Join (the first poll brings who holds what), then keep polling."""
        self.loop = asyncio.get_running_loop()
        stats = await asyncio.wait_for(self.invoke("stats"), self.timeout_s)
        self.lease_s = float(stats["lease_s"])
        await self._poll_once(0.0)
        self._task = self.loop.create_task(self._poll_forever(), name="batchrtc-session-directory")

    async def close(self) -> None:
        """Stop polling and release this front end's sessions now (bounded wait)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.invoke("leave", self.front), self.timeout_s)
        self._claims.clear()

    # -- polling -------------------------------------------------------------------------------
    async def _poll_forever(self) -> None:
        while not self._closed:
            try:
                await self._poll_once(self.lease_s / 3)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the directory is restarting, the cluster is unreachable...
                logger.warning("session directory: poll failed (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(min(1.0, self.lease_s / 4))

    async def _poll_once(self, wait_s: float) -> None:
        res = await asyncio.wait_for(self.invoke("poll", self.front, self.epoch, wait_s), wait_s + self.timeout_s)
        self.polls += 1
        if res["rejoined"] and self.epoch is not None:
            self.rejoins += 1
            logger.warning("session directory: rejoined (a new directory, or our lease ran out); claiming our "
                           "%d sessions again", len(self._claims))
        self.epoch = res["epoch"]
        if res["snapshot"] is not None:
            self.remote_ids.digests = set(res["snapshot"])
        for op, d in res["changes"]:
            (self.remote_ids.digests.add if op == "+" else self.remote_ids.digests.discard)(d)
        if res["rejoined"] and self._claims:
            lost = await self.invoke("adopt", self.front, list(self._claims))
            if lost:
                logger.error("session directory: %d of our sessions were taken by another front end while our "
                             "lease had run out", len(lost))
        for key, op, sid, args in res["calls"]:
            self._spawn(self._serve_call(key, op, sid, args))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        assert self.loop is not None
        t = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _serve_call(self, key: int, op: str, sid: str, args: Any) -> None:
        """Another front end asked for `op` on a session this one holds."""
        try:
            fn = self.local_ops.get(op)
            if fn is None:
                result: tuple[Any, ...] = (False, "error", f"unknown forwarded operation {op!r}")
            else:
                result = (True, await fn(sid, args))
        except LookupError:
            result = (False, "unknown", "unknown connection")
        except Exception as e:
            result = (False, "error", f"{type(e).__name__}: {e}")
        with contextlib.suppress(Exception):
            await self.invoke("reply", self.front, key, result)

    # -- what the registry uses ----------------------------------------------------------------
    async def claim(self, webrtc_id: str, limit: int) -> str | None:
        """None if the id is now this front end's, else FastRTC's refusal code."""
        refusal = await asyncio.wait_for(self.invoke("claim", self.front, webrtc_id, limit), self.timeout_s)
        if refusal == "directory_lost_this_front_end":
            await self._poll_once(0.0)  # rejoin now, then ask again
            refusal = await asyncio.wait_for(self.invoke("claim", self.front, webrtc_id, limit), self.timeout_s)
        if refusal is None:
            self._claims.add(webrtc_id)
        return refusal

    def release(self, webrtc_id: str) -> None:
        if webrtc_id in self._claims:
            self._claims.discard(webrtc_id)
            if not self._closed and self.loop is not None:
                self._call_soon(self._release(webrtc_id))

    async def _release(self, webrtc_id: str) -> None:
        try:
            await asyncio.wait_for(self.invoke("release", self.front, webrtc_id), self.timeout_s)
        except Exception as e:  # the lease runs out in the end, and frees it then
            logger.warning("session directory: a release failed (%s); the slot comes back when the lease "
                           "of a front end that stops polling runs out", type(e).__name__)

    def _call_soon(self, coro: Awaitable[Any]) -> None:
        assert self.loop is not None
        if threading.get_ident() == getattr(self.loop, "_thread_id", None):
            self._spawn(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    async def forward(self, op: str, webrtc_id: str, args: Any) -> Any:
        """Run `op` on the front end that holds `webrtc_id`; LookupError if none does."""
        res = await asyncio.wait_for(
            self.invoke("forward", self.front, webrtc_id, op, args, self.timeout_s), self.timeout_s + 5)
        if res[0]:
            return res[1]
        kind, message = res[1], res[2]
        if kind in ("unknown", "gone"):
            raise LookupError(message)
        if kind == "timeout":
            raise TimeoutError(message)
        raise RuntimeError(message)

    def forward_nowait(self, op: str, webrtc_id: str, args: Any) -> None:
        """Fire-and-forget `forward` (for synchronous APIs such as `set_input`); failures are
        logged. Two calls from one front end reach the owner in order only if the first has
        arrived: a relayed `set_input` is a latest value, so that is enough."""

        async def run() -> None:
            try:
                await self.forward(op, webrtc_id, args)
            except Exception as e:
                logger.info("forwarded %s failed: %s", op, e)

        self._call_soon(run())

    async def forward_stream(self, webrtc_id: str, maxsize: int = 256) -> AsyncIterator[Any]:
        """Not relayed over Ray yet: the outputs of a session another front end holds."""
        raise LookupError("the outputs of a session held by another front end are not relayed with "
                          "BATCHRTC_ENGINE=ray yet: read them from the front end that holds it")
        yield  # pragma: no cover - makes this an async generator

    def stats(self) -> dict[str, Any]:
        return {"front_end": self.front.rsplit(":", 1)[0], "held": len(self._claims),
                "held_elsewhere": len(self.remote_ids), "polls": self.polls, "rejoins": self.rejoins,
                "lease_s": self.lease_s}
