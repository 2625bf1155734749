"""The audio app: `uvicorn server.echo_app:stream`.

An audio `ReplyOnPause` echo: speak, pause, hear your utterance back. Its VAD runs on the
shared batcher (CUDA when present, else CPU). `BATCHRTC_CONCURRENCY` sets how many sessions
it accepts (default 256).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from fastapi.responses import HTMLResponse

from .reply_on_pause import ReplyOnPause
from .stream import Stream


def echo(audio: tuple[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield the utterance back in 0.5 s pieces."""
    sr, samples = audio
    step = sr // 2
    for start in range(0, samples.shape[-1], step):
        yield sr, samples[:, start : start + step]


stream = Stream(
    ReplyOnPause(echo),
    modality="audio",
    mode="send-receive",
    concurrency_limit=int(os.environ.get("BATCHRTC_CONCURRENCY", "256")),
)


@stream.get("/", response_class=HTMLResponse)
async def index() -> str:
    return (
        "<h1>batchrtc</h1><p>ReplyOnPause echo. Connect a FastRTC WebSocket client to "
        "<code>/websocket/offer</code> (mu-law at 48 kHz in, 24 kHz out).</p>"
        f"<p>{stream.active_sessions} active session(s).</p>"
    )
