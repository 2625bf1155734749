"""Both Gradio lines: FastRTC pins gradio<6, so its users' apps use the Gradio 5 API (e.g.
`gr.Chatbot(type="messages")`, which Gradio 6 rejects). These run under whichever Gradio is
installed; `.ci/gradio5-smoke.sh` runs them (and the browser tests) under the latest 5.x."""

from __future__ import annotations

import asyncio
import json
import time

import gradio as gr
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from server import ReplyOnPause, Stream
from server.ui import PAGE_MIN_GRADIO, UIUnavailable
from tests.webrtc_client import FrameSource

MAJOR = int(gr.__version__.split(".")[0])


def echo(audio, history):
    yield audio


async def test_own_blocks_are_served_at_ui(serve) -> None:
    with gr.Blocks(title="mine") as mine:
        gr.Markdown("mine", elem_id="mine")
    stream = Stream(ReplyOnPause(echo), modality="audio")
    stream.ui = mine
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        r = await http.get(f"{server.http}/ui/config")
        assert r.status_code == 200, r.text
        ids = [c.get("props", {}).get("elem_id") for c in r.json()["components"]]
        assert "mine" in ids
        assert (await http.get(f"{server.http}/ui/")).status_code == 200


@pytest.mark.skipif(MAJOR >= 6, reason="Gradio 6 rejects the Gradio 5 API (type=)")
async def test_gradio5_components_as_additional_inputs(serve) -> None:
    chat = gr.Chatbot(type="messages", value=[])  # the Gradio 5 API FastRTC demos use
    stream = Stream(ReplyOnPause(echo), modality="audio", additional_inputs=[chat],
                    additional_outputs=[chat], additional_outputs_handler=lambda old, new: new)
    assert stream.additional_inputs == [chat]
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{server.http}/health")).status_code == 200


async def test_generated_page_is_served(serve) -> None:
    """Gradio 6: the panel is a `gr.HTML` with its own script; Gradio 5: the same script from
    the page's <head>, over hidden textboxes (tests/test_ui_browser.py drives both)."""
    stream = Stream(lambda frame: frame, modality="video")
    assert isinstance(stream.ui, gr.Blocks)
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        r = await http.get(f"{server.http}/ui/config")
        assert r.status_code == 200
        ids = [c.get("props", {}).get("elem_id") for c in r.json()["components"]]
        assert "batchrtc-panel" in ids
        if MAJOR < 6:
            assert {"batchrtc-call", "batchrtc-result", "batchrtc-play", "batchrtc-submit"} <= set(ids)


def test_gradio_older_than_the_page_supports_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(gr, "__version__", "4.44.1")
    stream = Stream(lambda frame: frame, modality="video")
    with pytest.raises(UIUnavailable, match=rf"gradio>={PAGE_MIN_GRADIO}"):
        stream.ui  # noqa: B018


async def _g5_call(http: httpx.AsyncClient, base: str, cfg: dict, page: str, fn: str, data) -> dict:
    """What bridge.js does: a server function through the page's hidden `call` textbox (its
    change event in the page's Gradio session), the answer read from that session's stream."""
    ids = {c["props"].get("elem_id"): c["id"] for c in cfg["components"] if c.get("props")}
    fn_index = next(i for i, d in enumerate(cfg["dependencies"])
                    if [ids["batchrtc-call"], "change"] in [list(t) for t in d["targets"]])
    prefix = f"{base}{cfg.get('api_prefix', '/gradio_api')}"
    r = await http.post(f"{prefix}/queue/join", json={
        "data": [json.dumps({"id": 1, "fn": fn, "data": data})], "fn_index": fn_index,
        "trigger_id": ids["batchrtc-call"], "session_hash": page, "event_data": None})
    assert r.status_code == 200, r.text
    async with http.stream("GET", f"{prefix}/queue/data", params={"session_hash": page}) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return json.loads(msg["output"]["data"][0])
    raise AssertionError("no answer")


@pytest.mark.skipif(MAJOR >= 6, reason="Gradio 6: tests/test_hardening_ui.py")
async def test_gradio5_only_the_page_that_made_a_connection_can_stop_it(serve) -> None:
    stream = Stream(lambda frame: frame, modality="video", concurrency_limit=2)
    server = serve(stream)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("text")
    pc.addTrack(FrameSource(lambda i: np.full((120, 160, 3), 90, np.uint8), fps=10))
    base = f"{server.http}/ui"
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        cfg = (await http.get(f"{base}/config")).json()
        try:
            await pc.setLocalDescription(await pc.createOffer())
            answer = await _g5_call(http, base, cfg, "victim", "ui_offer", {"sdp": pc.localDescription.sdp, "type": "offer"})
            result = answer["result"]
            assert result.get("type") == "answer", answer
            wid = result["webrtc_id"]
            await pc.setRemoteDescription(RTCSessionDescription(result["sdp"], "answer"))
            assert wid in stream.sessions
            await _g5_call(http, base, cfg, "attacker", "ui_stop", {"webrtc_id": wid})
            refused = await _g5_call(http, base, cfg, "attacker", "ui_candidate", {"webrtc_id": wid, "candidate": None})
            assert refused["result"]["meta"]["error"] == "unknown_connection"
            await asyncio.sleep(0.3)
            assert wid in stream.sessions  # the attacker's stop did nothing
            await _g5_call(http, base, cfg, "victim", "ui_stop", {"webrtc_id": wid})
            deadline = time.monotonic() + 5
            while wid in stream.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert wid not in stream.sessions
        finally:
            await pc.close()
