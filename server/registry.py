"""The session registry: open, look up by id, count against the limit, close, close all.

This is what front ends, the UI and the docs see of a stream. `open()` admits a connection
(FastRTC's refusals), makes its handler copy and its `Session`, and registers it with no
await in between, so two connections cannot race past the limit. A session is removed the
moment it starts closing, in the same synchronous step that moves it out of ACTIVE, so
however the client, the handler, a time limit and the server interleave their closes, it
leaves exactly once. Its teardown (handler `shutdown`, peer connection, VAD slots) then runs
in a task the registry keeps until it ends, so `close_all` can wait for it at shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException

from .utils import create_message

if TYPE_CHECKING:
    from .engine import EngineClient
    from .engine.ray_directory import SessionsClient
    from .handlers import DataChannel
    from .session import Session

logger = logging.getLogger(__name__)


def log_id(webrtc_id: str) -> str:
    """What logs and task names show instead of a `webrtc_id` (a bearer secret: whoever
    knows it may set inputs and read outputs of that session)."""
    return hashlib.sha256(webrtc_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]


class Refused(Exception):
    """A new session was refused; `meta` is FastRTC's `{"error": CODE, ...}`."""

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__(meta.get("error", "refused"))
        self.meta = meta

    def body(self) -> dict[str, Any]:
        return {"status": "failed", "meta": self.meta}


class UnknownConnection(HTTPException, LookupError):
    """No active session has this id: a clear 404 when raised inside a route (e.g. a route
    that calls `set_input` or `output_stream`)."""

    def __init__(self, webrtc_id: str) -> None:
        super().__init__(404, detail="unknown connection")
        self.webrtc_id = webrtc_id


class HandlerView(Mapping[str, Any]):
    """FastRTC's `Stream.handlers`: each active connection's handler (its own `copy()`, or the
    shared per-frame callable) by `webrtc_id`, read-only and live. Only this worker's
    sessions: with an engine process, a session another worker holds is not in it."""

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry

    def __getitem__(self, webrtc_id: str) -> Any:
        session = self._registry.get(webrtc_id)
        if session is None:
            raise KeyError(webrtc_id)
        return session.handler

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._registry))

    def __len__(self) -> int:
        return len(self._registry)


