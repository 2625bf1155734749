"""Flush policy: *when* to run a batch, as pure code testable without threads or clocks.

The worker thread of :class:`~batching.batcher.DynamicBatcher` calls :func:`decide_flush` for a
candidate batch each time something changes (a submit, a producer leaving, a timer firing) and
either runs the batch or sleeps until the returned ``wake_at``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

__all__ = ["FlushDecision", "decide_flush", "RuntimePredictor"]

# Reasons reported in FlushDecision.reason (and counted in BatcherStats.flush_reasons).
FULL = "full"
DEADLINE = "deadline"
MAX_DELAY = "max_delay"
PRODUCERS = "producers"


@dataclass(frozen=True, slots=True)
class FlushDecision:
    """Outcome of :func:`decide_flush`.

    ``flush``: run the candidate batch now. ``reason``: which rule fired (empty when not
    flushing). ``wake_at``: absolute time at which the decision would next change by itself
    (only when not flushing); a new submit may change it earlier.
    """

    flush: bool
    reason: str = ""
    wake_at: float | None = None


def decide_flush(
    *,
    now: float,
    batch_size: int,
    max_batch_size: int,
    oldest_enqueued_at: float,
    earliest_deadline: float | None,
    predicted_run_s: float,
    safety_margin_s: float,
    max_queue_delay_s: float,
    producers: int = 0,
    queued: int = 0,
) -> FlushDecision:
    """Decide whether a candidate batch of ``batch_size`` items should run now.

    Rules, first match wins:

    * ``full``: the candidate holds ``max_batch_size`` items; waiting cannot make it bigger.
    * ``producers``: ``producers > 0`` and ``queued >= producers``: every registered producer
      has an item waiting, so nothing more can arrive until results go back.
    * ``deadline``: ``now + predicted_run_s + safety_margin_s >= earliest_deadline``; waiting
      any longer would make the most urgent item of the candidate late.
    * ``max_delay``: the oldest item has waited ``max_queue_delay_s``.

    Otherwise wait until the earlier of the deadline and max-delay trigger times.
    """
    if batch_size <= 0:
        return FlushDecision(False, "", None)
    if batch_size >= max_batch_size:
        return FlushDecision(True, FULL)
    if producers > 0 and queued >= producers:
        return FlushDecision(True, PRODUCERS)
    deadline_at = math.inf
    if earliest_deadline is not None:
        deadline_at = earliest_deadline - predicted_run_s - safety_margin_s
        if now >= deadline_at:
            return FlushDecision(True, DEADLINE)
    delay_at = oldest_enqueued_at + max_queue_delay_s
    if now >= delay_at:
        return FlushDecision(True, MAX_DELAY)
    return FlushDecision(False, "", min(deadline_at, delay_at))


class RuntimePredictor:
    """Online model of a batch function's run time as a function of batch size.

    Keeps an EWMA of the measured run time (and of the batch size, so buckets have a
    representative x position) per power-of-two batch-size bucket. ``predict(n)`` returns
    the bucket's EWMA when the bucket has been seen; otherwise it interpolates linearly
    between the nearest known buckets (or extrapolates from the two nearest on one side,
    never with a negative slope, or uses the single known point flat). Before any
    measurement it returns ``prior_s``.

    Guarded by a lock: one writer (the worker thread) and any number of readers.
    """

    def __init__(self, *, alpha: float = 0.2, prior_s: float = 0.001) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if prior_s < 0:
            raise ValueError(f"prior_s must be >= 0, got {prior_s}")
        self.alpha = alpha
        self.prior_s = prior_s
        self._lock = threading.Lock()
        self._t: dict[int, float] = {}  # bucket -> EWMA run time (s)
        self._n: dict[int, float] = {}  # bucket -> EWMA batch size

    @staticmethod
    def bucket(n: int) -> int:
        """Smallest power of two >= n (1 for n <= 1)."""
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    def observe(self, n: int, seconds: float) -> None:
        """Record that a batch of ``n`` items took ``seconds`` to run."""
        if n <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        b = self.bucket(n)
        a = self.alpha
        with self._lock:
            if b in self._t:
                self._t[b] += a * (seconds - self._t[b])
                self._n[b] += a * (n - self._n[b])
            else:
                self._t[b] = float(seconds)
                self._n[b] = float(n)

    def predict(self, n: int) -> float:
        """Predicted run time in seconds of a batch of ``n`` items (always >= 0)."""
        b = self.bucket(n)
        with self._lock:
            if b in self._t:
                return self._t[b]
            if not self._t:
                return self.prior_s
            pts = sorted((bk, self._n[bk], self._t[bk]) for bk in self._t)
        lower = [p for p in pts if p[0] < b]
        upper = [p for p in pts if p[0] > b]
        if lower and upper:  # interpolate between the neighbouring buckets
            (_, x0, y0), (_, x1, y1) = lower[-1], upper[0]
            w = (n - x0) / (x1 - x0) if x1 != x0 else 0.0
            return max(0.0, y0 + w * (y1 - y0))
        if len(lower) >= 2:  # extrapolate upward from the two largest known buckets
            (_, xa, ya), (_, x1, y1) = lower[-2], lower[-1]
            anchor_x, anchor_y = x1, y1
        elif len(upper) >= 2:  # extrapolate downward from the two smallest
            (_, x1, y1), (_, xa, ya) = upper[0], upper[1]
            anchor_x, anchor_y = x1, y1
        else:
            return pts[0][2]  # a single known point: assume flat
        # Noise can make a bigger batch look faster; never predict that (slope >= 0).
        slope = max(0.0, (anchor_y - ya) / (anchor_x - xa)) if anchor_x != xa else 0.0
        return max(0.0, anchor_y + slope * (n - anchor_x))

    def snapshot(self) -> dict[int, float]:
        """Known buckets -> EWMA run time in seconds."""
        with self._lock:
            return dict(sorted(self._t.items()))
