"""`GET /metrics` (Prometheus text format) and `GET /health` for one `Stream`.

Every `Stream` gets its own `CollectorRegistry`, so several streams in one process (tests, or
two streams mounted in one app) never collide. Almost everything is read from live state at
scrape time by custom collectors -- nothing on the media path is slowed by metrics:

* sessions (`stream.sessions`, by front-end `kind`) and the concurrency limit;
* every batcher: the process-wide VAD engine's (only if it already exists -- a scrape never
  creates one) and each `BatchedHandler` reachable from `stream.handler` (only once its batcher
  exists), plus any registered with :func:`register_batcher`; counters, queue depth, batch
  sizes and the latency percentiles come from ``DynamicBatcher.stats.snapshot()``;
* WebRTC video frames (``session.video`` counters): current sessions' sums, and a lifetime
  counter (frames of ended sessions are folded into a per-stream total when they end);
* GPUs through NVML (``nvidia-ml-py``), per device; no series at all where NVML is missing.

Two optional hooks, called by the server where it has the information, make two series exact:
:func:`record_handler_error` (from ``Session.report_handler_error``) counts handler errors,
and :func:`session_closed` (from ``Session.close``) folds a session's video counters into the
lifetime total even when it ended between two scrapes. Without the second hook, a session is
folded in when it ends only if a scrape saw it alive. Both hooks never raise.

This module imports nothing of ours at import time (so `session.py` can import it freely).
"""

from __future__ import annotations

import logging
import threading
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

logger = logging.getLogger(__name__)

__all__ = [
    "add_routes",
    "build_registry",
    "record_handler_error",
    "register_batcher",
    "session_closed",
]

PREFIX = "batchrtc"
KINDS = ("websocket", "webrtc", "telephone")
VIDEO_OUTCOMES = ("received", "processed", "dropped")
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


# -- per-stream state (what cannot be read from live objects) ---------------------------------
class _StreamState:
    """Totals that outlive sessions, kept per stream. Thread-safe (scrapes run on a thread)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.video_retired: Counter[str] = Counter()  # frames of sessions that have ended
        self.retired: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions already folded in
        self.watched: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions with our on_close
        self.handler_errors: Counter[tuple[str, str]] = Counter()  # (kind, class) -> count
        self.extra_batchers: list[weakref.ref[Any]] = []
        self.device: str | None = None


_states: weakref.WeakKeyDictionary[Any, _StreamState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(stream: Any) -> _StreamState:
    with _states_lock:
        st = _states.get(stream)
        if st is None:
            st = _states[stream] = _StreamState()
        return st


def _video_counts(session: Any) -> dict[str, int] | None:
    video = getattr(session, "video", None)
    if video is None:
        return None
    return {k: int(getattr(video, k, 0) or 0) for k in VIDEO_OUTCOMES}


def _retire(state: _StreamState, session: Any) -> None:
    """Fold an ended session's video counters into the lifetime total, once."""
    with state.lock:
        if session in state.retired:
            return
        state.retired.add(session)
        counts = _video_counts(session)
        if counts:
            state.video_retired.update(counts)


# -- hooks the server may call (never raise) -------------------------------------------------
def record_handler_error(session: Any, exc: BaseException) -> None:
    """Count a handler error of `session` (call from `Session.report_handler_error`).

    Labelled by the session's front-end kind and class ``warning`` (a FastRTC `Warning`,
    shown to the user as a warning) or ``error`` (anything else)."""
    try:
        from .utils import Warning as FastRTCWarning

        cls = "warning" if isinstance(exc, FastRTCWarning) else "error"
        state = _state(session.stream)
        with state.lock:
            state.handler_errors[(str(getattr(session, "kind", "unknown")), cls)] += 1
    except Exception:  # metrics must never hurt a session
        logger.debug("record_handler_error failed", exc_info=True)


def session_closed(session: Any) -> None:
    """Fold a closing session's video counters into the lifetime total (call from
    `Session.close`, before it unregisters). Idempotent."""
    try:
        _retire(_state(session.stream), session)
    except Exception:
        logger.debug("session_closed failed", exc_info=True)


def register_batcher(stream: Any, batcher: Any) -> None:
    """Also export `batcher` (a `DynamicBatcher` the stream's handler does not reach, e.g. one
    built inside a model wrapper) on `stream`'s `/metrics` and `/health`. Held weakly."""
    state = _state(stream)
    with state.lock:
        state.extra_batchers.append(weakref.ref(batcher))


