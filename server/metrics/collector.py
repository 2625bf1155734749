"""The Prometheus collector of one stream: read from live state at scrape time.

Every `Stream` gets its own `CollectorRegistry`, so several streams in one process (tests, or
two streams mounted in one app) never collide; nothing on the media path is slowed by
metrics. What is read, and from where (`MetricsSources`, explicit objects, no reflection):
sessions from the session registry (by front-end `kind`), batchers and the worker process
from the stream's `EngineRegistry`, handler threads from its `HandlerPool`, lifetime totals
from its `StreamMetrics`, GPUs through NVML.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import gpu
from .state import VIDEO_OUTCOMES, StreamMetrics, video_counts

logger = logging.getLogger(__name__)

PREFIX = "batchrtc"
KINDS = ("websocket", "webrtc", "telephone")
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


@dataclass(frozen=True)
class MetricsSources:
    """What a stream's `/metrics` and `/health` read."""

    sessions: Any  # SessionRegistry: a Mapping of active sessions, plus `.closing`
    config: Any  # StreamConfig: modality, concurrency_limit
    engines: Any  # EngineRegistry
    pool: Any  # HandlerPool
    state: StreamMetrics


def worker_dead(batcher: Any) -> bool:
    """Closed, or its worker thread ended without `close()` (should not happen: a worker
    that hits an internal error closes the batcher)."""
    if getattr(batcher, "closed", False):
        return True
    thread = getattr(batcher, "_thread", None)
    return thread is not None and not thread.is_alive()


# -- the collector ---------------------------------------------------------------------------
def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


class StreamCollector(Collector):
    """Reads one stream's live state at scrape time."""

    def __init__(self, sources: MetricsSources) -> None:
        self.sources = sources
        self.state = sources.state

    def collect(self) -> Iterator[Metric]:
        yield from self._sessions()
        yield from self._batchers()
        yield from self._workers()
        yield from self._gpus()

    # sessions, video, handler errors
    def _sessions(self) -> Iterator[Metric]:
        src, state = self.sources, self.state
        sessions = list(src.sessions.values())
        modality = str(src.config.modality)
        by_kind: Counter[str] = Counter({k: 0 for k in KINDS})
        live_video: Counter[str] = Counter({k: 0 for k in VIDEO_OUTCOMES})
        for s in sessions:
            by_kind[str(getattr(s, "kind", "unknown"))] += 1
            self._watch(s)
        with state.lock:
            for s in sessions:
                if s in state.retired:
                    continue  # ended: already in the lifetime total
                counts = video_counts(s)
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
            value=float(src.config.concurrency_limit),
        )
        yield GaugeMetricFamily(
            _name("sessions_closing"), "Sessions that have ended and are still releasing resources.",
            value=float(src.sessions.closing),
        )
        pool = src.pool
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
                on_close(lambda s=session: state.retire(s))
        closed = getattr(session, "closed", None)
        if closed is not None and closed.is_set():
            state.retire(session)  # ending: our callback may come too late (or not at all)

    # batchers
    def _batchers(self) -> Iterator[Metric]:
        rows = [([name], batcher_report(b)) for name, b in self.sources.engines.batchers()]
        yield from batcher_families(rows, ["batcher"])

    # a batched handler's child process (process=True)
    def _workers(self) -> Iterator[Metric]:
        found = self.sources.engines.runner()
        if found is None:
            return
        label, runner = found
        name = [label]
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
        devices = gpu.nvml.devices()
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


def batcher_report(batcher: Any) -> dict[str, Any]:
    """What the batcher families show of one batcher: its stats snapshot plus what only the
    live object knows. Plain data, so a Ray replica can send its own (server/engine/ray_vad.py)."""
    return {
        **batcher.stats.snapshot(),
        "up": not worker_dead(batcher),
        "producers": getattr(batcher, "producers", 0),
        "faulty": getattr(batcher, "faulty", 0),
        "max_batch_size": batcher.max_batch_size,
        "max_queue_size": batcher.max_queue_size,
    }


