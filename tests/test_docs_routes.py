"""The `/…/docs` pages: they render, say the right things for the stream, and their examples
work: each page's `<pre><code id="example">` is extracted from the served HTML and run
against a real server with real speech."""

from __future__ import annotations

import html
import json
import re

import httpx
import numpy as np
from fastapi import FastAPI

from server import ReplyOnPause, Stream, docs
from tests.audio_fixtures import FIXTURES_DIR
from tests.test_websocket_reply import best_match, echo
from tests.waiting import wait_for

SPANS = json.loads((FIXTURES_DIR / "speech_spans.json").read_text())
SPEECH = "speech_pause_speech_16k.wav"


def extract(page: str, block: str = "example") -> str:
    m = re.search(rf'<pre><code id="{block}">(.*?)</code></pre>', page, re.S)
    assert m, f"no {block} block"
    return html.unescape(m.group(1))


def load_example(code: str, name: str) -> dict:
    """Run the served code as a module (everything but its `__main__` block)."""
    ns: dict = {"__name__": f"docs_example_{name}"}
    exec(compile(code, f"<{name} example>", "exec"), ns)
    return ns


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url)


def assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(https?:)?//', page), "pages load nothing from outside"


async def test_pages_render_with_the_streams_settings(serve):
    stream = Stream(ReplyOnPause(echo, output_sample_rate=16000), modality="audio",
                    concurrency_limit=3, time_limit=90)
    server = serve(stream)

    r = await get(f"{server.http}/websocket/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert_self_contained(page)
    assert "/websocket/offer" in page and f"{server.ws}/websocket/offer" in page
    for name in ("start", "websocket_id", "media", "payload", "stop", "ping", "pong",
                 "concurrency_limit_reached", "connection_already_exists", "unknown_connection",
                 "invalid_candidate_format", "invalid_sdp", "mu-law", "48000 Hz", "16000 Hz",
                 "send_input", "fetch_output", "end_stream", "log", "started_talking", "1008", "1009"):
        assert name in page, name
    assert "send-receive" in page and "90" in page and ">3 connection(s)" in page

    r = await get(f"{server.http}/webrtc/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert_self_contained(page)
    assert "/webrtc/offer" in page and f"{server.http}/webrtc/offer" in page
    for name in ("webrtc_id", "sdp", "ice-candidate", "candidate", "answer",
                 "concurrency_limit_reached", "connection_already_exists", "unknown_connection",
                 "invalid_candidate_format", "invalid_sdp", "Opus", "48000 Hz", "16000 Hz",
                 "send_input", "fetch_output", "stopword", "error", "warning", "log",
                 "update_connection", "end_stream", "message", "set_input", "aiortc", "httpx"):
        assert name in page, name

    r = await get(f"{server.http}/telephone/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert_self_contained(page)
    for name in ("/telephone/incoming", "/telephone/handler", "streamSid", "connected", "start",
                 "media", "mark", "stop", "clear", "8000 Hz", "mu-law", "concurrency_limit_reached",
                 "connection_already_exists", "unknown_connection", "invalid_candidate_format",
                 "invalid_sdp", "fastphone"):
        assert name in page, name
    # The TwiML shown is the TwiML served.
    twiml = extract(page, "twiml")
    async with httpx.AsyncClient() as client:
        served = (await client.post(f"{server.http}/telephone/incoming")).text
    assert twiml == served
    assert f'url="{server.ws}/telephone/handler"' in twiml
    # The message sequence is valid JSON, one message per line.
    for line in extract(page, "sequence").splitlines():
        if ": {" in line:
            json.loads(line.split(": ", 1)[1])


async def test_pages_follow_the_mount_path_and_modality(serve):
    video = Stream(lambda frame: frame, modality="video", mode="send-receive")
    app = FastAPI()
    video.mount(app, "/rtc")
    server = serve(app)
    page = (await get(f"{server.http}/rtc/webrtc/docs")).text
    assert f"{server.http}/rtc/webrtc/offer" in page
    assert 'MODALITY = "video"' in extract(page)
    page = (await get(f"{server.http}/rtc/websocket/docs")).text
    assert f"{server.ws}/rtc/websocket/offer" in page and "audio only" in page
    page = (await get(f"{server.http}/rtc/telephone/docs")).text
    assert "unsupported_modality" in page and "/rtc/telephone/incoming" in page
    assert (await get(f"{server.http}/webrtc/docs")).status_code == 404


def test_examples_are_real_modules_served_with_the_streams_constants():
    from server.docs.examples import telephone_client, webrtc_client, websocket_client

    stream = Stream(ReplyOnPause(echo, input_sample_rate=16000), modality="audio")
    code = docs.websocket_example(stream.config, "ws://h/websocket/offer")
    assert 'URL = "ws://h/websocket/offer"' in code and "INPUT_RATE = 16000" in code
    assert "OUTPUT_RATE = 24000" in code
    assert "def ulaw_encode" in code and "from ._audio" not in code  # one script to copy
    for code in (docs.websocket_example(stream.config), docs.webrtc_example(stream.config),
                 docs.telephone_example(stream.config)):
        compile(code, "example", "exec")
    # the modules themselves import and run (the tests below run what the pages serve)
    assert websocket_client.main and webrtc_client.main and telephone_client.main
    # A hostile Host header stays inside the example's string literal.
    odd = 'ws://x"; import os  # \\/websocket/offer'
    assert load_example(docs.websocket_example(stream.config, odd), "odd")["URL"] == odd


async def test_websocket_example_gets_replies(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=2)
    server = serve(stream)
    page = (await get(f"{server.http}/websocket/docs")).text
    code = extract(page)
    assert code == docs.websocket_example(stream.config, f"{server.ws}/websocket/offer")
    example = load_example(code, "websocket")
    wav = str(FIXTURES_DIR / SPEECH)  # 16 kHz: the example resamples to the stream's 48 kHz
    result = await example["main"](example["URL"], wav)

    logs = [m.get("data") for m in result["messages"] if m.get("type") == "log"]
    assert logs.count("pause_detected") == 2, logs
    assert not [m for m in result["messages"] if m.get("type") == "error"]
    reply, rate = result["reply"], result["rate"]
    assert rate == 24000
    speech = sum(e - s for s, e in SPANS[SPEECH])
    assert speech < len(reply) / rate < speech + 4 * 0.6 + 0.5, len(reply) / rate
    # The reply is the speech we sent (resampled and mu-law coded on the way).
    from tests.audio_fixtures import load_wav
    from scipy.signal import resample_poly

    _, x = load_wav(SPEECH)
    sent = resample_poly(x.astype(np.float64), 3, 2)
    first = reply[: int(1.5 * rate)]
    _, corr = best_match(sent, first)
    assert corr > 0.9, corr


async def test_telephone_example_call_is_answered(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=2)
    server = serve(stream)
    page = (await get(f"{server.http}/telephone/docs")).text
    code = extract(page)
    assert code == docs.telephone_example(stream.config, server.http)
    example = load_example(code, "telephone")
    result = await example["main"](example["BASE_URL"], str(FIXTURES_DIR / SPEECH))

    assert result["stream_url"] == f"{server.ws}/telephone/handler"
    assert result["stream_sids"] == {result["stream_sid"]}
    logs = [m.get("data") for m in result["messages"] if m.get("type") == "log"]
    assert logs.count("pause_detected") == 2, logs
    assert not [m for m in result["messages"] if m.get("type") == "error"]
    speech = sum(e - s for s, e in SPANS[SPEECH])
    assert result["rate"] == 8000
    assert speech < len(result["reply"]) / 8000 < speech + 4 * 0.6 + 0.5
    await wait_for(lambda: stream.active_sessions == 0, 2.5)  # the server side ends the call just after the socket closes


async def test_webrtc_example_audio_round_trip(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=2)
    server = serve(stream)
    page = (await get(f"{server.http}/webrtc/docs")).text
    code = extract(page)
    assert code == docs.webrtc_example(stream.config, server.http)
    example = load_example(code, "webrtc")
    result = await example["main"](example["BASE_URL"], str(FIXTURES_DIR / SPEECH))

    logs = [m.get("data") for m in result["messages"] if m.get("type") == "log"]
    assert logs.count("pause_detected") == 2, logs
    speech = sum(e - s for s, e in SPANS[SPEECH])
    assert result["loud_audio_seconds"] > 0.6 * speech, result["loud_audio_seconds"]


def invert(frame: np.ndarray) -> np.ndarray:
    return 255 - frame


async def test_webrtc_example_video_round_trip(serve):
    stream = Stream(invert, modality="video", concurrency_limit=2)
    server = serve(stream)
    code = extract((await get(f"{server.http}/webrtc/docs")).text)
    example = load_example(code, "webrtc_video")
    result = await example["main"](example["BASE_URL"], None, 4.0)
    assert result["video_frames"] >= 10, result["video_frames"]
    # Mostly the pattern's orange background (200, 128, 0), inverted by the handler.
    median = np.median(result["last_frame"].reshape(-1, 3), axis=0)
    assert np.abs(median - np.array([55, 127, 255])).max() < 30, median
