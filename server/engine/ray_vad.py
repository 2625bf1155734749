"""The shared VAD on Ray Serve replicas (`BATCHRTC_ENGINE=ray`), without Ray itself: the call's
wire format, the replica's core and the front end's side. `server/engine/ray_app.py` wraps the
replica core in a Serve deployment and connects front ends to it.

A front-end process bundles every chunk its sessions have pending into one Serve call (a call
costs milliseconds, an item must cost microseconds); the replica opens a stream per item in
its own `VADEngine`, submits them all to its `DynamicBatcher` (flush policy, batched resampling
and Silero as in-process), and returns every result.

Each item carries its stream's whole state (LSTM h and c, the 64-sample context, the 16 kHz
samples not yet in a window, the resampler's input history: 1.5-3.5 KB) and gets the new one
back, instead of being routed to a replica that holds it. Any replica serves any chunk, a call
is retry-safe (a replica keeps nothing), a replica that dies loses only the chunks in flight
(their streams keep their last state here), and scaling needs no routing table. The price,
measured by benchmarks/bench_ray_engine.py, is those bytes each way per chunk, next to the
chunk's own samples (a 96 ms hop at 48 kHz is 9 KB of int16).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from batching import BatchingError, QueueFullError
from server.metrics.collector import batcher_report
from server.vad_engine import CONTEXT, LATENCY_BUDGET_S, VADEngine, VADStream, to_float32

from .client import EngineTimeout, EngineUnavailable

logger = logging.getLogger(__name__)

HIDDEN = 128
FIXED = 2 * HIDDEN + CONTEXT  # h, c and the context: the part of a state of fixed size

# One call's items: int32 [N, 7] columns, then two flat buffers (float32 and int16 samples).
_RATE, _N, _INT16, _PENDING, _HIST, _CARRY, _BUDGET_US = range(7)
# One call's results: int32 [N, 5] columns, a flat float32 buffer, and the failed items.
_OK, _PROBS, _R_PENDING, _R_HIST, _R_CARRY = range(5)


@dataclass
class StreamState:
    """One VAD stream's whole state, host side: what any replica needs to continue it."""

    hcx: np.ndarray = field(default_factory=lambda: np.zeros(FIXED, np.float32))  # h, c, context
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # 16 kHz, < 512
    hist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # resampler input
    carry: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < `down` samples

    @property
    def nbytes(self) -> int:
        return self.hcx.nbytes + self.pending.nbytes + self.hist.nbytes + self.carry.nbytes


@dataclass
class Item:
    rate: int
    samples: np.ndarray  # int16 or float32, mono
    state: StreamState
    budget_s: float = LATENCY_BUDGET_S  # time left to the chunk's deadline (clocks differ)


Call = tuple[np.ndarray, np.ndarray, np.ndarray]
Results = tuple[np.ndarray, np.ndarray, list[tuple[int, BaseException]]]


def pack_call(items: list[Item]) -> Call:
    meta = np.zeros((len(items), 7), np.int32)
    flat: list[np.ndarray] = []
    s16: list[np.ndarray] = []
    for i, it in enumerate(items):
        st = it.state
        is16 = it.samples.dtype == np.int16
        meta[i] = (it.rate, it.samples.size, is16, st.pending.size, st.hist.size, st.carry.size,
                   max(0, int(it.budget_s * 1e6)))
        flat += [st.hcx, st.pending, st.hist, st.carry]
        if is16:
            s16.append(it.samples)
        else:
            flat.append(it.samples)
    f = np.concatenate(flat).astype(np.float32, copy=False) if flat else np.zeros(0, np.float32)
    s = np.concatenate(s16) if s16 else np.zeros(0, np.int16)
    return meta, f, s


def unpack_call(call: Call) -> list[Item]:
    meta, f, s = call
    m = meta.astype(np.int64)
    n, is16 = m[:, _N], m[:, _INT16].astype(bool)
    # each item's float32 run: hcx, pending, hist, carry, then its samples if they are float32
    sizes = FIXED + m[:, _PENDING] + m[:, _HIST] + m[:, _CARRY] + np.where(is16, 0, n)
    fo = (np.cumsum(sizes) - sizes).tolist()
    so = (np.cumsum(np.where(is16, n, 0)) - np.where(is16, n, 0)).tolist()
    items: list[Item] = []
    for i, (rate, ni, i16, p, h, k, budget_us) in enumerate(meta.tolist()):
        a = fo[i]
        b = a + FIXED
        st = StreamState(f[a:b], f[b:b + p], f[b + p:b + p + h], f[b + p + h:b + p + h + k])
        c = b + p + h + k
        x = s[so[i]:so[i] + ni] if i16 else f[c:c + ni]
        items.append(Item(rate, x, st, budget_us / 1e6))
    return items


