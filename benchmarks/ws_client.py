"""A FastRTC WebSocket client for the tests and the benchmarks: streams mu-law audio at real-time
pace and records what comes back (media with arrival times, and data-channel messages)."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import websockets

from server.codecs import ulaw_decode, ulaw_encode


@dataclass
class Received:
    media: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, int16)
    messages: list[dict] = field(default_factory=list)
    started: float = 0.0
    close_code: int | None = None

    def replies(self, gap_s: float = 0.4, rate: int = 24000) -> list[tuple[float, np.ndarray]]:
        """Group media into replies: a new reply starts when arrivals pause for `gap_s`
        longer than the audio already sent would take to play."""
        out: list[tuple[float, list[np.ndarray]]] = []
        play_end = -1e9
        for t, pcm in self.media:
            if t > play_end + gap_s:
                out.append((t, []))
                play_end = t
            out[-1][1].append(pcm)
            play_end = max(play_end, t) + pcm.size / rate
        return [(t, np.concatenate(chunks)) for t, chunks in out]


async def stream_audio(
    url: str,
    ws_id: str,
    pcm: np.ndarray,
    rate: int,
    *,
    frame_ms: int = 20,
    tail_s: float = 2.0,
    realtime: bool = True,
    start_message: dict | None = None,
    on_message: Callable[[dict], Any] | None = None,
) -> Received:
    """Send `pcm` (int16 at `rate`) in `frame_ms` frames at real-time pace, keep listening
    `tail_s` after the last frame, send `stop`, and return what arrived. `on_message` is
    called with each data-channel message as it arrives (awaited if it is a coroutine
    function), e.g. to answer `send_input`."""
    rec = Received()
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps(start_message or {"event": "start", "websocket_id": ws_id}))
        rec.started = time.monotonic()

        async def reader() -> None:
            try:
                async for raw in ws:
                    now = time.monotonic() - rec.started
                    msg = json.loads(raw)
                    if msg.get("event") == "media":
                        rec.media.append((now, ulaw_decode(base64.b64decode(msg["media"]["payload"]))))
                    else:
                        rec.messages.append(msg)
                        if on_message is not None:
                            res = on_message(msg)
                            if inspect.isawaitable(res):
                                await res
            except websockets.ConnectionClosed as e:
                rec.close_code = e.rcvd.code if e.rcvd else None

        task = asyncio.create_task(reader())
        step = rate * frame_ms // 1000
        for i, start in enumerate(range(0, pcm.size, step)):
            if realtime:
                delay = rec.started + i * frame_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            payload = base64.b64encode(ulaw_encode(pcm[start : start + step])).decode()
            try:
                await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
            except websockets.ConnectionClosed:
                break  # the server ended the session (time limit, CloseStream, refusal)
        await asyncio.sleep(tail_s)
        try:
            await ws.send(json.dumps({"event": "stop"}))
        except websockets.ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.TimeoutError:
            task.cancel()
    return rec
