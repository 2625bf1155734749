"""Real-browser plumbing for the `/ui` tests: headless Chromium (Debian's) driven by
Playwright, fake camera/microphone fed from files we write, and no network but loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

INSTALL_HINT = "run .ci/install-browser.sh (apt: chromium; pip: playwright)"

# Left half / right half of the fake camera picture (RGB): inverted, they become cyan / yellow.
LEFT_RGB = (220, 30, 30)
RIGHT_RGB = (30, 30, 220)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    # Nothing but loopback resolves: the page cannot reach outside hosts (done in the
    # browser, not with Playwright request routing, which would stall every request
    # while the test thread sleeps).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]


def chromium_path() -> str:
    """Debian's Chromium (or `BATCHRTC_CHROMIUM`); a clear failure, never a skip, without it."""
    candidates = [os.environ.get("BATCHRTC_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    pytest.fail(f"Chromium not found (looked for {[c for c in candidates if c]}): {INSTALL_HINT}", pytrace=False)


def write_y4m(path: Path, width: int = 320, height: int = 240, frames: int = 4) -> Path:
    """A still two-colour picture as Y4M (4:2:0, full-range BT.601, as `C420jpeg` means)."""
    rgb = np.zeros((height, width, 3), np.float64)
    rgb[:, : width // 2] = LEFT_RGB
    rgb[:, width // 2 :] = RIGHT_RGB
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128

    def sub(p: np.ndarray) -> np.ndarray:
        return p.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.round(p), 0, 255).astype(np.uint8).tobytes() for p in (y, sub(u), sub(v))]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n")
            for p in planes:
                f.write(p)
    return path


def write_speech_wav(path: Path, source: Path, tail_s: float = 3.0) -> Path:
    """The 16 kHz speech fixture at 48 kHz mono int16, then `tail_s` of silence (Chromium
    loops the file)."""
    from scipy.signal import resample_poly

    with wave.open(str(source), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, source
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    y = resample_poly(x, 48000 // rate, 1) if rate != 48000 else x
    y = np.concatenate([y, np.zeros(int(tail_s * 48000))])
    pcm = np.clip(np.round(y), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(pcm.tobytes())
    return path


class Browser:
    """One Chromium with a fresh profile; records what its pages tried to reach outside."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.outside: list[str] = []
        self.console: list[str] = []

    def new_page(self) -> Any:
        page = self.context.new_page()
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        return page


@contextlib.contextmanager
def launch_chromium(*, video_file: Path | None = None, audio_file: Path | None = None) -> Iterator[Browser]:
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the playwright package is missing ({e}): {INSTALL_HINT}", pytrace=False)
    flags = list(CHROMIUM_FLAGS)
    if video_file is not None:
        flags.append(f"--use-file-for-fake-video-capture={video_file}")
    if audio_file is not None:
        flags.append(f"--use-file-for-fake-audio-capture={audio_file}")
    profile = tempfile.mkdtemp(prefix="batchrtc-chromium-")
    try:
        with sync_playwright() as p:
            # Playwright drives our Chromium; it never downloads one (`playwright install`
            # is not used anywhere). A persistent context is how it takes a fresh
            # --user-data-dir.
            context = p.chromium.launch_persistent_context(
                profile, executable_path=exe, headless=True, args=flags, viewport={"width": 1280, "height": 900}
            )
            browser = Browser(context)

            def outside(request: Any) -> None:  # recorded only; the resolver rules block them
                url = request.url
                host = urlsplit(url).hostname or ""
                if not url.startswith(("data:", "blob:")) and host not in ("127.0.0.1", "localhost", "::1"):
                    browser.outside.append(url)

            context.on("request", outside)
            try:
                yield browser
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def poll(fn: Callable[[], Any], timeout: float, interval: float = 0.2, page: Any = None) -> tuple[Any, bool]:
    """Call `fn` until it returns something truthy or `timeout` passes: (last value, ok).
    With `page`, waits through Playwright so its events keep being delivered meanwhile."""
    deadline = time.monotonic() + timeout
    value = fn()
    while not value and time.monotonic() < deadline:
        if page is not None:
            page.wait_for_timeout(interval * 1000)
        else:
            time.sleep(interval)
        value = fn()
    return value, bool(value)
