"""Both Gradio lines: FastRTC pins gradio<6, so its users' apps use the Gradio 5 API (e.g.
`gr.Chatbot(type="messages")`, which Gradio 6 rejects). These run under whichever Gradio is
installed; `.ci/gradio5-smoke.sh` runs them under the latest 5.x too."""

from __future__ import annotations

import gradio as gr
import httpx
import pytest

from server import ReplyOnPause, Stream
from server.ui import PAGE_MIN_GRADIO, UIUnavailable

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


@pytest.mark.skipif(MAJOR >= PAGE_MIN_GRADIO, reason="the generated page is built on this Gradio")
async def test_generated_page_on_gradio5_is_a_clear_error(serve) -> None:
    stream = Stream(lambda frame: frame, modality="video")
    with pytest.raises(UIUnavailable, match=r"gradio>=6"):
        stream.ui  # noqa: B018
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        r = await http.get(f"{server.http}/ui/")
        assert r.status_code == 501 and "gradio>=6" in r.text, (r.status_code, r.text)
        assert (await http.get(f"{server.http}/health")).status_code == 200  # the rest serves on


@pytest.mark.skipif(MAJOR < PAGE_MIN_GRADIO, reason="the generated page needs Gradio 6")
async def test_generated_page_on_gradio6(serve) -> None:
    stream = Stream(lambda frame: frame, modality="video")
    assert isinstance(stream.ui, gr.Blocks)
    server = serve(stream)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        r = await http.get(f"{server.http}/ui/config")
        assert r.status_code == 200
        assert "batchrtc-panel" in [c.get("props", {}).get("elem_id") for c in r.json()["components"]]
