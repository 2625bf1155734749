"""The session registry: ids, the concurrency limit, lookup, and closing everything.

A session is registered when it opens and removed the moment it starts closing, in the same
synchronous step that moves it out of ACTIVE (no await in between), so however the client,
the handler, a time limit and the server interleave their closes, it leaves exactly once.
Its teardown (handler `shutdown`, peer connection, VAD slots) then runs in a task the
registry keeps until it ends, so `close_all` can wait for it at shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session


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


class SessionRegistry(Mapping[str, "Session"]):
    """Active sessions by id (a read-only mapping), plus the ones still tearing down."""

    def __init__(self, limit: int, capacity_check: Callable[[], str | None] | None = None) -> None:
        self.limit = limit
        self._active: dict[str, Session] = {}
        self._closing: set[asyncio.Task] = set()
        self._capacity_check = capacity_check

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

    def remove(self, session: Session, teardown: asyncio.Task | None = None) -> None:
        """Called once by the session as it leaves ACTIVE."""
        if self._active.get(session.webrtc_id) is session:
            del self._active[session.webrtc_id]
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
