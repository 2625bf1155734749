"""A front-end process's line to the engine process (see `server/engine/main.py`).

One `EngineClient` per process, on the server's event loop. It finds the engine on its Unix
socket, or starts one (whoever finds the engine's lock free starts it; a second one started
by a race exits at once), and reconnects when the engine is gone: items in flight then fail at
once with `EngineUnavailable` (never hang), and everything this process told the engine
(handlers, producers, its sessions' ids) is told again to the new one. A VAD stream restarts
from zero state after an engine restart. An engine that stops answering pings, or an item
that outlives its timeout, gets the engine killed and restarted: a hung batch would
otherwise stall every worker.

Payloads go through this process's `ShmArena` (one copy in, results read back from the same
block); only descriptors and small values travel on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from batching.process import _unpack
from batching.shm import Block, ShmArena
from batching.wire import encode, portable, read_message

logger = logging.getLogger(__name__)


class EngineUnavailable(ConnectionError):
    """The engine process is not reachable now (it exited, is restarting, or never started);
    the items that were in flight fail with this."""


class EngineTimeout(TimeoutError):
    """An item got no answer in time: the engine was killed and is being restarted."""


@dataclass(frozen=True)
class EnginePaths:
    socket: str
    lock: str
    owner: int  # the engine exits when this process is gone

    @classmethod
    def for_owner(cls, owner: int, directory: str | None = None) -> EnginePaths:
        base = os.path.join(private_dir(directory), f"engine-{owner}")
        return cls(base + ".sock", base + ".lock", owner)


def private_dir(directory: str | None = None) -> str:
    """A directory only this user can enter (`BATCHRTC_ENGINE_DIR`, else
    `$TMPDIR/batchrtc-UID`): the socket carries session ids, which are bearer secrets, and
    pickles, so nobody else may place or reach a socket there."""
    d = directory or os.path.join(tempfile.gettempdir(), f"batchrtc-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"engine directory {d!r} must be a directory owned by this user with mode 0700 "
                              "(set BATCHRTC_ENGINE_DIR to one that is)")
    return d


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _lock_free(path: str) -> bool:
    """Nobody holds the engine lock now (no engine runs or is starting)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _try_lock(path: str) -> int | None:
    """An fd holding an exclusive lock on `path`, or None if someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _Pending:
    __slots__ = ("future", "block", "kind")

    def __init__(self, future: asyncio.Future[Any], block: Block | None, kind: str) -> None:
        self.future, self.block, self.kind = future, block, kind


class EngineClient:
    def __init__(self, paths: EnginePaths, *, start_timeout_s: float = 120.0, item_timeout_s: float = 30.0,
                 hang_timeout_s: float = 10.0, shm_bytes: int = 1 << 30) -> None:
        self.paths = paths
        self.start_timeout_s = start_timeout_s
        self.item_timeout_s = item_timeout_s
        self.hang_timeout_s = hang_timeout_s
        self.arena = ShmArena(max_bytes=shm_bytes)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine_pid: int | None = None
        self.generation = 0  # the engine's (1 for the first engine of this server)
        self.connects = 0
        self.worker_id = 0
        self.remote_ids: set[str] = set()  # sessions other workers hold
        self.ui_host: str | None = None  # the socket of the worker serving /ui, and its pid
        self.ui_host_pid = 0
        self.ui_sock: str | None = None  # ours, once announced
        self.vad = RemoteVAD(self)
        self._writer: asyncio.StreamWriter | None = None
        self._connected: asyncio.Event | None = None
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._serving: dict[int, asyncio.Task[Any]] = {}
        self._req = itertools.count(1)
        self._handlers: dict[str, tuple[tuple[str, str], dict[str, Any]]] = {}
        self._producers: Counter[str] = Counter()
        self._claims: set[str] = set()  # ids this process holds, told again to a new engine
        self._task: asyncio.Task[Any] | None = None
        self._last_spawn = 0.0
        self._spawn_fd: int | None = None
        self._closed = False
        self.local_ops: dict[str, Callable[[str, Any], Awaitable[Any]]] = {}
        self.local_stream: Callable[[str], AsyncIterator[Any]] | None = None

    # -- life ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (starting the engine if none runs); returns once connected."""
        self.loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._task = self.loop.create_task(self._maintain(), name="batchrtc-engine-client")
        await self._ready()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._fail_pending(EngineUnavailable("the server is shutting down"))
        self.arena.close()

    @property
    def connected(self) -> bool:
        return self._connected is not None and self._connected.is_set()

    async def _ready(self) -> None:
        assert self._connected is not None, "EngineClient.start() was not called"
        if self._connected.is_set():
            return
        if self._closed:
            raise EngineUnavailable("the engine client is closed")
        try:
            await asyncio.wait_for(self._connected.wait(), self.start_timeout_s)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"no engine process answered within {self.start_timeout_s:.0f} s") from None

    async def _maintain(self) -> None:
        while not self._closed:
            try:
                reader, writer, welcome = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("engine: could not connect (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            _, self.engine_pid, self.generation, self.worker_id, others, (self.ui_host, self.ui_host_pid) = welcome
            self.remote_ids = set(others)
            self._writer = writer
            self.connects += 1
            self._replay()
            assert self._connected is not None
            self._connected.set()
            logger.info("engine: connected to pid %s (generation %s)", self.engine_pid, self.generation)
            beat = asyncio.ensure_future(self._heartbeat())
            try:
                await self._read_loop(reader)
            finally:
                self._connected.clear()
                beat.cancel()
                self._writer = None
                writer.close()
                self._fail_pending(EngineUnavailable(
                    f"the engine process (pid {self.engine_pid}) went away; items in flight failed, "
                    "a new engine is starting"))
                for t in self._serving.values():
                    t.cancel()
            if not self._closed:
                logger.warning("engine: lost the engine (pid %s); reconnecting", self.engine_pid)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[Any, ...]]:
        deadline = time.monotonic() + self.start_timeout_s
        try:
            return await self._connect_until(deadline)
        finally:
            if self._spawn_fd is not None:
                os.close(self._spawn_fd)  # releases the spawn lock
                self._spawn_fd = None

    async def _connect_until(self, deadline: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[Any, ...]]:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.paths.socket, limit=1 << 20)
                uid = peer_uid(writer.get_extra_info("socket"))
                if uid is not None and uid != os.getuid():
                    writer.close()
                    raise PermissionError(f"the engine socket {self.paths.socket} belongs to uid {uid}, not us")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise EngineUnavailable(f"no engine on {self.paths.socket}") from None
                if time.monotonic() - self._last_spawn > 5.0 and _lock_free(self.paths.lock):
                    # One front end starts it: whoever holds the spawn lock until it connects
                    # (an engine takes its own lock only after its imports, seconds later).
                    self._spawn_fd = self._spawn_fd if self._spawn_fd is not None else _try_lock(self.paths.lock + ".spawn")
                    if self._spawn_fd is not None:
                        self._spawn()
                await asyncio.sleep(0.05)
        writer.write(encode(("hello", os.getpid(), self.arena.prefix)))
        welcome = await asyncio.wait_for(read_message(reader), self.hang_timeout_s)
        if welcome[0] != "welcome":
            raise EngineUnavailable(f"unexpected first message from the engine: {welcome[0]!r}")
        return reader, writer, welcome

    def _spawn(self) -> None:
        self._last_spawn = time.monotonic()
        cmd = [sys.executable, "-m", "server.engine.main", "--socket", self.paths.socket,
               "--lock", self.paths.lock, "--owner", str(self.paths.owner)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True)
        logger.info("engine: started an engine process (pid %d)", proc.pid)
        threading.Thread(target=proc.wait, name="batchrtc-engine-reaper", daemon=True).start()

    def _replay(self) -> None:
        """Tell a (new) engine what this process had told the one before."""
        for name, (ref, cfg) in self._handlers.items():
            self._send(("video_reg", next(self._req), name, ref, cfg))
        for name, n in self._producers.items():
            if n > 0:
                self._send(("producer", name, n))
        for sid in self._claims:  # already admitted: no limit applies again
            self._send(("claim", next(self._req), sid, 1 << 30))
        if self.ui_sock is not None:
            self._send(("ui_sock", self.ui_sock))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.call("ping", timeout=self.hang_timeout_s)
            except EngineTimeout:
                return  # call() killed it already
            except EngineUnavailable:
                return

    def kill_engine(self, why: str) -> None:
        pid = self.engine_pid
        if pid is None:
            return
        logger.error("engine (pid %s): %s; killing it, a new one will start", pid, why)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

    # -- messages ------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        w = self._writer
        if w is None or w.is_closing():
            raise EngineUnavailable("not connected to the engine process")
        w.write(encode(msg))

    async def call(self, op: str, *args: Any, block: Block | None = None, kind: str = "",
                   timeout: float | None = None) -> Any:
        """Send `(op, req, *args)` and await the engine's answer. A caller that is cancelled
        leaves the request pending: its block is freed when the answer (or the end of the
        connection) comes, never while the engine may still write into it."""
        try:
            await self._ready()
            assert self.loop is not None
            req = next(self._req)
            fut = self.loop.create_future()
            self._send((op, req, *args))
        except BaseException:
            if block is not None:
                self.arena.free(block)
            raise
        self._pending[req] = _Pending(fut, block, kind)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if fut.done():  # the engine's own answer was a TimeoutError (a late frame dropped)
                raise
            self.kill_engine(f"{op!r} got no answer within {timeout} s")
            raise EngineTimeout(f"the engine did not answer {op!r} within {timeout} s; it was killed "
                                "and a new one is starting") from None

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                msg = await read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            op = msg[0]
            if op == "res":
                self._resolve(msg[1], msg[2], msg[3])
            elif op == "item":
                q = self._streams.get(msg[1])
                if q is not None and not q.full():
                    q.put_nowait(("item", msg[2]))
            elif op == "claimed":
                self.remote_ids.add(msg[1])
            elif op == "released":
                self.remote_ids.discard(msg[1])
            elif op == "ui_host":
                self.ui_host, self.ui_host_pid = msg[1], msg[2]
            elif op == "call":
                _, key, what, sid, args = msg
                self._serving[key] = asyncio.ensure_future(self._serve_call(key, what, sid, args))
            elif op == "cancel":
                t = self._serving.pop(msg[1], None)
                if t is not None:
                    t.cancel()

    def _resolve(self, req: int, ok: bool, value: Any) -> None:
        q = self._streams.get(req)
        if q is not None:
            q.put_nowait(("end", (ok, value)))  # the end always fits: items stop at maxsize - 1
            return
        p = self._pending.pop(req, None)
        if p is None:
            return
        try:
            if ok and p.kind == "video":
                where, packed = value
                if where == "shm":
                    assert p.block is not None
                    seg = self.arena._segments[p.block.segment]
                    value = _unpack(packed, seg.buf[p.block.offset:p.block.offset + p.block.size])
                else:
                    value = packed
        except Exception as e:  # noqa: BLE001 - handed to the caller
            ok, value = False, e
        finally:
            if p.block is not None:
                self.arena.free(p.block)
        if p.future.done():
            return
        if ok:
            p.future.set_result(value)
        else:
            p.future.set_exception(value if isinstance(value, BaseException) else RuntimeError(str(value)))

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        blocks = [p.block for p in pending.values() if p.block is not None]
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        for q in self._streams.values():
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(("end", (False, exc)))
        if blocks and self.loop is not None and not self._closed:
            # A batch of the old engine may still be reading them: reuse them a little later.
            self.loop.call_later(2.0, lambda: [self.arena.free(b) for b in blocks])

    # -- what front ends use ---------------------------------------------------------------
    async def submit_video(self, name: str, frame: np.ndarray, args: tuple[Any, ...], source: Any,
                           timeout: float | None) -> Any:
        block = self.arena.write(frame)
        return await self.call("video", name, tuple(block), frame.shape, args, source, block=block,
                               kind="video", timeout=timeout)

    async def register_handler(self, name: str, ref: tuple[str, str], cfg: dict[str, Any]) -> None:
        self._handlers[name] = (ref, cfg)
        await self.call("video_reg", name, ref, cfg, timeout=self.start_timeout_s)

    def producer(self, name: str, delta: int) -> None:
        self._producers[name] += delta
        with contextlib.suppress(EngineUnavailable):
            self._send(("producer", name, delta))  # replayed on reconnect otherwise

    def announce_ui(self, path: str) -> None:
        """This worker serves the app on `path` too: it may be named the UI host."""
        self.ui_sock = path
        with contextlib.suppress(EngineUnavailable):
            self._send(("ui_sock", path))

    def forget_source(self, name: str, source: Any) -> None:
        with contextlib.suppress(EngineUnavailable):
            self._send(("forget", name, source))

    async def claim(self, webrtc_id: str, limit: int) -> str | None:
        """None if the id is now this process's, else FastRTC's refusal code."""
        refusal = await self.call("claim", webrtc_id, limit, timeout=self.hang_timeout_s)
        if refusal is None:
            self._claims.add(webrtc_id)
        return refusal

    def release(self, webrtc_id: str) -> None:
        if webrtc_id in self._claims:
            self._claims.discard(webrtc_id)
            with contextlib.suppress(EngineUnavailable):
                self._send(("release", webrtc_id))

    async def forward(self, op: str, webrtc_id: str, args: Any) -> Any:
        """Run `op` on the worker that holds `webrtc_id`; LookupError if none does."""
        return await self.call("fwd", webrtc_id, op, args, timeout=self.item_timeout_s)

    def forward_nowait(self, op: str, webrtc_id: str, args: Any) -> None:
        """Fire-and-forget `forward` (for synchronous APIs); failures are logged."""
        assert self.loop is not None

        async def run() -> None:
            try:
                await self.forward(op, webrtc_id, args)
            except Exception as e:
                logger.info("forwarded %s failed: %s", op, e)

        if threading.get_ident() == getattr(self.loop, "_thread_id", None):
            self.loop.create_task(run())
        else:
            asyncio.run_coroutine_threadsafe(run(), self.loop)

    async def forward_stream(self, webrtc_id: str, maxsize: int = 256) -> AsyncIterator[Any]:
        """The outputs of a session another worker holds, as they come, until it ends."""
        await self._ready()
        req = next(self._req)
        q: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self._streams[req] = q
        finished = False
        try:
            self._send(("fwd", req, webrtc_id, "outputs", None))
            while True:
                kind, value = await q.get()
                if kind == "item":
                    yield value
                    continue
                finished = True
                ok, err = value
                if not ok:
                    raise err if isinstance(err, BaseException) else RuntimeError(str(err))
                return
        finally:
            self._streams.pop(req, None)
            if not finished:
                with contextlib.suppress(EngineUnavailable):
                    self._send(("fwd_cancel", req))

    async def _serve_call(self, key: int, op: str, sid: str, args: Any) -> None:
        """Another worker asked for `op` on a session this process holds."""
        try:
            if op == "outputs":
                if self.local_stream is None:
                    raise LookupError("unknown connection")
                async for item in self.local_stream(sid):
                    self._send(("fwd_item", key, item))
                self._send(("fwd_res", key, True, None))
            else:
                fn = self.local_ops.get(op)
                if fn is None:
                    raise LookupError(f"unknown forwarded operation {op!r}")
                self._send(("fwd_res", key, True, await fn(sid, args)))
        except asyncio.CancelledError:
            pass
        except EngineUnavailable:
            pass
        except Exception as e:
            with contextlib.suppress(EngineUnavailable):
                self._send(("fwd_res", key, False, portable(e)))
        finally:
            self._serving.pop(key, None)

    async def metrics_text(self) -> str:
        return await self.call("metrics", timeout=self.hang_timeout_s)

    async def status(self) -> dict[str, Any]:
        return await self.call("status", timeout=self.hang_timeout_s)


