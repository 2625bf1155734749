"""The Gradio `/ui` in a real headless Chromium: the page's own WebRTC client goes through
our `/webrtc/offer`, processed video plays, a slider reaches the handler, and a spoken
utterance gets a reply. Needs Chromium + Playwright: `.ci/install-browser.sh`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import httpx
import pytest

from server import AdditionalOutputs, ReplyOnPause, Stream
from tests.test_websocket_reply import echo
from tests.ui_support import (
    LEFT_RGB,
    Browser,
    launch_chromium,
    poll,
    write_speech_wav,
    write_y4m,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "test-output"
SPEECH = ROOT / "tests" / "fixtures" / "speech_pause_speech_16k.wav"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    media = tmp_path_factory.mktemp("fake-media")
    video = write_y4m(media / "two_colours.y4m")
    audio = write_speech_wav(media / "speech_48k.wav", SPEECH)
    with launch_chromium(video_file=video, audio_file=audio) as b:
        yield b
    if b.outside:
        print(f"requests to outside hosts (not resolvable here): {b.outside}")


def shot(page, name: str) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT_DIR / name), full_page=True)


def page_state(page) -> dict:
    return page.evaluate(
        "() => { const s = window.batchrtcUI; return s ? {status: s.status, logs: s.logs.slice(),"
        " errors: s.errors.slice(), webrtcId: s.webrtcId, connectionState: s.connectionState,"
        " maxReplyLevel: s.maxReplyLevel, maxMicLevel: s.maxMicLevel} : null; }"
    )


# Mean colour of a region of a <video>, drawn to a canvas: what the page really shows.
REGION_JS = """
([sel, fx, fy]) => {
  const v = document.querySelector(sel);
  if (!v || !v.videoWidth || v.readyState < 2) return null;
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0);
  const w = Math.max(4, Math.floor(c.width / 8)), h = Math.max(4, Math.floor(c.height / 8));
  const d = g.getImageData(Math.floor(fx * c.width - w / 2), Math.floor(fy * c.height - h / 2), w, h).data;
  const m = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { m[0] += d[i]; m[1] += d[i + 1]; m[2] += d[i + 2]; }
  const n = d.length / 4;
  return {w: v.videoWidth, h: v.videoHeight, paused: v.paused, rgb: m.map((x) => Math.round(x / n))};
}
"""


def close_to(rgb: list[int], want: tuple[int, int, int], tol: int = 45) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


def open_ui(browser: Browser, url: str):
    page = browser.new_page()
    page.goto(url + "/ui/", wait_until="domcontentloaded", timeout=30_000)
    page.wait_for_selector(".brtc-toggle", timeout=30_000)
    page.wait_for_function("() => window.batchrtcUI !== undefined", timeout=10_000)
    return page


def wait_sessions_closed(stream: Stream, page, timeout: float = 10.0) -> None:
    _, ok = poll(lambda: stream.active_sessions == 0, timeout, 0.1, page)
    assert ok, f"sessions still open after Stop: {list(stream.sessions)}"


def test_video_ui_processes_webcam_and_slider_reaches_handler(serve, browser: Browser) -> None:
    levels: list[float] = []
    merges: list[tuple] = []

    def invert(frame, level):
        levels.append(level)
        return 255 - frame, AdditionalOutputs(level)

    def merge(previous: str, level: float) -> str:  # FastRTC: (*previous values, *new args)
        n = int(previous.split()[0]) + 1 if previous else 1
        out = f"{n} outputs, last level {level:g}"
        merges.append((previous, out))
        return out

    slider = gr.Slider(0, 100, value=10, step=1, label="Level", elem_id="level-slider")
    seen = gr.Textbox(label="Handler saw", value="", elem_id="seen-box")
    stream = Stream(
        invert, modality="video", additional_inputs=[slider], additional_outputs=[seen],
        additional_outputs_handler=merge, ui_args={"title": "Invert (UI test)"},
    )
    server = serve(stream)
    page = open_ui(browser, server.http)
    assert page.title() == "Invert (UI test)"
    slider_input = page.locator("#level-slider input[type=range]")
    slider_input.fill("30")  # before connecting: the value sent at connect must be this one
    page.click(".brtc-toggle")

    inverted = tuple(255 - c for c in LEFT_RGB)

    def processed() -> dict | None:
        left = page.evaluate(REGION_JS, [".brtc-remote-video", 0.25, 0.5])
        right = page.evaluate(REGION_JS, [".brtc-remote-video", 0.75, 0.5])
        if left and right and not left["paused"] and close_to(left["rgb"], inverted) and right["rgb"][0] > 150:
            return {"left": left, "right": right}
        processed.last = (left, right)  # type: ignore[attr-defined]
        return None

    processed.last = None  # type: ignore[attr-defined]
    got, ok = poll(processed, 25, page=page)
    assert ok, f"no processed video in the page: last {processed.last}, state {page_state(page)}, console {browser.console[-10:]}"
    assert got["left"]["w"] > 0
    # the local preview shows the raw camera: the page really displays processed frames
    raw = page.evaluate(REGION_JS, [".brtc-local-video", 0.25, 0.5])
    assert raw and close_to(raw["rgb"], LEFT_RGB), raw
    # sent at connect: the page's value (30), not the component's initial one (10)
    _, ok = poll(lambda: levels and levels[-1] == 30, 10, 0.1, page)
    assert ok, f"the slider value was not sent at connect: {levels[-5:]}"
    n_calls = len(levels)

    webrtc_id = page_state(page)["webrtcId"]
    assert webrtc_id in stream.sessions
    _, ok = poll(lambda: page.input_value("#batchrtc-webrtc-id textarea") == webrtc_id, 10, page=page)
    assert ok, "the hidden webrtc_id textbox was not filled"

    slider_input.fill("70")
    _, ok = poll(lambda: levels and levels[-1] == 70, 10, 0.1, page)
    assert ok, f"slider value never reached the handler: {levels[-5:]}"
    assert len(levels) > n_calls
    # the additional output reaches the page through the merge handler
    _, ok = poll(lambda: "last level 70" in page.input_value("#seen-box textarea"), 10, 0.1, page)
    assert ok, f"additional output not shown: {page.input_value('#seen-box textarea')!r}"
    assert merges[0][0] == "" and all(m[0] == p[1] for p, m in zip(merges, merges[1:]))  # chained
    page.wait_for_timeout(300)
    shot(page, "ui_video.png")
    print(f"handler calls {len(levels)}, merges {len(merges)}")

    page.click(".brtc-toggle")  # Stop
    wait_sessions_closed(stream, page)
    assert page_state(page)["status"] == "Stopped"
    page.close()


def test_audio_ui_reply_on_pause(serve, browser: Browser) -> None:
    utterances: list[tuple] = []

    def echo_counted(audio):
        utterances.append(audio[1].shape)
        yield from echo(audio)

    stream = Stream(ReplyOnPause(echo_counted), modality="audio", ui_args={"title": "Echo (UI test)"})
    server = serve(stream)
    page = open_ui(browser, server.http)
    page.click(".brtc-toggle")
    t0 = time.monotonic()

    def replied() -> dict | None:
        s = page_state(page)
        if s and "Pause detected" in s["logs"] and "Responding" in s["logs"] and utterances and s["maxReplyLevel"] > 0.01:
            return s
        replied.last = s  # type: ignore[attr-defined]
        return None

    replied.last = None  # type: ignore[attr-defined]
    state, ok = poll(replied, 20, page=page)
    assert ok, f"no reply within 20 s: {replied.last}, utterances {utterances}, console {browser.console[-10:]}"
    assert "Started talking" in state["logs"]
    assert utterances[0][0] == 1 and utterances[0][1] > 48000 * 0.5, utterances  # (1, n) at 48 kHz
    assert state["maxMicLevel"] > 0.01
    log_text = page.inner_text(".brtc-log")
    assert "Pause detected" in log_text and "Responding" in log_text, log_text
    print(f"reply after {time.monotonic() - t0:.1f} s; utterances {utterances}")
    shot(page, "ui_audio.png")

    page.click(".brtc-toggle")  # Stop
    wait_sessions_closed(stream, page)
    page.close()


def test_ui_across_two_workers_with_an_engine_process(browser: Browser) -> None:
    """`uvicorn --workers 2`: a page's requests land on either worker (the browser opens several
    connections); the worker that does not serve /ui passes them on, so the page connects and
    shows frames the engine process inverted. Two pages, one after the other."""
    from tests.test_engine_process import Server

    server = Server(app="tests.engine_apps:video")
    with server:
        server.wait_ready()
        inverted = tuple(255 - c for c in LEFT_RGB)
        for _ in range(2):
            page = open_ui(browser, server.http)
            page.click(".brtc-toggle")

            def processed() -> dict | None:
                left = page.evaluate(REGION_JS, [".brtc-remote-video", 0.25, 0.5])
                if left and not left["paused"] and close_to(left["rgb"], inverted):
                    return left
                processed.last = left  # type: ignore[attr-defined]
                return None

            processed.last = None  # type: ignore[attr-defined]
            _, ok = poll(processed, 40, page=page)
            assert ok, f"no processed video: {processed.last}, state {page_state(page)}, console {browser.console[-10:]}\n{server.log_tail()}"
            page.click(".brtc-toggle")
            page.close()
        pids = {httpx.get(f"{server.http}/ui/", timeout=10).headers.get("x-worker-pid") for _ in range(12)}
        assert len(pids) == 2, pids  # both workers answered /ui requests (one of them passing them on)
    server.cleanup_log()