def pack_results(results: list[tuple[np.ndarray, StreamState] | BaseException]) -> Results:
    meta = np.zeros((len(results), 5), np.int32)
    flat: list[np.ndarray] = []
    errors: list[tuple[int, BaseException]] = []
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            errors.append((i, r))
            continue
        probs, st = r
        meta[i] = (1, probs.size, st.pending.size, st.hist.size, st.carry.size)
        flat += [probs, st.hcx, st.pending, st.hist, st.carry]
    f = np.concatenate(flat).astype(np.float32, copy=False) if flat else np.zeros(0, np.float32)
    return meta, f, errors


def unpack_results(res: Results) -> list[tuple[np.ndarray, StreamState] | BaseException]:
    meta, f, errors = res
    failed = dict(errors)
    m = meta.astype(np.int64)
    sizes = np.where(m[:, _OK] > 0, m[:, _PROBS] + FIXED + m[:, _R_PENDING] + m[:, _R_HIST] + m[:, _R_CARRY], 0)
    offsets = (np.cumsum(sizes) - sizes).tolist()
    out: list[tuple[np.ndarray, StreamState] | BaseException] = []
    for i, (ok, n, p, h, k) in enumerate(meta.tolist()):
        if not ok:
            out.append(failed.get(i) or RuntimeError("the replica returned no result for this chunk"))
            continue
        # one copy per item: a stream keeping views would keep its whole call's buffer alive
        run = f[offsets[i]:offsets[i] + int(sizes[i])].copy()
        a = n + FIXED
        out.append((run[:n], StreamState(run[n:a], run[a:a + p], run[a + p:a + p + h], run[a + p + h:a + p + h + k])))
    return out


