"""The /ui page may drive only the connection it opened (a `webrtc_id` is a bearer secret).

Through Gradio's own HTTP API, as a page does: an offer made through one page's Gradio
session (`server.ui_offer`) is bound to it; another session (an attacker who learned the id)
can neither set its inputs (`play`), nor stop it, nor add ICE candidates to it.
"""

from __future__ import annotations

import asyncio
import time

import gradio as gr
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from server import Stream
from tests.webrtc_client import FrameSource

seen: list = []


def see(frame: np.ndarray, level):
    seen.append(level)
    return frame


async def _ui(http: httpx.AsyncClient, base: str) -> tuple[str, dict]:
    r = await http.get(f"{base}/ui/config")
    cfg = r.json()
    prefix = f"{base}/ui{cfg.get('api_prefix', '/gradio_api')}"
    panel = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == "batchrtc-panel")
    play = next(i for i, d in enumerate(cfg["dependencies"]) if [panel, "play"] in [list(t) for t in d["targets"]])
    return prefix, {"panel": panel, "play": play}


async def _server_fn(http, prefix: str, ids: dict, page: str, fn: str, data) -> object:
    r = await http.post(f"{prefix}/component_server", json={
        "session_hash": page, "component_id": ids["panel"], "fn_name": fn, "data": data,
    })
    assert r.status_code == 200, r.text
    return r.json()


async def _play(http, prefix: str, ids: dict, page: str, webrtc_id: str, level: int) -> None:
    r = await http.post(f"{prefix}/queue/join", json={
        "data": [level, ""], "event_data": {"webrtc_id": webrtc_id}, "fn_index": ids["play"],
        "trigger_id": ids["panel"], "session_hash": page,
    })
    assert r.status_code == 200, r.text


async def test_only_the_page_that_made_a_connection_can_drive_it(serve):
    seen.clear()
    stream = Stream(see, modality="video", concurrency_limit=2,
                    additional_inputs=[gr.Slider(0, 100, value=10, label="level")])
    server = serve(stream)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("text")
    pc.addTrack(FrameSource(lambda i: np.full((120, 160, 3), 90, np.uint8), fps=10))
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        await http.get(f"{server.http}/ui/")
        prefix, ids = await _ui(http, server.http)
        try:
            await pc.setLocalDescription(await pc.createOffer())
            answer = await _server_fn(http, prefix, ids, "victim-page", "ui_offer",
                                      {"sdp": pc.localDescription.sdp, "type": "offer"})
            assert answer.get("type") == "answer", answer
            wid = answer["webrtc_id"]
            assert len(wid) >= 22  # chosen by the server, unguessable
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            deadline = time.monotonic() + 20
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert seen and seen[-1] == 10  # the default

            # another page: its play event with the victim's id sets nothing
            await _play(http, prefix, ids, "attacker-page", wid, 99)
            await asyncio.sleep(1.0)
            assert 99 not in seen[-5:], seen[-5:]
            # ... nor can it stop the victim's connection or add candidates to it
            await _server_fn(http, prefix, ids, "attacker-page", "ui_stop", {"webrtc_id": wid})
            refused = await _server_fn(http, prefix, ids, "attacker-page", "ui_candidate",
                                       {"webrtc_id": wid, "candidate": {"candidate": "candidate:1 1 udp 1 1.2.3.4 9 typ host"}})
            assert refused["meta"]["error"] == "unknown_connection"
            await asyncio.sleep(0.3)
            assert wid in stream.sessions

            # the page that made it can
            await _play(http, prefix, ids, "victim-page", wid, 42)
            deadline = time.monotonic() + 10
            while 42 not in seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert 42 in seen
            await _server_fn(http, prefix, ids, "victim-page", "ui_stop", {"webrtc_id": wid})
            deadline = time.monotonic() + 5
            while wid in stream.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert wid not in stream.sessions
        finally:
            await pc.close()
