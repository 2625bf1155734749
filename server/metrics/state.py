"""What `/metrics` cannot read from live objects: totals that outlive sessions, per stream."""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

VIDEO_OUTCOMES = ("received", "processed", "dropped")


class StreamMetrics:
    """Counters of one stream that must survive its sessions. Thread-safe (scrapes run on a
    worker thread); every method is safe to call from a session and never raises."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.video_retired: Counter[str] = Counter()  # frames of sessions that have ended
        self.retired: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions already folded in
        self.watched: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions with our on_close
        self.handler_errors: Counter[tuple[str, str]] = Counter()  # (kind, class) -> count

    def handler_error(self, kind: str, warning: bool) -> None:
        with self.lock:
            self.handler_errors[(kind, "warning" if warning else "error")] += 1

    def retire(self, session: Any) -> None:
        """Fold an ended session's video counters into the lifetime total, once."""
        with self.lock:
            if session in self.retired:
                return
            self.retired.add(session)
            counts = video_counts(session)
            if counts:
                self.video_retired.update(counts)


def video_counts(session: Any) -> dict[str, int] | None:
    video = getattr(session, "video", None)
    if video is None:
        return None
    return {k: int(getattr(video, k, 0) or 0) for k in VIDEO_OUTCOMES}