# -- the replica ---------------------------------------------------------------------------------
class VADReplica:
    """What one Serve replica runs: its own `VADEngine` (batcher, flush policy, Silero, state
    tables), fed with carried-state items. Plain Python: `ray_app.VADDeployment` makes it a
    deployment; tests and benchmarks can also run it in-process."""

    def __init__(
        self,
        *,
        device: str | None = None,
        max_batch_size: int = 512,
        max_queue_delay_ms: float = 20.0,
        threads: int | None = None,
        capacity: int = 8192,
    ) -> None:
        # Slots are held only while a call's items run: capacity bounds the items in flight.
        self.engine = VADEngine(device=device, capacity=capacity, max_batch_size=max_batch_size,
                                max_queue_delay_ms=max_queue_delay_ms, max_queue_size=capacity,
                                threads=threads)
        self.calls = 0
        self.items = 0
        # Batches by where their items came from (the calling front end's `origin`): a batch
        # mixing front ends is what running the engine on Ray is for.
        self.items_by_origin: dict[str, int] = {}
        self.mixed_batches = 0
        self.batches = 0
        self._call_seq = 0
        self.engine.batcher.on_batch = self._on_batch
        # Streams between calls, by rate: their slots are overwritten by the next call's states,
        # so an item costs no slot acquire and release (measured ~66 µs an item on CPU).
        self._idle: dict[int, list[VADStream]] = {}

    def _take(self, rate: int) -> VADStream:
        idle = self._idle.get(rate)
        if idle:
            s = idle.pop()
            self.engine.batcher.add_producer()
            return s
        return self.engine.open_stream(rate)  # registers its producer itself

    def _put_back(self, s: VADStream) -> None:
        self.engine.batcher.remove_producer()
        self._idle.setdefault(s.sample_rate, []).append(s)

    def _on_batch(self, sources: list[Any], waits: list[float], run_s: float) -> None:
        """On the batch thread after each batch: count its items by origin."""
        origins = [s[0] for s in sources if isinstance(s, tuple)]
        self.batches += 1
        if len(set(origins)) > 1:
            self.mixed_batches += 1
        for o in origins:
            self.items_by_origin[o] = self.items_by_origin.get(o, 0) + 1

    async def process(self, call: Call, origin: str = "") -> Results:
        """Run one call's items; `origin` names the front end that sent it (statistics only)."""
        items = unpack_call(call)
        self.calls += 1
        self.items += len(items)
        self._call_seq += 1
        seq = self._call_seq
        eng = self.engine
        results: list[Any] = [None] * len(items)
        streams: list[tuple[int, VADStream]] = []
        settled = False
        try:
            # Every stream takes its producer place before any chunk is submitted: the batch
            # then runs as soon as the whole call is queued ("nothing more can arrive"), not
            # after max_queue_delay.
            for i, it in enumerate(items):
                try:
                    streams.append((i, self._take(it.rate)))
                except Exception as e:  # e.g. SlotsExhausted: this item only
                    results[i] = e
            _import_states(eng, [s for _, s in streams], [items[i].state for i, _ in streams])
            # A source per item, never reused (no stream outlives its call here): a faulty item
            # is isolated by the batcher without marking later calls' items.
            outs = await asyncio.gather(
                *(s.process(items[i].samples, latency_budget_s=max(items[i].budget_s, 1e-3), source=(origin, seq, i))
                  for i, s in streams),
                return_exceptions=True,
            )
            done = [(i, s, o) for (i, s), o in zip(streams, outs) if not isinstance(o, BaseException)]
            for (i, _), o in zip(streams, outs):
                if isinstance(o, BaseException):
                    results[i] = o
            states = _export_states(eng, [s for _, s, _ in done])
            for (i, _, probs), st in zip(done, states):
                results[i] = (np.asarray(probs, np.float32), st)
            settled = True
        finally:
            for _, s in streams:
                # Cancelled or failed midway, a batch may still write into these slots later:
                # release them (their generation changes, so that write is skipped).
                self._put_back(s) if settled else s.close()
            b = eng.batcher
            if b.suspects or b.faulty:  # what the batcher learned of this call's sources
                for i, _ in streams:
                    b.forget_source((origin, seq, i))
        return pack_results(results)

    def stats(self) -> dict[str, Any]:
        """Calls, items and batches by origin, and the batcher's report (what a front end's
        `/metrics` shows of each replica: server/metrics/replicas.py)."""
        return {"calls": self.calls, "items": self.items, "batches": self.batches,
                "mixed_batches": self.mixed_batches, "items_by_origin": dict(self.items_by_origin),
                **batcher_report(self.engine.batcher)}


def _import_states(eng: VADEngine, streams: list[VADStream], states: list[StreamState]) -> None:
    """Write carried states into the slots of `streams`, over whatever they held (one scatter
    per table)."""
    if not streams:
        return
    n = len(streams)
    hcx = np.stack([st.hcx for st in states])
    pending = np.zeros((n, 512), np.float32)
    for i, st in enumerate(states):
        pending[i, : st.pending.size] = st.pending
        streams[i]._pending = st.pending.size
        streams[i]._carry = np.array(st.carry, np.float32)
    t = torch.from_numpy(hcx)
    eng.state.scatter(
        [s.slot for s in streams],
        {"h": t[:, :HIDDEN], "c": t[:, HIDDEN:2 * HIDDEN], "ctx": t[:, 2 * HIDDEN:], "pending": torch.from_numpy(pending)},
        generations=[s.generation for s in streams],
    )
    by_rate: dict[int, list[int]] = {}
    for i, s in enumerate(streams):
        if s.hist_slot >= 0:
            by_rate.setdefault(s.sample_rate, []).append(i)
    for rate, idx in by_rate.items():
        table = eng._histories[rate]
        size = table.tensors["x"].shape[1]
        hist = np.zeros((len(idx), size), np.float32)  # a new stream's (empty) history: zeros
        for row, i in enumerate(idx):
            h = states[i].hist
            if h.size not in (0, size):
                raise ValueError(f"carried resampler history of {h.size} samples, the engine keeps {size} at {rate} Hz")
            hist[row, : h.size] = h
        table.scatter([streams[i].hist_slot for i in idx], {"x": torch.from_numpy(hist)},
                      generations=[streams[i].hist_generation for i in idx])


