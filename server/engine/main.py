"""The engine process: every batcher of one server, fed by all its front-end processes.

    python -m server.engine.main --socket PATH --lock PATH --owner PID

Front-end processes (uvicorn workers) connect over a Unix socket (`batching.wire` messages)
and send payloads through shared memory (`batching.shm`). Here live the Silero VAD engine with
its state table and every batched video handler, so one batch mixes items from every worker.
The engine also holds the cross-worker session registry (ids, the concurrency limit, which
worker owns a session) and relays requests for a session to the worker that holds it.

Exactly one engine runs per server: it holds an exclusive `flock` on the lock file for its
whole life, and a second one exits at once. It exits when its owner (the uvicorn supervisor,
or the single server process) is gone. A worker that disconnects (exited or SIGKILLed) has its
sessions released, its VAD slots freed, its producers and sources dropped and its shared
memory unlinked; the other workers carry on.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from batching.process import _pack, _packed_size, _write_packed
from batching.shm import ShmViews, pid_alive, sweep_dead, unlink_prefix
from batching.wire import encode, portable, read_message

logger = logging.getLogger("batchrtc.engine")

_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class BatchHistogram:
    """A Prometheus histogram by batcher, filled a batch at a time: one numpy bucket count per
    batch on the batch thread, instead of one `Histogram.observe` per item (measured 2.6 ms of
    the batch thread, holding the GIL, per 500-item VAD batch). A collector for a registry."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc = name, doc
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self._lock = threading.Lock()
        self._data: dict[str, tuple[np.ndarray, float]] = {}

    def observe_many(self, label: str, values: list[float]) -> None:
        v = np.asarray(values, dtype=np.float64)
        # bucket i holds values <= bounds[i] (Prometheus' `le`); the last one the rest (+Inf)
        counts = np.bincount(np.searchsorted(self.bounds, v), minlength=self.bounds.size + 1)
        with self._lock:
            old, total = self._data.get(label, (0, 0.0))
            self._data[label] = (old + counts, total + float(v.sum()))

    def collect(self) -> Any:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.doc, labels=["batcher"])
        with self._lock:
            data = list(self._data.items())
        for label, (counts, total) in data:
            cum = np.cumsum(counts)
            buckets = [(floatToGoString(b), float(c)) for b, c in zip(self.bounds, cum)]
            family.add_metric([label], [*buckets, ("+Inf", float(cum[-1]))], sum_value=total)
        yield family


