"""Both Gradio lines: FastRTC pins gradio<6, so its users' apps use the Gradio 5 API (e.g.
`gr.Chatbot(type="messages")`, which Gradio 6 rejects). These run under whichever Gradio is
installed; `.ci/gradio5-smoke.sh` runs them (and the browser tests) under the latest 5.x."""

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
