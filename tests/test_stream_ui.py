"""`Stream.ui` is the `gr.Blocks` that `/ui` serves (FastRTC's `stream.ui`): extended with
`with stream.ui:`, replaced with `stream.ui = blocks`, served alone with `stream.ui.launch()`;
a component in both additional_inputs and additional_outputs; `Stream.handlers`,
`Stream.webrtc_component`, `from server import WebRTC`. Real uvicorn/Gradio servers, real
HTTP clients and a real aiortc peer connection."""

from __future__ import annotations

import asyncio
import socket
import time

import gradio as gr
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from server import AdditionalOutputs, Stream
from tests.webrtc_client import FrameSource


def ids_of(cfg: dict) -> dict[str, int]:
    """elem_id -> component id in a Gradio config."""
    return {c["props"]["elem_id"]: c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id")}


async def config(http: httpx.AsyncClient, base: str) -> dict:
    r = await http.get(f"{base}/config")
    assert r.status_code == 200, r.text
    return r.json()


async def offer_through_page(http: httpx.AsyncClient, base: str, cfg: dict, pc: RTCPeerConnection) -> str:
    """What the page's panel does: its offer through its own Gradio session (`ui_offer`)."""
    prefix = f"{base}{cfg.get('api_prefix', '/gradio_api')}"
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post(f"{prefix}/component_server", json={
        "session_hash": "page-1", "component_id": ids_of(cfg)["batchrtc-panel"], "fn_name": "ui_offer",
        "data": {"sdp": pc.localDescription.sdp, "type": "offer"},
    })
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer.get("type") == "answer", answer
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    return answer["webrtc_id"]


def video_peer() -> RTCPeerConnection:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("text")
    pc.addTrack(FrameSource(lambda i: np.full((120, 160, 3), 90, np.uint8), fps=10))
    return pc


async def until(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return bool(cond())


def test_ui_is_the_blocks_and_built_once() -> None:
    stream = Stream(lambda frame: frame, modality="video")
    assert stream.ui_app.default is None  # nothing built until asked for
    ui = stream.ui
    assert isinstance(ui, gr.Blocks)
    assert stream.ui is ui
    assert stream.webrtc_component in ui.blocks.values()
    with pytest.raises(TypeError, match="gradio.Blocks"):
        stream.ui = "not blocks"  # type: ignore[assignment]


async def test_with_stream_ui_extension_is_what_ui_serves(serve) -> None:
    clicks: list[tuple[str, bool]] = []
    stream = Stream(lambda frame: frame, modality="video", concurrency_limit=2)

    def clicked(webrtc_id: str) -> str:
        # FastRTC's pattern: the webrtc component as an event input gives the connection's id
        clicks.append((webrtc_id, webrtc_id in stream.handlers))
        return f"clicked {webrtc_id}"

    with stream.ui as demo:
        out = gr.Textbox(elem_id="extra-out")
        gr.Button("Extra", elem_id="extra-btn").click(clicked, inputs=[stream.webrtc_component], outputs=[out])
    assert demo is stream.ui
    server = serve(stream)
    pc = video_peer()
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        assert (await http.get(f"{server.http}/ui/")).status_code == 200
        cfg = await config(http, f"{server.http}/ui")
        ids = ids_of(cfg)
        assert {"batchrtc-panel", "extra-btn", "extra-out"} <= ids.keys()
        try:
            wid = await offer_through_page(http, f"{server.http}/ui", cfg, pc)
            assert await until(lambda: wid in stream.handlers)
            assert stream.handlers[wid] is stream.sessions[wid].handler
            # the extension's event through Gradio's API, as the page's click sends it
            fn_index = next(i for i, d in enumerate(cfg["dependencies"])
                            if [ids["extra-btn"], "click"] in [list(t) for t in d["targets"]])
            r = await http.post(f"{server.http}/ui/gradio_api/run/predict", json={
                "data": [wid], "fn_index": fn_index, "session_hash": "page-1",
            })
            assert r.status_code == 200, r.text
            assert r.json()["data"] == [f"clicked {wid}"]
            assert clicks == [(wid, True)]
            # the page's Stop ends the session: gone from `handlers` too
            r = await http.post(f"{server.http}/ui/gradio_api/component_server", json={
                "session_hash": "page-1", "component_id": ids["batchrtc-panel"], "fn_name": "ui_stop",
                "data": {"webrtc_id": wid}})
            assert r.status_code == 200, r.text
            assert await until(lambda: wid not in stream.handlers)
            assert len(stream.handlers) == 0 and list(stream.handlers) == [] and stream.handlers.get(wid) is None
        finally:
            await pc.close()


async def test_assigned_blocks_are_served_even_after_ui_was_mounted(serve) -> None:
    stream = Stream(lambda frame: frame, modality="video")
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        assert "batchrtc-panel" in ids_of(await config(http, f"{server.http}/ui"))
        with gr.Blocks() as mine:
            gr.Markdown("mine", elem_id="mine")
        stream.ui = mine  # FastRTC's `stream.ui = demo`
        assert stream.ui is mine
        ids = ids_of(await config(http, f"{server.http}/ui"))
        assert "mine" in ids and "batchrtc-panel" not in ids
        page = await http.get(f"{server.http}/ui/")
        assert page.status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_launch_serves_the_page_and_runs_the_stream() -> None:
    """`stream.ui.launch()` (FastRTC demos' `__main__`): a Gradio server for the Blocks, with
    the stream's lifespan, so the page's connection really runs the handler."""
    seen: list[int] = []

    def handler(frame):
        seen.append(int(frame.mean()))
        return frame

    stream = Stream(handler, modality="video")
    port = free_port()
    await asyncio.to_thread(stream.ui.launch, server_name="127.0.0.1", server_port=port,
                            prevent_thread_lock=True, quiet=True)
    pc = video_peer()
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
            cfg = await config(http, base)
            wid = await offer_through_page(http, base, cfg, pc)
            assert await until(lambda: len(seen) > 3), "the handler never ran"
            assert wid in stream.sessions
    finally:
        await pc.close()
        await asyncio.to_thread(stream.ui.close)


async def test_a_component_both_input_and_output_renders_once_and_feeds_back(serve) -> None:
    """A transcript box fed back as input (FastRTC demos): /ui renders (no
    DuplicateBlockError 500), the box is the play event's input and output, and its change
    event sends it to the handler."""
    texts: list[str] = []

    def handler(frame, text, level):
        texts.append(text)
        return frame, AdditionalOutputs(f"{text}+")

    box = gr.Textbox(value="start", elem_id="shared-box")
    level = gr.Slider(0, 10, value=3, elem_id="level")
    stream = Stream(handler, modality="video", additional_inputs=[box, level], additional_outputs=[box],
                    additional_outputs_handler=lambda old, new: new)
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        r = await http.get(f"{server.http}/ui/")
        assert r.status_code == 200, r.text[:500]
        cfg = await config(http, f"{server.http}/ui")
        ids = ids_of(cfg)
        assert sum(1 for c in cfg["components"] if c.get("props", {}).get("elem_id") == "shared-box") == 1
        deps = cfg["dependencies"]
        play = next(d for d in deps if [ids["batchrtc-panel"], "play"] in [list(t) for t in d["targets"]])
        assert ids["shared-box"] in play["inputs"] and ids["shared-box"] in play["outputs"]
        change = next(d for d in deps if [ids["shared-box"], "change"] in [list(t) for t in d["targets"]])
        assert ids["shared-box"] in change["inputs"] and ids["level"] in change["inputs"]
        assert next(c for c in cfg["components"] if c["id"] == ids["shared-box"])["props"].get("interactive") is not False

        # The page's round trip through Gradio's API: the change event (what the browser sends
        # when the output updated the box) sets the handler's input.
        pc = video_peer()
        try:
            wid = await offer_through_page(http, f"{server.http}/ui", cfg, pc)
            fn_index = deps.index(change)
            r = await http.post(f"{server.http}/ui/gradio_api/queue/join", json={
                "data": [wid, "start+", 3], "fn_index": fn_index, "trigger_id": ids["shared-box"],
                "session_hash": "page-1",
            })
            assert r.status_code == 200, r.text
            assert await until(lambda: "start+" in texts), texts[-5:]
        finally:
            await pc.close()


def test_webrtc_component_import_names_the_alternative() -> None:
    with pytest.raises(ImportError, match=r"with stream\.ui as demo"):
        from server import WebRTC  # noqa: F401
    import server

    with pytest.raises(AttributeError):
        server.NoSuchName  # noqa: B018
