"""The threads the server runs work on, one named executor per purpose, each sized by a rule.

- `handler-N` (`handler_pool.HandlerPool`, one per stream): sync handler calls (`receive`,
  `emit`, per-frame video functions, sync generators of replies). A FastRTC sync `emit` may
  block waiting for output, so a call can hold a thread for as long as a session lives: the
  rule is one thread per call that may block at once, `BATCHRTC_HANDLER_THREADS` (256) of
  them, and a call given up on is replaced rather than waited for.
- `media-N` (`media_executor()`, process-wide): video frame conversions (swscale, which
  releases the GIL: pure CPU work): one thread per CPU core, as more cannot run at once.
- `batcher-NAME` (`batching.DynamicBatcher`): one thread per batcher, so a stateful model's
  batches run strictly one after another.
- `rtc-config-N` (`config_executor()`, process-wide, 4 threads): an app's sync
  `server_rtc_configuration` callable, once per offer. It may call a TURN provider's API; one
  that hangs holds these threads, never the default executor's.
- asyncio's default executor: short blocking setup work (loading a model at start, building
  the `/ui`), never per-frame work.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_media: ThreadPoolExecutor | None = None
_config: ThreadPoolExecutor | None = None
_lock = threading.Lock()
CONFIG_THREADS = 4


def media_threads() -> int:
    """One per usable core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def media_executor() -> ThreadPoolExecutor:
    global _media
    with _lock:
        if _media is None:
            _media = ThreadPoolExecutor(max_workers=media_threads(), thread_name_prefix="media")
        return _media


def config_executor() -> ThreadPoolExecutor:
    global _config
    with _lock:
        if _config is None:
            _config = ThreadPoolExecutor(max_workers=CONFIG_THREADS, thread_name_prefix="rtc-config")
        return _config
