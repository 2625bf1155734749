"""Operator settings read from the environment, in one place, validated once.

`load_settings()` reads the `BATCHRTC_*` variables each time it is called (tests change them
between servers); a `Stream` reads them once, when it is built, and keeps the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    # Video frames larger than this (width x height) end their session with a clear error.
    # Full HD: more than any webcam the default app expects; 4K frames cost ~27x a 640x480 one.
    video_max_pixels: int = 1920 * 1080
    # Pixels per second one session may send through its video handler; frames beyond it are
    # dropped (counted), so one large camera cannot starve everyone's batches. 720p at 30 fps.
    video_pixel_rate: int = 1280 * 720 * 30
    # Threads for sync handler calls, and how many may be stuck in calls nobody waits for
    # before new sessions are refused (see server/handler_pool.py).
    handler_threads: int = 256
    handler_threads_lost: int = 256
    # Public base URL (https://host[:port][/prefix]) for the telephone webhook's media-stream
    # URL. Unset: taken from the request's Host header, which a client can spoof.
    public_url: str | None = None


def load_settings() -> Settings:
    public = os.environ.get("BATCHRTC_PUBLIC_URL", "").strip() or None
    if public is not None:
        parts = urlsplit(public)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"BATCHRTC_PUBLIC_URL must be an http(s) URL like https://example.com, got {public!r}")
    return Settings(
        video_max_pixels=_int("BATCHRTC_VIDEO_MAX_PIXELS", Settings.video_max_pixels),
        video_pixel_rate=_int("BATCHRTC_VIDEO_PIXEL_RATE", Settings.video_pixel_rate),
        handler_threads=_int("BATCHRTC_HANDLER_THREADS", Settings.handler_threads),
        handler_threads_lost=_int("BATCHRTC_HANDLER_THREADS_LOST", Settings.handler_threads_lost),
        public_url=public.rstrip("/") if public else None,
    )
