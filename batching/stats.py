"""Counters and latency percentiles of one :class:`~batching.batcher.DynamicBatcher`."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np

__all__ = ["BatcherStats"]


def _percentiles(samples: deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.fromiter(samples, dtype=np.float64), [50, 95, 99])
    return {"p50": float(p50) * 1e3, "p95": float(p95) * 1e3, "p99": float(p99) * 1e3}


class BatcherStats:
    """Thread-safe counters, batch-size histogram and recent-window latency percentiles.

    Item accounting: every accepted item (``submitted``) ends in exactly one of ``completed``,
    ``failed`` (its batch function raised for it), ``dropped_cancelled``, ``dropped_late`` or
    ``dropped_closed``, or is still queued / running. Refused submits count in
    ``rejected_full`` only. ``batches`` counts flushed batches (bisection retries are counted
    in ``bisect_calls``), so ``sum(batch_size_hist.values()) == batches`` and
    ``sum(size * count) == completed + failed + isolated`` once everything has finished
    (``isolated``: items of a batch that failed as a whole, put back to run alone; each is
    counted again in the batch it later runs in, or as dropped).
    """

    def __init__(self, name: str = "batcher", window: int = 2048) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.dropped_cancelled = 0
        self.dropped_late = 0
        self.dropped_closed = 0
        self.rejected_full = 0
        self.batches = 0
        self.bisect_calls = 0
        self.isolated = 0
        self.queue_depth = 0
        self.batch_size_hist: Counter[int] = Counter()
        self.flush_reasons: Counter[str] = Counter()
        self._wait_s: deque[float] = deque(maxlen=window)
        self._run_s: deque[float] = deque(maxlen=window)

    def add(self, **counts: int) -> None:
        """Increment named counters, e.g. ``add(completed=3, failed=1)``."""
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth = depth  # a single int store; no lock needed

    def record_batch(self, size: int, reason: str, waits_s: list[float]) -> None:
        """A batch of ``size`` items was flushed for ``reason``; ``waits_s``: each item's queue wait."""
        with self._lock:
            self.batches += 1
            self.batch_size_hist[size] += 1
            self.flush_reasons[reason] += 1
            self._wait_s.extend(waits_s)

    def record_run(self, seconds: float) -> None:
        """Wall time a flushed batch held the worker (including any bisection retries)."""
        with self._lock:
            self._run_s.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """A consistent plain-dict copy (JSON-serialisable; times in milliseconds)."""
        with self._lock:
            hist = dict(sorted(self.batch_size_hist.items()))
            items = sum(k * v for k, v in hist.items())
            return {
                "name": self.name,
                "submitted": self.submitted,
                "completed": self.completed,
                "failed": self.failed,
                "dropped_cancelled": self.dropped_cancelled,
                "dropped_late": self.dropped_late,
                "dropped_closed": self.dropped_closed,
                "rejected_full": self.rejected_full,
                "batches": self.batches,
                "bisect_calls": self.bisect_calls,
                "isolated": self.isolated,
                "queue_depth": self.queue_depth,
                "batch_size_hist": hist,
                "mean_batch_size": (items / self.batches) if self.batches else 0.0,
                "flush_reasons": dict(self.flush_reasons),
                "queue_wait_ms": _percentiles(self._wait_s),
                "run_ms": _percentiles(self._run_s),
            }