def _export_states(eng: VADEngine, streams: list[VADStream]) -> list[StreamState]:
    """Read the states of `streams` back (one gather per table)."""
    if not streams:
        return []
    st = eng.state.gather([s.slot for s in streams])
    hcx = torch.cat([st["h"], st["c"], st["ctx"]], dim=1).float().cpu().numpy()
    pending = st["pending"].float().cpu().numpy()
    hists: dict[int, np.ndarray] = {}
    by_rate: dict[int, list[int]] = {}
    for i, s in enumerate(streams):
        if s.hist_slot >= 0:
            by_rate.setdefault(s.sample_rate, []).append(i)
    for rate, idx in by_rate.items():
        h = eng._histories[rate].gather([streams[i].hist_slot for i in idx])["x"].float().cpu().numpy()
        hists.update(zip(idx, h))
    empty = np.zeros(0, np.float32)
    return [
        StreamState(hcx[i], pending[i, : s._pending].copy(), hists.get(i, empty), to_float32(s._carry))
        for i, s in enumerate(streams)
    ]


# -- the front end -------------------------------------------------------------------------------
SendCall = Callable[[Call], Awaitable[Results]]


class _Waiting:
    __slots__ = ("item", "future", "deadline", "since")

    def __init__(self, item: Item, future: asyncio.Future[Any], deadline: float, since: float) -> None:
        self.item, self.future, self.deadline, self.since = item, future, deadline, since


class CallBundler:
    """One front-end process's chunks, bundled into few Serve calls.

    A call goes when no call is in flight (an idle engine never waits; chunks submitted in the
    same turn of the event loop still go together), when `max_items` are pending, or when the
    oldest has waited `max_wait_s`, with at most `max_inflight` calls in
    flight (Serve spreads them over replicas). While calls are in flight, chunks gather for the
    next one, so the call rate stays bounded however many sessions send.
    """

    def __init__(self, send: SendCall, *, max_items: int = 512, max_inflight: int = 4,
                 max_wait_s: float = 0.002, timeout_s: float = 10.0, max_pending: int = 8192) -> None:
        self.send = send
        self.max_items, self.max_inflight, self.max_wait_s = max_items, max_inflight, max_wait_s
        self.timeout_s, self.max_pending = timeout_s, max_pending
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Waiting] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        self._closed = False
        # counters for /health and the benchmark
        self.calls = self.items = self.failed_calls = 0
        self.call_seconds = 0.0
        self.state_bytes = self.sample_bytes = 0

    def submit(self, item: Item, deadline: float) -> asyncio.Future[tuple[np.ndarray, StreamState]]:
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        elif loop is not self.loop:
            raise RuntimeError("a Ray VAD engine serves one event loop")
        if self._closed:
            raise EngineUnavailable("the Ray engine client is closed")
        if len(self._queue) >= self.max_pending:
            raise QueueFullError(f"{self.max_pending} VAD chunks already wait for the Ray engine")
        fut = loop.create_future()
        self._queue.append(_Waiting(item, fut, deadline, time.monotonic()))
        if self._soon is None:
            # Not at once: chunks submitted in this same turn of the loop (a burst) go together.
            self._soon = loop.call_soon(self._pump)
        return fut

    def _pump(self) -> None:
        self._soon = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._inflight < self.max_inflight and not self._closed:
            now = time.monotonic()
            due = self._queue[0].since + self.max_wait_s
            if self._inflight and len(self._queue) < self.max_items and now < due:
                assert self.loop is not None
                self._timer = self.loop.call_at(self.loop.time() + (due - now), self._pump)
                return
            batch: list[_Waiting] = []
            while self._queue and len(batch) < self.max_items:
                w = self._queue.popleft()
                if not w.future.done():  # a cancelled caller's chunk is not sent
                    batch.append(w)
            if batch:
                self._inflight += 1
                assert self.loop is not None
                t = self.loop.create_task(self._call(batch))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[_Waiting]) -> None:
        t0 = time.monotonic()
        try:
            for w in batch:
                w.item.budget_s = w.deadline - t0
            call = pack_call([w.item for w in batch])
            self.calls += 1
            self.items += len(batch)
            self.state_bytes += sum(w.item.state.nbytes for w in batch)
            self.sample_bytes += sum(w.item.samples.nbytes for w in batch)
            try:
                res = await asyncio.wait_for(self.send(call), self.timeout_s)
            except asyncio.TimeoutError:
                self.failed_calls += 1
                _fail(batch, EngineTimeout(f"the Ray VAD engine did not answer within {self.timeout_s} s"))
                return
            except asyncio.CancelledError:
                _fail(batch, EngineUnavailable("the Ray engine client is closing"))
                raise
            except Exception as e:  # a replica died, Serve has none, the cluster is gone...
                self.failed_calls += 1
                logger.warning("ray engine: a call of %d chunks failed: %s: %s", len(batch), type(e).__name__, e)
                _fail(batch, EngineUnavailable(f"the Ray VAD engine call failed ({type(e).__name__}: {e}); "
                                               "the chunks in flight were not judged"))
                return
            self.call_seconds += time.monotonic() - t0
            for w, r in zip(batch, unpack_results(res)):
                if w.future.done():
                    continue
                if isinstance(r, BatchingError):  # the replica is overloaded or closing
                    w.future.set_exception(EngineUnavailable(f"the Ray VAD replica refused a chunk: {r}"))
                elif isinstance(r, BaseException):
                    w.future.set_exception(r)
                else:
                    w.future.set_result(r)
        finally:
            self._inflight -= 1
            if not self._closed:
                self._pump()

    async def close(self) -> None:
        self._closed = True
        for h in (self._timer, self._soon):
            if h is not None:
                h.cancel()
        _fail(list(self._queue), EngineUnavailable("the Ray engine client is closed"))
        self._queue.clear()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls, "items": self.items, "failed_calls": self.failed_calls,
            "items_per_call": self.items / self.calls if self.calls else 0.0,
            "call_ms_mean": self.call_seconds / max(1, self.calls - self.failed_calls) * 1e3,
            "state_bytes_per_item": self.state_bytes / self.items if self.items else 0.0,
            "sample_bytes_per_item": self.sample_bytes / self.items if self.items else 0.0,
            "pending": len(self._queue), "inflight": self._inflight,
        }


