"""The engines a stream uses, held explicitly: created and warmed in its lifespan, off the
event loop; `/metrics` and `/health` read them from here (never by walking objects).

An engine is a `DynamicBatcher` and what runs it: the shared Silero VAD engine (process-wide,
one state table for every ReplyOnPause connection), a batched video handler (and its worker
process), or any batcher the app registers itself (`register_batcher`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections import Counter
from typing import Any

import torch

from batching import DynamicBatcher, ProcessRunner
from models.device import default_device

from .config import Settings
from .engine import EngineClient, acquire_client, release_client, use_engine_process
from .video import BatchedHandler


class EngineRegistry:
    def __init__(self, handler: Any = None, *, uses_vad: bool = False, mode: str = "inprocess",
                 settings: Settings | None = None) -> None:
        self._lock = threading.Lock()
        self.batched: BatchedHandler | None = handler if isinstance(handler, BatchedHandler) else None
        self.uses_vad = uses_vad
        self.mode = mode  # Settings.engine: auto, process, inprocess or ray
        self.settings = settings if settings is not None else Settings()
        self.client: EngineClient | None = None  # set while served with an engine process
        self.ray: Any = None  # server.engine.ray_app.RayEngine, while served with BATCHRTC_ENGINE=ray
        # With BATCHRTC_ENGINE=ray: this front end's line to the cluster's session directory
        # (server.engine.ray_directory.SessionsClient), the registry's shared registry.
        self.ray_sessions: Any = None
        self._vad_before: Any = None
        self._extra: list[weakref.ref[DynamicBatcher]] = []

    def register_batcher(self, batcher: DynamicBatcher) -> None:
        """Also report `batcher` (one the app runs itself) on `/metrics` and `/health`. Held
        weakly: it disappears from the reports when the app drops it."""
        with self._lock:
            self._extra.append(weakref.ref(batcher))

    # -- lifespan ----------------------------------------------------------------------------
    async def start(self, *, shm_bytes: int = 1 << 30, hang_timeout_s: float = 10.0) -> None:
        """Create and warm what the stream uses, off the event loop: the VAD engine's model
        and state table, the batched handler's worker process (it loads its model there).
        In engine mode: connect to the engine process (starting it if none runs) and have it
        load the batched handler and the VAD there instead. With BATCHRTC_ENGINE=ray: join the
        Ray cluster and send the VAD's chunks to its Serve replicas (batched video handlers
        still run here)."""
        if self.mode == "ray":
            await self._start_ray()
            if self.batched is not None:
                self.batched.start()
            return
        if use_engine_process(self.mode):
            client = await acquire_client(shm_bytes=shm_bytes, hang_timeout_s=hang_timeout_s)
            self.client = client
            try:
                if self.batched is not None:
                    await client.register_handler(*self.batched.engine_spec())
                if self.uses_vad:
                    await client.call("warm_vad", timeout=client.start_timeout_s)
            except BaseException:
                self.client = None
                await release_client()
                raise
            return
        if self.batched is not None:
            self.batched.start()
        if self.uses_vad:
            from .vad_engine import get_vad_engine

            await asyncio.to_thread(get_vad_engine)

    async def _start_ray(self) -> None:
        from .engine.ray_vad import require_ray

        require_ray()  # a clear message, not an ImportError from deep inside
        from .engine.ray_app import RayEngine, connect_sessions

        # Sessions are shared across front ends whatever the handler: ids, the limit, relays.
        self.ray_sessions = await connect_sessions(self.settings)
        if not self.uses_vad:
            return
        from . import vad_engine

        try:
            self.ray = await RayEngine.connect(self.settings, origin=self.ray_sessions.front)
        except BaseException:
            sessions, self.ray_sessions = self.ray_sessions, None
            await sessions.close()
            raise
        # ReplyOnPause opens its streams with `get_vad_engine().open_stream(rate)`.
        self._vad_before = vad_engine.current_vad_engine()
        vad_engine.set_vad_engine(self.ray.vad)

    async def stop(self) -> None:
        """Stop what this stream alone owns (the shared VAD engine outlives any one stream).
        The batched handler is dropped, not just closed: served again, it starts afresh."""
        if self.ray is not None:
            from . import vad_engine

            ray_engine, self.ray = self.ray, None
            if vad_engine.current_vad_engine() is ray_engine.vad:
                vad_engine.set_vad_engine(self._vad_before)
            await ray_engine.close()
        if self.ray_sessions is not None:
            sessions, self.ray_sessions = self.ray_sessions, None
            await sessions.close()  # releases this front end's sessions now, not at lease expiry
        if self.client is not None:
            self.client = None
            await release_client()
            return
        if self.batched is not None:
            await asyncio.to_thread(functools.partial(self.batched.close, restartable=True))

    # -- what the reports read ---------------------------------------------------------------
    def batchers(self) -> list[tuple[str, DynamicBatcher]]:
        """(unique label, batcher) for every batcher this stream uses that exists now. Never
        creates one (a scrape must not load a model)."""
        found: list[DynamicBatcher] = []
        if self.uses_vad:
            from . import vad_engine

            engine = vad_engine.current_vad_engine()
            if engine is not None and self.ray is None:  # with Ray, the batcher is in the replicas
                found.append(engine.batcher)
        if self.batched is not None and self.batched.existing_batcher is not None:
            found.append(self.batched.existing_batcher)
        with self._lock:
            alive = [r() for r in self._extra]
            self._extra = [r for r, b in zip(self._extra, alive) if b is not None]
        found.extend(b for b in alive if b is not None)
        out: list[tuple[str, DynamicBatcher]] = []
        seen: set[int] = set()
        names: Counter[str] = Counter()
        for b in found:
            if id(b) in seen:
                continue
            seen.add(id(b))
            names[b.name] += 1
            out.append((b.name if names[b.name] == 1 else f"{b.name}#{names[b.name]}", b))
        return out

    def replica_stats(self, timeout_s: float) -> list[Any] | None:
        """With BATCHRTC_ENGINE=ray: every engine replica's `stats()` (or the exception its call
        raised), waiting at most `timeout_s` (blocking: call it off the event loop). None in the
        other modes, or before the Ray engine is connected."""
        engine = self.ray
        return None if engine is None else engine.replica_stats(timeout_s)

    def runner(self) -> tuple[str, ProcessRunner] | None:
        """The batched handler's worker process, once it exists."""
        if self.batched is None or self.batched.runner is None:
            return None
        return f"video:{self.batched.__name__}", self.batched.runner

    def shared_registry(self) -> Any:
        """What shares this stream's session registry with other front ends: the engine
        process's client, the Ray session directory's, or None (this process alone)."""
        return self.client if self.client is not None else self.ray_sessions

    def device(self) -> str:
        """Where the models run: the VAD engine's or the batched handler's device."""
        if self.client is not None:
            return f"engine process (pid {self.client.engine_pid})"
        if self.ray is not None:
            return "ray serve replicas"
        dev: Any = None
        if self.uses_vad:
            from . import vad_engine

            engine = vad_engine.current_vad_engine()
            dev = engine.device if engine is not None else None
        if dev is None and self.batched is not None:
            dev = self.batched.device
        return device_label(torch.device(dev) if dev is not None else default_device())


def device_label(dev: torch.device) -> str:
    if dev.type == "cpu":
        return "cpu"
    return f"{dev.type}:{dev.index if dev.index is not None else 0}"