class SessionRegistry(Mapping[str, "Session"]):
    """Active sessions by id (a read-only mapping), plus the ones still tearing down.

    `factory(webrtc_id, channel, kind, registry)` makes a session (the stream supplies it);
    `capacity_check()` names a reason to refuse new sessions (stuck handler threads)."""

    def __init__(
        self,
        limit: int,
        factory: Callable[[str, DataChannel, str, SessionRegistry], Session] | None = None,
        capacity_check: Callable[[], str | None] | None = None,
        time_limit: float | None = None,
        verbose: bool = False,
    ) -> None:
        self.limit = limit
        self._factory = factory
        self._active: dict[str, Session] = {}
        self._closing: set[asyncio.Task] = set()
        self._capacity_check = capacity_check
        self.time_limit = time_limit
        self.verbose = verbose
        # With an engine process (or BATCHRTC_ENGINE=ray: the cluster's session directory): the
        # registry shared by every worker (ids, the limit, which worker holds a session), and
        # the operations other workers may ask of ours.
        self.shared: EngineClient | SessionsClient | None = None
        self.remote_ops: dict[str, Callable[[str, Any], Awaitable[Any]]] = {"set_input": self._remote_set_input}

    def attach_engine(self, client: EngineClient | SessionsClient | None) -> None:
        """Share ids, the limit and lookups with the other workers through `client` (None: alone)."""
        self.shared = client
        if client is not None:
            client.local_ops.update(self.remote_ops)
            client.local_stream = self.output_stream

    async def _remote_set_input(self, webrtc_id: str, args: Any) -> None:
        self.session(webrtc_id).set_input(list(args))

    def held_elsewhere(self, webrtc_id: str) -> bool:
        """Another worker holds a session `webrtc_id` (as far as this one has heard)."""
        return self.shared is not None and webrtc_id not in self._active and webrtc_id in self.shared.remote_ids

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, webrtc_id: str) -> Session:
        return self._active[webrtc_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._active)

    def __len__(self) -> int:
        return len(self._active)

    @property
    def closing(self) -> int:
        return len(self._closing)

    # -- lifecycle -------------------------------------------------------------------------
    def admit(self, webrtc_id: str) -> None:
        """Raise `Refused` if a session `webrtc_id` cannot open now (no side effects)."""
        if webrtc_id in self._active:
            raise Refused({"error": "connection_already_exists"})
        if len(self._active) >= self.limit:
            raise Refused({"error": "concurrency_limit_reached", "limit": self.limit})
        problem = self._capacity_check() if self._capacity_check is not None else None
        if problem:
            raise Refused({"error": "server_overloaded", "detail": problem})

    def add(self, session: Session) -> None:
        """Register an admitted session (call right after `admit`, with no await between)."""
        self.admit(session.webrtc_id)
        self._active[session.webrtc_id] = session

    async def open_shared(self, webrtc_id: str, channel: DataChannel, *, kind: str) -> Session:
        """`open`, with the id and the limit checked across every worker first (engine mode)."""
        shared = self.shared
        if shared is None:
            return self.open(webrtc_id, channel, kind=kind)
        self.admit(webrtc_id)
        refusal = await shared.claim(webrtc_id, self.limit)
        if refusal == "connection_already_exists":
            raise Refused({"error": refusal})
        if refusal is not None:
            raise Refused({"error": refusal, "limit": self.limit})
        try:
            return self.open(webrtc_id, channel, kind=kind)
        except BaseException:
            shared.release(webrtc_id)
            raise

    def open(self, webrtc_id: str, channel: DataChannel, *, kind: str) -> Session:
        """Admit and register a connection, or raise `Refused` with FastRTC's refusal (any
        other exception: the handler's `copy()` failed). No await inside."""
        if self._factory is None:
            raise RuntimeError("this registry has no session factory")
        self.admit(webrtc_id)
        session = self._factory(webrtc_id, channel, kind, self)
        self.add(session)
        if self.time_limit is not None:
            session.spawn(self._enforce_time_limit(session, self.time_limit), "time_limit")
        if self.verbose:
            logger.info("session %s (%s) opened; %d active", session.log_id, kind, len(self._active))
        return session

    @staticmethod
    async def _enforce_time_limit(session: Session, limit: float) -> None:
        await asyncio.sleep(limit)
        session.send(create_message("end_stream", "time limit reached"))
        session.close("time limit reached")

    def session(self, webrtc_id: str) -> Session:
        """The active session `webrtc_id`, or `UnknownConnection`."""
        s = self._active.get(webrtc_id)
        if s is None or not s.active:
            raise UnknownConnection(webrtc_id)
        return s

    def set_input(self, webrtc_id: str, *args: Any) -> None:
        """A session's latest additional-input values (see `Stream.set_input`). A session held
        by another worker gets them through the engine (in order, not awaited)."""
        if self.held_elsewhere(webrtc_id):
            assert self.shared is not None
            self.shared.forward_nowait("set_input", webrtc_id, args)
            return
        self.session(webrtc_id).set_input(list(args))

    def output_stream(self, webrtc_id: str) -> AsyncIterator[Any]:
        """A session's `AdditionalOutputs` as they come, until it ends (see `Stream`), from
        whichever worker holds it."""
        if self.held_elsewhere(webrtc_id):
            assert self.shared is not None
            return self.shared.forward_stream(webrtc_id)
        return self.session(webrtc_id).output_stream()

    def remove(self, session: Session, teardown: asyncio.Task | None = None) -> None:
        """Called once by the session as it leaves ACTIVE."""
        if self._active.get(session.webrtc_id) is session:
            del self._active[session.webrtc_id]
            if self.shared is not None:
                self.shared.release(session.webrtc_id)
        if teardown is not None and not teardown.done():
            self._closing.add(teardown)
            teardown.add_done_callback(self._closing.discard)

    async def close_all(self, reason: str, timeout: float = 15.0) -> None:
        """Close every session and wait (bounded) for every teardown, earlier ones included."""
        for s in list(self._active.values()):
            s.close(reason)
        pending = [t for t in self._closing if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
