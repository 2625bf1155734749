"""The engine process: one per server, holding every batcher; front-end processes feed it.

`uvicorn server.app:stream --workers N` runs N front-end processes (uvicorn's own flag). With
more than one, each worker connects to one engine process (started by whichever worker comes
first) that holds the Silero VAD engine and every batched video handler, so a batch mixes
items from all workers, and the shared session registry (ids, the concurrency limit, which
worker holds a session). One process (no `--workers`) keeps everything in-process as before.
`BATCHRTC_ENGINE=process|inprocess` forces either.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

from .client import EngineClient, EnginePaths, EngineTimeout, EngineUnavailable, RemoteVADStream

__all__ = [
    "EngineClient", "EnginePaths", "EngineTimeout", "EngineUnavailable", "RemoteVADStream",
    "engine_client", "in_uvicorn_worker", "use_engine_process", "acquire_client", "release_client",
]

_client: EngineClient | None = None
_users = 0


def in_uvicorn_worker() -> bool:
    """This process is one of `uvicorn --workers N`'s (a spawned child of its supervisor)."""
    return mp.parent_process() is not None and "uvicorn" in sys.modules


def use_engine_process(mode: str) -> bool:
    if mode == "process":
        return True
    if mode == "inprocess":
        return False
    return in_uvicorn_worker()


def owner_pid() -> int:
    """Whose life bounds the engine's: the uvicorn supervisor (it outlives its workers, and a
    SIGKILLed worker is replaced), else this process."""
    parent = mp.parent_process()
    return parent.pid if in_uvicorn_worker() and parent is not None and parent.pid else os.getpid()


def engine_client() -> EngineClient | None:
    """This process's engine client while a stream served in engine mode is running."""
    return _client


async def acquire_client(*, shm_bytes: int, item_timeout_s: float = 30.0, hang_timeout_s: float = 10.0) -> EngineClient:
    """Connect this process to the engine (starting it if none runs); counted per stream."""
    global _client, _users
    if _client is None:
        paths = EnginePaths.for_owner(owner_pid(), os.environ.get("BATCHRTC_ENGINE_DIR") or None)
        client = EngineClient(paths, shm_bytes=shm_bytes, item_timeout_s=item_timeout_s, hang_timeout_s=hang_timeout_s)
        _client = client
        try:
            await client.start()
        except BaseException:
            _client = None
            await client.close()
            raise
    _users += 1
    return _client


async def release_client() -> None:
    global _client, _users
    _users = max(0, _users - 1)
    if _users == 0 and _client is not None:
        client, _client = _client, None
        await client.close()