# -- finding batchers ------------------------------------------------------------------------
_WALK_DEPTH = 2
_WALK_NODES = 256


def _reachable(root: Any) -> list[Any]:
    """`DynamicBatcher`s reachable from `root`: a `BatchedHandler` (its batcher, only if it
    exists: `.batcher` would create one), a `DynamicBatcher`, or either held in attributes,
    closures, bound-method owners or small containers, up to two steps away."""
    from batching import DynamicBatcher

    from .video import BatchedHandler

    found: list[Any] = []
    seen: set[int] = set()
    frontier = [root]
    nodes = 0
    for depth in range(_WALK_DEPTH + 1):
        nxt: list[Any] = []
        for obj in frontier:
            if obj is None or id(obj) in seen or nodes >= _WALK_NODES:
                continue
            seen.add(id(obj))
            nodes += 1
            if isinstance(obj, BatchedHandler):
                b = obj._batcher
                if b is not None:
                    found.append(b)
                continue
            if isinstance(obj, DynamicBatcher):
                found.append(obj)
                continue
            if depth < _WALK_DEPTH:
                nxt.extend(_children(obj))
        frontier = nxt
    return found


def _runner(stream: Any) -> Any:
    """The stream's batched handler's ProcessRunner, once it exists (never creates one)."""
    from .video import BatchedHandler

    handler = getattr(stream, "handler", None)
    return handler._runner if isinstance(handler, BatchedHandler) else None


def _children(obj: Any) -> list[Any]:
    """What `obj` holds that may lead to a batcher (never calls properties)."""
    if isinstance(obj, (str, bytes, int, float, bool, type, types.ModuleType)):
        return []
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)[:32]
    if isinstance(obj, dict):
        return list(obj.values())[:32]
    out: list[Any] = []
    if isinstance(obj, types.MethodType):
        out.append(obj.__self__)
        obj = obj.__func__
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        for cell in obj.__closure__:
            try:
                out.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    try:
        d = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        d = None
    if isinstance(d, dict):
        out.extend(list(d.values())[:64])  # includes __wrapped__ of functools.wraps
    return out


def _batchers(stream: Any) -> list[tuple[str, Any]]:
    """(unique label, batcher) for every batcher this stream exports."""
    candidates: list[Any] = []
    try:
        from . import vad_engine

        engine = vad_engine._default_engine  # read, never created here
        if engine is not None:
            candidates.append(engine.batcher)
    except Exception:
        logger.debug("VAD engine lookup failed", exc_info=True)
    try:
        candidates.extend(_reachable(stream.handler))
    except Exception:
        logger.debug("batcher discovery failed", exc_info=True)
    state = _state(stream)
    with state.lock:
        alive = [r() for r in state.extra_batchers]
        state.extra_batchers = [r for r, b in zip(state.extra_batchers, alive) if b is not None]
    candidates.extend(b for b in alive if b is not None)
    out: list[tuple[str, Any]] = []
    ids: set[int] = set()
    names: Counter[str] = Counter()
    for b in candidates:
        if id(b) in ids:
            continue
        ids.add(id(b))
        name = str(getattr(b, "name", "batcher"))
        names[name] += 1
        out.append((name if names[name] == 1 else f"{name}#{names[name]}", b))
    return out


def _worker_dead(batcher: Any) -> bool:
    """Closed, or its worker thread ended without `close()` (should not happen: a worker
    that hits an internal error closes the batcher)."""
    if getattr(batcher, "closed", False):
        return True
    thread = getattr(batcher, "_thread", None)
    return thread is not None and not thread.is_alive()