class _Worker:
    """One connected front-end process."""

    def __init__(self, wid: int, writer: asyncio.StreamWriter) -> None:
        self.id = wid
        self.writer = writer
        self.pid = 0
        self.prefix = ""
        self.vad: dict[int, asyncio.Future[Any]] = {}
        self.producers: Counter[str] = Counter()
        self.sources: set[tuple[str, Any]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.calls: dict[int, tuple[_Worker, int]] = {}  # relayed call key -> (origin, its req)
        self.ui_sock: str | None = None  # where this worker serves the app for /ui

    @property
    def label(self) -> str:
        return str(self.pid)

    def send(self, msg: Any) -> None:
        if not self.writer.is_closing():
            try:
                self.writer.write(encode(msg))
            except ValueError as e:  # a result too large for one message
                logger.warning("engine: reply to worker %s dropped: %s", self.pid, e)


class Engine:
    def __init__(self, generation: int) -> None:
        from prometheus_client import CollectorRegistry, Histogram
        from prometheus_client import Counter as Counter_

        self.generation = generation
        self.started = time.time()
        self.workers: dict[int, _Worker] = {}
        self.sessions: dict[str, int] = {}  # webrtc_id -> worker id
        self.views = ShmViews()
        self.handlers: dict[str, Any] = {}
        self._handler_futs: dict[str, asyncio.Future[Any]] = {}
        self._vad: Any = None
        self._vad_lock = asyncio.Lock()
        self._next_wid = 0
        self._next_key = 0
        self.ui_host: _Worker | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.h_items = Histogram("batchrtc_engine_batch_items", "Items per batch, by the front-end process (pid) that sent them",
                                 ["batcher", "worker"], buckets=_ITEM_BUCKETS, registry=self.registry)
        self.h_wait = BatchHistogram("batchrtc_engine_queue_wait_seconds", "Time an item waited in the engine's batcher queue",
                                     _TIME_BUCKETS)
        self.registry.register(self.h_wait)
        self.c_mixed = Counter_("batchrtc_engine_mixed_batches", "Batches holding items from more than one front-end process",
                                ["batcher"], registry=self.registry)
        self.h_run = Histogram("batchrtc_engine_batch_run_seconds", "Time a batch ran in the engine",
                               ["batcher"], buckets=_TIME_BUCKETS, registry=self.registry)

    # -- batchers ------------------------------------------------------------------------
    def _watch(self, batcher: Any) -> None:
        name = batcher.name

        def on_batch(sources: list[Any], waits: list[float], run_s: float) -> None:
            per = Counter(s[0] for s in sources if isinstance(s, tuple))  # (worker id, ...) sources
            if len(per) > 1:
                self.c_mixed.labels(name).inc()
            for wid, n in per.items():
                w = self.workers.get(wid)
                self.h_items.labels(name, w.label if w is not None else "gone").observe(n)
            self.h_wait.observe_many(name, waits)
            self.h_run.labels(name).observe(run_s)

        batcher.on_batch = on_batch

    async def vad(self) -> Any:
        async with self._vad_lock:
            if self._vad is None:
                from server.vad_engine import get_vad_engine

                self._vad = await asyncio.to_thread(get_vad_engine)
                self._watch(self._vad.batcher)
            return self._vad

    def register(self, name: str, ref: tuple[str, str], cfg: dict[str, Any]) -> asyncio.Future[Any]:
        """The engine's copy of a batched handler (created once, whoever registers first).
        Messages for it that arrive before it exists wait on this future."""
        fut = self._handler_futs.get(name)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._handler_futs[name] = asyncio.ensure_future(self._load(name, ref, cfg))
        return fut

    async def _load(self, name: str, ref: tuple[str, str], cfg: dict[str, Any]) -> Any:
        from server.video import BatchedHandler, _resolve

        fn = await asyncio.to_thread(_resolve, ref)  # imports the app's module
        h = BatchedHandler(fn, process=False, **cfg)
        self._watch(h.batcher)
        self.handlers[name] = h
        return h

    async def handler(self, name: str) -> Any:
        fut = self._handler_futs.get(name)
        if fut is None:
            raise RuntimeError(f"batched handler {name!r} is not registered with the engine")
        return await fut

    # -- connections ---------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from .client import peer_uid

        uid = peer_uid(writer.get_extra_info("socket"))
        if uid is not None and uid != os.getuid():  # the directory is private; this is a second lock
            writer.close()
            return
        self._next_wid += 1
        w = _Worker(self._next_wid, writer)
        self.workers[w.id] = w
        try:
            while True:
                try:
                    msg = await read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self._dispatch(w, msg)
        except Exception:
            logger.exception("engine: worker %s sent something unreadable; dropping it", w.pid)
        finally:
            await self._drop_worker(w)
            writer.close()

    def _spawn(self, w: _Worker, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        w.tasks.add(t)
        t.add_done_callback(w.tasks.discard)

    def _dispatch(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        op = msg[0]
        if op == "vad":
            self._spawn(w, self._vad_chunk(w, *msg[1:]))
        elif op == "video":
            self._spawn(w, self._video(w, *msg[1:]))
        elif op == "vad_open":
            _, sid, rate = msg
            w.vad[sid] = asyncio.ensure_future(self._vad_open(rate))
        elif op == "vad_close":
            fut = w.vad.pop(msg[1], None)
            if fut is not None:
                fut.add_done_callback(_close_stream)
        elif op == "producer":
            _, name, delta = msg
            self._spawn(w, self._producer(w, name, delta))
        elif op == "forget":
            _, name, src = msg
            h = self.handlers.get(name)
            if h is not None:
                h.batcher.forget_source((w.id, src))
            w.sources.discard((name, src))
        elif op == "hello":
            _, w.pid, w.prefix = msg
            others = [s for s, o in self.sessions.items() if o != w.id]
            host = (self.ui_host.ui_sock, self.ui_host.pid) if self.ui_host is not None else (None, 0)
            w.send(("welcome", os.getpid(), self.generation, w.id, others, host))
        elif op == "ui_sock":
            w.ui_sock = msg[1]
            if self.ui_host is None:
                self._set_ui_host(w)
        elif op == "video_reg":
            _, req, name, ref, cfg = msg
            self._spawn(w, self._reply(w, req, self._register(name, ref, cfg)))
        elif op == "warm_vad":
            self._spawn(w, self._reply(w, msg[1], self._warm_vad()))
        elif op == "claim":
            _, req, sid, limit = msg
            refusal = self._claim(w, sid, limit)
            w.send(("res", req, True, refusal))
            if refusal is None:
                self._broadcast(w, ("claimed", sid))
        elif op == "release":
            if self.sessions.get(msg[1]) == w.id:
                del self.sessions[msg[1]]
                self._broadcast(w, ("released", msg[1]))
        elif op == "fwd":
            self._forward(w, *msg[1:])
        elif op in ("fwd_res", "fwd_item"):
            self._relay_back(w, msg)
        elif op == "fwd_cancel":
            self._cancel_forward(w, msg[1])
        elif op == "metrics":
            w.send(("res", msg[1], True, self.metrics_text()))
        elif op == "status":
            w.send(("res", msg[1], True, self.status()))
        elif op == "ping":
            w.send(("res", msg[1], True, None))
        else:
            raise ValueError(f"unknown engine message {op!r}")

    async def _reply(self, w: _Worker, req: int, coro: Any) -> None:
        try:
            w.send(("res", req, True, await coro))
        except Exception as e:
            w.send(("res", req, False, portable(e)))

    async def _register(self, name: str, ref: tuple[str, str], cfg: dict[str, Any]) -> None:
        await self.register(name, ref, cfg)

    async def _producer(self, w: _Worker, name: str, delta: int) -> None:
        b = (await self.handler(name)).batcher
        if w.id not in self.workers:
            return  # dropped meanwhile
        for _ in range(abs(delta)):
            b.add_producer() if delta > 0 else b.remove_producer()
        w.producers[name] += delta

    async def _warm_vad(self) -> None:
        await self.vad()

    # -- work ----------------------------------------------------------------------------
    async def _vad_open(self, rate: int) -> Any:
        return (await self.vad()).open_stream(rate)

    async def _vad_chunk(self, w: _Worker, req: int, sid: int, block: tuple[str, int, int],
                         n: int, dtype: str) -> None:
        try:
            fut = w.vad.get(sid)
            if fut is None:
                raise RuntimeError("VAD stream is not open")
            stream = await fut
            samples = self.views.view(block, (n,), dtype)
            probs = await stream.process(samples, source=(w.id, sid))
            w.send(("res", req, True, probs))
        except Exception as e:
            w.send(("res", req, False, portable(e)))

    async def _video(self, w: _Worker, req: int, name: str, block: tuple[str, int, int],
                     shape: tuple[int, ...], args: tuple[Any, ...], src: Any) -> None:
        try:
            h = await self.handler(name)
            frame = self.views.view(block, shape, np.uint8)
            w.sources.add((name, src))
            out = await h.submit(frame, args, source=(w.id, src))
            del frame
            packed, arrays = _pack(out)
            if arrays and _packed_size(arrays) <= block[2]:
                # The frame has been read: its block carries the result back (no pickling).
                buf = self.views.buffer(block)
                _write_packed(buf, arrays)
                del buf
                w.send(("res", req, True, ("shm", packed)))
            else:
                w.send(("res", req, True, ("inline", out)))
        except Exception as e:
            w.send(("res", req, False, portable(e)))

    # -- the shared session registry -----------------------------------------------------
    def _claim(self, w: _Worker, sid: str, limit: int) -> str | None:
        """None if `sid` is now `w`'s, else FastRTC's refusal code."""
        owner = self.sessions.get(sid)
        if owner is not None:
            return None if owner == w.id else "connection_already_exists"
        if len(self.sessions) >= limit:
            return "concurrency_limit_reached"
        self.sessions[sid] = w.id
        return None

    def _set_ui_host(self, w: _Worker | None) -> None:
        """Name the worker that serves /ui for everyone (see server/engine/ui_host.py)."""
        self.ui_host = w
        msg = ("ui_host", w.ui_sock, w.pid) if w is not None else ("ui_host", None, 0)
        for other in self.workers.values():
            other.send(msg)
        logger.info("engine: /ui is served by worker %s", w.pid if w is not None else "none")

    def _broadcast(self, sender: _Worker, msg: Any) -> None:
        """Tell the other workers which ids exist elsewhere (`Stream.set_input` is synchronous:
        a worker must know without asking whether another one holds an id)."""
        for other in self.workers.values():
            if other is not sender:
                other.send(msg)

    def _forward(self, w: _Worker, req: int, sid: str, op: str, args: Any) -> None:
        owner = self.workers.get(self.sessions.get(sid, -1))
        if owner is None or owner is w:
            w.send(("res", req, False, LookupError("unknown connection")))
            return
        self._next_key += 1
        owner.calls[self._next_key] = (w, req)
        owner.send(("call", self._next_key, op, sid, args))

    def _relay_back(self, owner: _Worker, msg: tuple[Any, ...]) -> None:
        op, key = msg[0], msg[1]
        origin = owner.calls.get(key)
        if origin is None:
            return
        w, req = origin
        if op == "fwd_item":
            w.send(("item", req, msg[2]))
        else:
            del owner.calls[key]
            w.send(("res", req, msg[2], msg[3]))

    def _cancel_forward(self, w: _Worker, req: int) -> None:
        for owner in self.workers.values():
            for key, (origin, r) in list(owner.calls.items()):
                if origin is w and r == req:
                    del owner.calls[key]
                    owner.send(("cancel", key))

    async def _drop_worker(self, w: _Worker) -> None:
        self.workers.pop(w.id, None)
        if self.ui_host is w:
            self._set_ui_host(next((o for o in self.workers.values() if o.ui_sock), None))
        for t in list(w.tasks):
            t.cancel()
        for sid in [s for s, o in self.sessions.items() if o == w.id]:
            del self.sessions[sid]
            self._broadcast(w, ("released", sid))
        for fut in w.vad.values():
            fut.add_done_callback(_close_stream)
        w.vad.clear()
        for name, n in w.producers.items():
            h = self.handlers.get(name)
            for _ in range(max(0, n) if h is not None else 0):
                h.batcher.remove_producer()
        for name, src in w.sources:
            h = self.handlers.get(name)
            if h is not None:
                h.batcher.forget_source((w.id, src))
        for owner in self.workers.values():  # calls it was waiting for: tell their owners
            for key, (origin, _) in list(owner.calls.items()):
                if origin is w:
                    del owner.calls[key]
                    owner.send(("cancel", key))
        for key, (origin, req) in w.calls.items():  # calls it owned: fail them
            origin.send(("res", req, False, ConnectionError("the worker holding that session exited")))
        if w.prefix:
            # Give in-flight batches a moment to finish reading its blocks, then unmap and,
            # if the worker is gone for good, unlink what it left in /dev/shm.
            await asyncio.sleep(0.5)
            self.views.forget(w.prefix)
            if w.pid and not pid_alive(w.pid):
                unlink_prefix(w.prefix)
        logger.info("engine: worker %s disconnected; %d workers, %d sessions", w.pid, len(self.workers), len(self.sessions))

    # -- reports -------------------------------------------------------------------------
    def batchers(self) -> list[Any]:
        out = [self._vad.batcher] if self._vad is not None else []
        out += [h.existing_batcher for h in self.handlers.values() if h.existing_batcher is not None]
        return out

    def status(self) -> dict[str, Any]:
        per = Counter(self.sessions.values())
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "restarts": self.generation - 1,
            "uptime_s": round(time.time() - self.started, 1),
            "workers": [{"pid": w.pid, "sessions": per.get(w.id, 0)} for w in self.workers.values()],
            "sessions": len(self.sessions),
            "batchers": [b.stats.snapshot() for b in self.batchers()],
        }

    def metrics_text(self) -> str:
        from prometheus_client import generate_latest

        per = Counter(self.sessions.values())
        lines = [
            "# HELP batchrtc_engine_up The engine process answers (1).",
            "# TYPE batchrtc_engine_up gauge",
            "batchrtc_engine_up 1",
            "# HELP batchrtc_engine_restarts_total Engine processes started for this server, minus one.",
            "# TYPE batchrtc_engine_restarts_total counter",
            f"batchrtc_engine_restarts_total {self.generation - 1}",
            "# HELP batchrtc_engine_workers Front-end processes connected to the engine.",
            "# TYPE batchrtc_engine_workers gauge",
            f"batchrtc_engine_workers {len(self.workers)}",
            "# HELP batchrtc_engine_sessions Sessions open, by front-end process (pid).",
            "# TYPE batchrtc_engine_sessions gauge",
        ]
        lines += [f'batchrtc_engine_sessions{{worker="{w.label}"}} {per.get(w.id, 0)}' for w in self.workers.values()]
        if self._vad is not None:
            lines += ["# HELP batchrtc_engine_vad_slots_in_use VAD state-table slots held by open streams.",
                      "# TYPE batchrtc_engine_vad_slots_in_use gauge",
                      f"batchrtc_engine_vad_slots_in_use {self._vad.state.in_use}"]
        lines += ["# HELP batchrtc_engine_queue_depth Items waiting in an engine batcher.",
                  "# TYPE batchrtc_engine_queue_depth gauge"]
        lines += [f'batchrtc_engine_queue_depth{{batcher="{b.name}"}} {b.queue_depth}' for b in self.batchers()]
        return "\n".join(lines) + "\n" + generate_latest(self.registry).decode()


def _close_stream(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


async def _run(args: argparse.Namespace, generation: int) -> None:
    engine = Engine(generation)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)  # the socket: this user only (a webrtc_id is a bearer secret)
    try:
        server = await asyncio.start_unix_server(engine.serve, path=args.socket, limit=1 << 20)
    finally:
        os.umask(old)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    logger.info("engine (pid %d, generation %d) listening on %s", os.getpid(), generation, args.socket)
    try:
        while not stop.is_set():
            if not pid_alive(args.owner):
                break
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        server.close()
        for b in engine.batchers():
            b.close(timeout=2.0)
        engine.views.close()
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
        sweep_dead()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--lock", required=True)
    p.add_argument("--owner", type=int, required=True, help="exit when this process is gone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the owner decides
    fd = os.open(args.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another engine serves this server
    raw = os.pread(fd, 32, 0).decode(errors="ignore").strip()
    generation = int(raw) + 1 if raw.isdigit() else 1
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(generation).encode(), 0)
    sweep_dead()  # what an earlier engine or worker that was SIGKILLed left behind
    try:
        asyncio.run(_run(args, generation))
    finally:
        if not pid_alive(args.owner):
            for path in (args.lock, args.lock + ".spawn"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