class RemoteVAD:
    """The engine process's VAD, with `VADEngine`'s `open_stream`."""

    device = "engine"

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._sid = itertools.count(1)

    def open_stream(self, sample_rate: int) -> RemoteVADStream:
        if sample_rate <= 0:
            raise ValueError(f"sample rate must be positive, got {sample_rate}")
        return RemoteVADStream(self.client, next(self._sid), sample_rate)


class RemoteVADStream:
    """`VADStream`'s interface; the stream's state lives in the engine. After an engine
    restart it is opened again there, from zero state (as a new stream would start)."""

    def __init__(self, client: EngineClient, sid: int, sample_rate: int) -> None:
        self.client, self.sid, self.sample_rate = client, sid, sample_rate
        self._generation = -1
        self.closed = False
        self.restarts = 0

    async def process(self, samples: np.ndarray, **_: Any) -> np.ndarray:
        if self.closed:
            raise RuntimeError("VAD stream is closed")
        x = np.asarray(samples)
        x = x.reshape(-1) if x.dtype == np.int16 else np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        c = self.client
        await c._ready()
        if self._generation != c.generation:
            if self._generation != -1:
                self.restarts += 1
            c._send(("vad_open", self.sid, self.sample_rate))
            self._generation = c.generation
        block = c.arena.write(x)
        return await c.call("vad", self.sid, tuple(block), x.size, x.dtype.str, block=block,
                            timeout=c.item_timeout_s)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        c = self.client
        if self._generation == c.generation:
            with contextlib.suppress(EngineUnavailable):
                c._send(("vad_close", self.sid))
