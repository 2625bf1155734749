"""The audio app: `uvicorn server.echo_app:stream`.

An audio `ReplyOnPause` echo: speak, pause, hear your utterance back. Its VAD runs on the
shared batcher (CUDA when present, else CPU). `BATCHRTC_CONCURRENCY` sets how many sessions
it accepts (default 256).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from fastapi.responses import HTMLResponse

from .reply_on_pause import ReplyOnPause
from .config import load_settings
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
    concurrency_limit=load_settings().concurrency or 256,
    ui_args={
        "title": "ReplyOnPause echo",
        "subtitle": "Press Start and allow the microphone, say a sentence, then pause: "
        "about a second later you hear it back. Speak again to interrupt.",
    },
)


@stream.get("/", response_class=HTMLResponse)
async def index() -> str:
    return (
        "<h1>batchrtc: ReplyOnPause echo</h1>"
        '<p>Open <a href="/ui">/ui</a> to try it: press Start, speak, pause, and hear yourself '
        "back. Clients connect with FastRTC's <code>POST /webrtc/offer</code> "
        '(<a href="/webrtc/docs">docs</a>) or a WebSocket at <code>/websocket/offer</code> '
        '(mu-law at 48 kHz in, 24 kHz out; <a href="/websocket/docs">docs</a>).</p>'
        f"<p>{stream.active_sessions} active session(s).</p>"
    )
