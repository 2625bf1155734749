"""`Stream.ui` in a real headless Chromium (both Gradio lines: `.ci/gradio5-smoke.sh`): a
component in both additional_inputs and additional_outputs is shown once, the handler's
output updates it and the page sends it back as input; a button added with
`with stream.ui:` gets the connection's id from `stream.webrtc_component`."""

from __future__ import annotations

import gradio as gr
import pytest

from server import AdditionalOutputs, Stream
from tests.test_ui_browser import browser, open_ui, page_state, wait_sessions_closed  # noqa: F401
from tests.ui_support import Browser, poll

pytestmark = pytest.mark.timeout(120)


def test_fed_back_component_and_extension_in_the_page(serve, browser: Browser) -> None:  # noqa: F811
    texts: list[str] = []

    def handler(frame, text):
        texts.append(text)
        if text == "start":
            return frame, AdditionalOutputs("fed back")
        return frame

    box = gr.Textbox(value="start", label="Transcript", elem_id="shared-box")
    stream = Stream(handler, modality="video", additional_inputs=[box], additional_outputs=[box],
                    additional_outputs_handler=lambda old, new: new)
    clicks: list[tuple[str, bool]] = []

    def clicked(webrtc_id: str) -> str:
        clicks.append((webrtc_id, webrtc_id in stream.webrtc_component.handlers))
        return "clicked"

    with stream.ui:
        out = gr.Textbox(label="Extra", elem_id="extra-out")
        gr.Button("Extra", elem_id="extra-btn").click(clicked, inputs=[stream.webrtc_component], outputs=[out])

    server = serve(stream)
    page = open_ui(browser, server.http)
    assert page.locator("#shared-box").count() == 1  # rendered once, no DuplicateBlockError
    page.click(".brtc-toggle")
    _, ok = poll(lambda: "fed back" in texts, 30, 0.1, page)
    assert ok, f"the output never came back as input: {texts[-5:]}, state {page_state(page)}, console {browser.console[-10:]}"
    assert texts[0] == "start"
    assert page.input_value("#shared-box textarea") == "fed back"

    page.click("#extra-btn")
    _, ok = poll(lambda: clicks, 10, 0.1, page)
    assert ok, "the extension's click never ran"
    assert clicks[0] == (page_state(page)["webrtcId"], True)
    _, ok = poll(lambda: page.input_value("#extra-out textarea") == "clicked", 10, 0.1, page)
    assert ok

    page.click(".brtc-toggle")  # Stop
    wait_sessions_closed(stream, page)
    page.close()