# -- NVML ------------------------------------------------------------------------------------
class _Nvml:
    """NVML, initialised once on first use; unavailable (silently) when it cannot be."""

    def __init__(self, loader: Callable[[], Any] | None = None) -> None:
        self._loader = loader or _import_pynvml
        self._lock = threading.Lock()
        self._mod: Any = None
        self._tried = False

    def module(self) -> Any:
        if self._tried:
            return self._mod
        with self._lock:
            if not self._tried:
                try:
                    mod = self._loader()
                    mod.nvmlInit()
                    self._mod = mod
                except Exception as e:  # no driver, no library, no GPU: no GPU series
                    logger.debug("NVML unavailable, GPU metrics disabled: %r", e)
                    self._mod = None
                self._tried = True
        return self._mod

    def devices(self) -> list[dict[str, Any]]:
        """One dict per GPU with whatever could be read (a failed query leaves a key out)."""
        nv = self.module()
        if nv is None:
            return []
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception:
            logger.debug("nvmlDeviceGetCount failed", exc_info=True)
            return []
        out = []
        for i in range(count):
            dev: dict[str, Any] = {"index": str(i), "name": ""}
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception:
                continue
            try:
                name = nv.nvmlDeviceGetName(h)
                dev["name"] = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                pass
            try:
                dev["util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # e.g. NotSupported on MIG instances
                pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                dev["mem_used"], dev["mem_total"] = float(mem.used), float(mem.total)
            except Exception:
                pass
            try:
                dev["temp"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except Exception:
                pass
            out.append(dev)
        return out


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


_nvml = _Nvml()


# -- the collector ---------------------------------------------------------------------------
def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


class StreamCollector(Collector):
    """Reads one stream's live state at scrape time."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.state = _state(stream)

    def collect(self) -> Iterator[Metric]:
        yield from self._sessions()
        yield from self._batchers()
        yield from self._workers()
        yield from self._gpus()

    # sessions, video, handler errors
    def _sessions(self) -> Iterator[Metric]:
        stream, state = self.stream, self.state
        sessions = list(stream.sessions.values())
        modality = str(getattr(stream, "modality", ""))
        by_kind: Counter[str] = Counter({k: 0 for k in KINDS})
        live_video: Counter[str] = Counter({k: 0 for k in VIDEO_OUTCOMES})
        for s in sessions:
            by_kind[str(getattr(s, "kind", "unknown"))] += 1
            self._watch(s)
        with state.lock:
            for s in sessions:
                if s in state.retired:
                    continue  # ended: already in the lifetime total
                counts = _video_counts(s)
                if counts:
                    live_video.update(counts)
            retired = Counter(state.video_retired)
            errors = Counter(state.handler_errors)

        g = GaugeMetricFamily(
            _name("sessions"), "Connected sessions, by stream modality and front-end kind.",
            labels=["modality", "kind"],
        )
        for kind, n in sorted(by_kind.items()):
            g.add_metric([modality, kind], n)
        yield g
        yield GaugeMetricFamily(
            _name("concurrency_limit"), "Most sessions this stream accepts at once.",
            value=float(stream.concurrency_limit),
        )
        registry = getattr(stream, "registry", None)
        if registry is not None:
            yield GaugeMetricFamily(
                _name("sessions_closing"), "Sessions that have ended and are still releasing resources.",
                value=float(registry.closing),
            )
        pool = getattr(stream, "pool", None)
        if pool is not None:
            g = GaugeMetricFamily(
                _name("handler_threads"),
                "Threads running sync handler calls: busy (someone waits for the call) or lost "
                "(stuck in a call that timed out or whose session ended; replaced, not reused).",
                labels=["state"],
            )
            g.add_metric(["busy"], pool.busy)
            g.add_metric(["lost"], pool.lost)
            yield g
            yield GaugeMetricFamily(
                _name("handler_threads_lost_limit"),
                "Lost handler threads at which new sessions are refused (server_overloaded).",
                value=float(pool.max_lost),
            )
        g = GaugeMetricFamily(
            _name("video_session_frames"),
            "WebRTC video frames of the sessions connected now (received, processed, dropped).",
            labels=["outcome"],
        )
        for k in VIDEO_OUTCOMES:
            g.add_metric([k], live_video[k])
        yield g
        c = CounterMetricFamily(
            _name("video_frames"),
            "WebRTC video frames over this stream's lifetime (received, processed, dropped).",
            labels=["outcome"],
        )
        for k in VIDEO_OUTCOMES:
            c.add_metric([k], retired[k] + live_video[k])
        yield c
        c = CounterMetricFamily(
            _name("handler_errors"),
            "Handler exceptions reported to clients, by front-end kind and class (error/warning).",
            labels=["kind", "class"],
        )
        for kind in KINDS:
            for cls in ("error", "warning"):
                errors.setdefault((kind, cls), 0)
        for (kind, cls), n in sorted(errors.items()):
            c.add_metric([kind, cls], n)
        yield c

    def _watch(self, session: Any) -> None:
        """Fold this session's video counters in when it ends (the fallback for the
        `session_closed` hook; a session is watched from the first scrape that sees it)."""
        state = self.state
        with state.lock:
            new = session not in state.watched and session not in state.retired
            if new:
                state.watched.add(session)
        if new:
            on_close = getattr(session, "on_close", None)
            if on_close is not None:
                on_close(lambda s=session: _retire(state, s))
        closed = getattr(session, "closed", None)
        if closed is not None and closed.is_set():
            _retire(state, session)  # ending: our callback may come too late (or not at all)

    # batchers
    def _batchers(self) -> Iterator[Metric]:
        found = _batchers(self.stream)
        lab = ["batcher"]

        def gauge(suffix: str, doc: str, labels: list[str] = lab) -> GaugeMetricFamily:
            return GaugeMetricFamily(_name(suffix), doc, labels=labels)

        def counter(suffix: str, doc: str, labels: list[str] = lab) -> CounterMetricFamily:
            return CounterMetricFamily(_name(suffix), doc, labels=labels)

        up = gauge("batcher_up", "1 while the batcher's worker can take work; 0 once closed or dead.")
        depth = gauge("batcher_queue_depth", "Items waiting in the batcher's queue.")
        producers = gauge("batcher_producers", "Registered producers (at most one item in flight each).")
        max_batch = gauge("batcher_max_batch_size", "Largest batch the batcher forms.")
        max_queue = gauge("batcher_max_queue_size", "Queue bound; beyond it submits are rejected.")
        batches = counter("batcher_batches", "Batches run.")
        bisect = counter("batcher_bisect_calls", "Retries of halves of failed batches.")
        submitted = counter("batcher_items_submitted", "Items accepted into the queue.")
        completed = counter("batcher_items_completed", "Items that got a result.")
        failed = counter("batcher_items_failed", "Items whose batch function raised for them.")
        isolated = counter(
            "batcher_items_isolated",
            "Items of a batch that failed as a whole (a worker died or hung), put back to run alone.",
        )
        faulty = gauge(
            "batcher_faulty_sources",
            "Sources (sessions) refused because their items failed the batch function alone too.",
        )
        dropped = counter(
            "batcher_items_dropped",
            "Items dropped without running: late (deadline passed), cancelled, or closed.",
            lab + ["reason"],
        )
        rejected = counter("batcher_items_rejected", "Submits refused because the queue was full.")
        flushes = counter("batcher_flushes", "Batches by the reason they were flushed.", lab + ["reason"])
        sizes = HistogramMetricFamily(
            _name("batcher_batch_size"), "Items per batch.", labels=lab
        )
        wait = gauge(
            "batcher_queue_wait_seconds",
            "Queue wait of recent items (last 2048), as quantiles.", lab + ["quantile"],
        )
        run = gauge(
            "batcher_run_seconds",
            "Run time of recent batches (last 2048), as quantiles.", lab + ["quantile"],
        )
        for name, b in found:
            snap = b.stats.snapshot()
            up.add_metric([name], 0.0 if _worker_dead(b) else 1.0)
            depth.add_metric([name], snap["queue_depth"])
            producers.add_metric([name], getattr(b, "producers", 0))
            max_batch.add_metric([name], b.max_batch_size)
            max_queue.add_metric([name], b.max_queue_size)
            batches.add_metric([name], snap["batches"])
            bisect.add_metric([name], snap["bisect_calls"])
            submitted.add_metric([name], snap["submitted"])
            completed.add_metric([name], snap["completed"])
            failed.add_metric([name], snap["failed"])
            isolated.add_metric([name], snap.get("isolated", 0))
            faulty.add_metric([name], getattr(b, "faulty", 0))
            for reason in ("late", "cancelled", "closed"):
                dropped.add_metric([name, reason], snap[f"dropped_{reason}"])
            rejected.add_metric([name], snap["rejected_full"])
            for reason, n in sorted(snap["flush_reasons"].items()):
                flushes.add_metric([name, str(reason)], n)
            buckets, total = _size_buckets(snap["batch_size_hist"], b.max_batch_size)
            sizes.add_metric([name], buckets, sum_value=total)
            for family, key in ((wait, "queue_wait_ms"), (run, "run_ms")):
                for q, p in QUANTILES:
                    v = snap[key][p]
                    if v is not None:
                        family.add_metric([name, q], v / 1e3)
        if found:  # no batcher yet: no empty families either
            yield from (up, depth, producers, max_batch, max_queue, batches, bisect, submitted,
                        completed, failed, isolated, faulty, dropped, rejected, flushes, sizes, wait, run)

    # a batched handler's child process (process=True)
    def _workers(self) -> Iterator[Metric]:
        runner = _runner(self.stream)
        if runner is None:
            return
        name = [f"video:{getattr(self.stream.handler, '__name__', 'batched')}"]
        up = GaugeMetricFamily(_name("worker_up"), "1 while the handler's child process is running.", labels=["batcher"])
        up.add_metric(name, 1.0 if runner.pid is not None else 0.0)
        restarts = CounterMetricFamily(
            _name("worker_restarts"), "Child processes started again after one died or was killed for a timeout.",
            labels=["batcher"],
        )
        restarts.add_metric(name, runner.restarts)
        yield from (up, restarts)

    # GPUs
    def _gpus(self) -> Iterator[Metric]:
        devices = _nvml.devices()
        if not devices:
            return
        lab = ["gpu", "name"]
        fams = {
            "util": GaugeMetricFamily(_name("gpu_utilization_percent"), "GPU busy time over NVML's last sample period (0-100).", labels=lab),
            "mem_used": GaugeMetricFamily(_name("gpu_memory_used_bytes"), "GPU memory in use (all processes).", labels=lab),
            "mem_total": GaugeMetricFamily(_name("gpu_memory_total_bytes"), "GPU memory in total.", labels=lab),
            "temp": GaugeMetricFamily(_name("gpu_temperature_celsius"), "GPU core temperature.", labels=lab),
        }
        for dev in devices:
            for key, fam in fams.items():
                if key in dev:
                    fam.add_metric([dev["index"], dev["name"]], dev[key])
        yield from (f for f in fams.values() if f.samples)


def _size_buckets(hist: dict[int, int], max_batch: int) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets (1, 2, 4, ... up to max_batch, +Inf) from the exact-size histogram."""
    bounds: list[int] = []
    le = 1
    while le < max_batch:
        bounds.append(le)
        le *= 2
    bounds.append(max(1, max_batch))
    items = sorted((int(k), int(v)) for k, v in hist.items())
    out: list[tuple[str, float]] = []
    for bound in bounds:
        out.append((floatToGoString(bound), float(sum(v for k, v in items if k <= bound))))
    out.append(("+Inf", float(sum(v for _, v in items))))
    return out, float(sum(k * v for k, v in items))


# -- routes ----------------------------------------------------------------------------------
def build_registry(stream: Any) -> CollectorRegistry:
    """A fresh registry with this stream's collector plus process/platform/GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(stream))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _device(stream: Any) -> str:
    """Where the models run: the VAD engine's / a batched handler's device, else the default."""
    import torch

    dev: Any = None
    try:
        from . import vad_engine

        engine = vad_engine._default_engine
        if engine is not None:
            dev = engine.device
        else:
            from .video import BatchedHandler

            if isinstance(stream.handler, BatchedHandler):
                dev = stream.handler.device
    except Exception:
        dev = None
    state = _state(stream)
    if dev is None:
        if state.device is None:
            from models.device import default_device

            state.device = _device_str(default_device())
        return state.device
    return _device_str(torch.device(dev))


def _device_str(dev: Any) -> str:
    if dev.type == "cpu":
        return "cpu"
    return f"{dev.type}:{dev.index if dev.index is not None else 0}"


def batcher_names(stream: Any) -> list[str]:
    """Names of the batchers `/metrics` reports for `stream` (those that exist now)."""
    return [name for name, _ in _batchers(stream)]


def device_name(stream: Any) -> str:
    return _device(stream)


def add_routes(router: Any, stream: Any) -> None:
    """`GET /metrics` and `GET /health` for `stream`."""
    registry = build_registry(stream)

    def metrics() -> Response:
        # A sync route: Starlette runs it on its thread pool, so NVML queries and the
        # percentile maths never run on the event loop.
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def health() -> JSONResponse:
        batchers: dict[str, Any] = {}
        failed: list[str] = []
        for name, b in _batchers(stream):
            dead = _worker_dead(b)
            batchers[name] = {"ok": not dead, "queue_depth": b.queue_depth}
            if dead:
                failed.append(name)
        pool = getattr(stream, "pool", None)
        if pool is not None and pool.exhausted:
            failed.append("handler_threads")  # new sessions are refused until threads return
        body: dict[str, Any] = {
            "status": "error" if failed else "ok",
            "sessions": len(stream.sessions),
            "device": _device(stream),
            "batchers": batchers,
        }
        if pool is not None:
            body["handler_threads"] = {"busy": pool.busy, "lost": pool.lost, "lost_limit": pool.max_lost}
        runner = _runner(stream)
        if runner is not None:  # informational: a dead child is restarted by the next batch
            body["worker"] = {"pid": runner.pid, "restarts": runner.restarts}
        if failed:
            body["failed"] = failed
        return JSONResponse(body, status_code=503 if failed else 200)

    router.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    router.add_api_route("/health", health, methods=["GET"])
    stream.metrics_registry = registry