def batcher_families(rows: list[tuple[list[str], dict[str, Any]]], labels: list[str],
                     prefix: str = "batcher") -> Iterator[Metric]:
    """The `batchrtc_<prefix>_*` families of some batchers: `rows` are (label values,
    `batcher_report`). No rows: no families (no batcher yet, or no replica answered)."""
    if not rows:
        return
    lab = list(labels)

    def gauge(suffix: str, doc: str, labels: list[str] = lab) -> GaugeMetricFamily:
        return GaugeMetricFamily(_name(f"{prefix}_{suffix}"), doc, labels=labels)

    def counter(suffix: str, doc: str, labels: list[str] = lab) -> CounterMetricFamily:
        return CounterMetricFamily(_name(f"{prefix}_{suffix}"), doc, labels=labels)

    up = gauge("up", "1 while the batcher's worker can take work; 0 once closed or dead.")
    depth = gauge("queue_depth", "Items waiting in the batcher's queue.")
    producers = gauge("producers", "Registered producers (at most one item in flight each).")
    max_batch = gauge("max_batch_size", "Largest batch the batcher forms.")
    max_queue = gauge("max_queue_size", "Queue bound; beyond it submits are rejected.")
    batches = counter("batches", "Batches run.")
    bisect = counter("bisect_calls", "Retries of halves of failed batches.")
    submitted = counter("items_submitted", "Items accepted into the queue.")
    completed = counter("items_completed", "Items that got a result.")
    failed = counter("items_failed", "Items whose batch function raised for them.")
    isolated = counter(
        "items_isolated",
        "Items of a batch that failed as a whole (a worker died or hung), put back to run alone.",
    )
    faulty = gauge(
        "faulty_sources",
        "Sources (sessions) refused because their items failed the batch function alone too.",
    )
    dropped = counter(
        "items_dropped",
        "Items dropped without running: late (deadline passed), cancelled, or closed.",
        lab + ["reason"],
    )
    rejected = counter("items_rejected", "Submits refused because the queue was full.")
    flushes = counter("flushes", "Batches by the reason they were flushed.", lab + ["reason"])
    sizes = HistogramMetricFamily(_name(f"{prefix}_batch_size"), "Items per batch.", labels=lab)
    wait = gauge(
        "queue_wait_seconds",
        "Queue wait of recent items (last 2048), as quantiles.", lab + ["quantile"],
    )
    run = gauge(
        "run_seconds",
        "Run time of recent batches (last 2048), as quantiles.", lab + ["quantile"],
    )
    for name, rep in rows:
        up.add_metric(name, 1.0 if rep["up"] else 0.0)
        depth.add_metric(name, rep["queue_depth"])
        producers.add_metric(name, rep["producers"])
        max_batch.add_metric(name, rep["max_batch_size"])
        max_queue.add_metric(name, rep["max_queue_size"])
        batches.add_metric(name, rep["batches"])
        bisect.add_metric(name, rep["bisect_calls"])
        submitted.add_metric(name, rep["submitted"])
        completed.add_metric(name, rep["completed"])
        failed.add_metric(name, rep["failed"])
        isolated.add_metric(name, rep.get("isolated", 0))
        faulty.add_metric(name, rep["faulty"])
        for reason in ("late", "cancelled", "closed"):
            dropped.add_metric([*name, reason], rep[f"dropped_{reason}"])
        rejected.add_metric(name, rep["rejected_full"])
        for reason, n in sorted(rep["flush_reasons"].items()):
            flushes.add_metric([*name, str(reason)], n)
        buckets, total = _size_buckets(rep["batch_size_hist"], rep["max_batch_size"])
        sizes.add_metric(name, buckets, sum_value=total)
        for family, key in ((wait, "queue_wait_ms"), (run, "run_ms")):
            for q, p in QUANTILES:
                v = rep[key][p]
                if v is not None:
                    family.add_metric([*name, q], v / 1e3)
    yield from (up, depth, producers, max_batch, max_queue, batches, bisect, submitted,
                completed, failed, isolated, faulty, dropped, rejected, flushes, sizes, wait, run)


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