def _fail(batch: list[_Waiting], exc: BaseException) -> None:
    for w in batch:
        if not w.future.done():
            w.future.set_exception(exc)


class RayVAD:
    """`VADEngine`'s `open_stream` for a front end whose VAD runs on Serve replicas."""

    device = "ray"

    def __init__(self, send: SendCall, **bundler: Any) -> None:
        self.bundler = CallBundler(send, **bundler)

    def open_stream(self, sample_rate: int) -> RayVADStream:
        if sample_rate <= 0:
            raise ValueError(f"sample rate must be positive, got {sample_rate}")
        return RayVADStream(self, sample_rate)

    async def close(self) -> None:
        await self.bundler.close()


class RayVADStream:
    """`VADStream`'s interface; the state lives here and travels with each chunk. A chunk that
    fails (EngineUnavailable, EngineTimeout) leaves the state as it was, as a local stream's
    failed chunk does: the next chunk continues from it on whichever replica takes it."""

    def __init__(self, vad: RayVAD, sample_rate: int) -> None:
        self.vad, self.sample_rate = vad, sample_rate
        self.state = StreamState()
        self.closed = False
        self.windows_done = 0
        self._lock = asyncio.Lock()

    async def process(self, samples: np.ndarray, *, latency_budget_s: float = LATENCY_BUDGET_S,
                      source: object = None) -> np.ndarray:
        if self.closed:
            raise RuntimeError("VAD stream is closed")
        x = np.asarray(samples)
        x = x.reshape(-1) if x.dtype == np.int16 else np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        async with self._lock:  # chunks of one stream go one at a time: each needs the last state
            deadline = time.monotonic() + latency_budget_s
            probs, state = await self.vad.bundler.submit(Item(self.sample_rate, x, self.state), deadline)
            self.state = state
            self.windows_done += probs.size
            return probs

    def close(self) -> None:
        self.closed = True  # nothing to free remotely: no replica holds this stream


def require_ray() -> None:
    """Raise a clear error when Ray is not installed (`BATCHRTC_ENGINE=ray` needs it)."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "BATCHRTC_ENGINE=ray needs Ray Serve, which is not installed: "
            "pip install -e \".[ray]\" (or pip install \"ray[serve]\")") from e
