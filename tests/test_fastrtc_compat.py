"""FastRTC 0.0.34's own offer tests (`test/test_webrtc_connection_mixin.py`, `test_stream.py`),
case for case, against this server with real aiortc peers over HTTP; and the API surface a
FastRTC app relies on. Where FastRTC answers by raising (a 500), this server answers 4xx in
FastRTC's failure shape; an unknown modality fails when the Stream is built, not at the
first offer (both listed in the README's differences)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
import numpy as np
import pytest
import websockets
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from fastapi import FastAPI

from server import (
    AdditionalOutputs,
    AudioVideoStreamHandler,
    ReplyOnPause,
    Stream,
    StreamHandler,
    VideoStreamHandler,
)
from server.video import batched
from tests.waiting import wait_for
from tests.webrtc_client import AudioSource, FrameSource, connect


class Echo(StreamHandler):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list = []

    def receive(self, frame) -> None:
        self.frames.append(frame)

    def emit(self):
        return self.frames.pop(0) if self.frames else None

    def copy(self) -> Echo:
        return Echo()


def make_stream(**params) -> Stream:
    modality = params.get("modality", "video")
    handler = Echo() if modality == "audio" else (lambda x: x)
    return Stream(handler, **params)


async def setup_peer_connection(audio: bool = False, video: bool = False) -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.createDataChannel("test-data-channel")
    if audio:
        pc.addTrack(AudioStreamTrack())
    if video:
        pc.addTrack(VideoStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def send_offer(pc, base: str, *, audio=False, video=False, webrtc_id="test_id", response_code=200,
                     return_status_and_metadata=False):
    body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
    if webrtc_id is not None:
        body["webrtc_id"] = webrtc_id
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{base}/webrtc/offer", json=body)
    assert response.status_code == response_code, response.text
    out = response.json()
    if response_code != 200:
        return out
    if return_status_and_metadata:
        assert "status" in out and "meta" in out
        return out["status"], out["meta"]
    assert out.get("type") == "answer", out
    assert "webrtc-datachannel" in out["sdp"]
    if audio:
        assert "m=audio" in out["sdp"]
    if video:
        assert "m=video" in out["sdp"]
    await pc.setRemoteDescription(RTCSessionDescription(out["sdp"], out["type"]))
    await asyncio.sleep(0.5)
    return out


async def close_peer_connection(pc) -> None:
    await pc.close()
    assert pc.connectionState == "closed"
    assert pc.signalingState == "closed"


@pytest.mark.parametrize("audio", [True, False])
async def test_successful_connection_audio(serve, audio):
    server = serve(make_stream(modality="audio"))
    pc = await setup_peer_connection(audio)
    await send_offer(pc, server.http, audio=audio)
    await close_peer_connection(pc)


@pytest.mark.parametrize("video", [True, False])
async def test_successful_connection_video(serve, video):
    server = serve(make_stream(modality="video"))
    pc = await setup_peer_connection(video=video)
    await send_offer(pc, server.http, video=video)
    await close_peer_connection(pc)


@pytest.mark.parametrize("audio", [True, False])
async def test_unsuccessful_connection_audio(serve, audio):
    stream = make_stream(modality="audio")
    server = serve(stream)
    pc = await setup_peer_connection(audio=audio, video=True)
    out = await send_offer(pc, server.http, audio=audio, video=True, response_code=400)
    assert out["status"] == "failed" and out["meta"]["error"] == "unsupported_track_kind"
    assert out["meta"]["detail"] == "Unsupported track kind 'video' for modality 'audio'"
    assert stream.active_sessions == 0
    await close_peer_connection(pc)


@pytest.mark.parametrize("video", [True, False])
async def test_unsuccessful_connection_video(serve, video):
    stream = make_stream(modality="video")
    server = serve(stream)
    pc = await setup_peer_connection(audio=True, video=video)
    out = await send_offer(pc, server.http, audio=True, video=video, response_code=400)
    assert out["meta"]["detail"] == "Unsupported track kind 'audio' for modality 'video'"
    assert stream.active_sessions == 0
    await close_peer_connection(pc)


async def test_unsuccessful_webrtc_offer_no_webrtc_id(serve):
    server = serve(make_stream())
    pc = await setup_peer_connection()
    await send_offer(pc, server.http, webrtc_id=None, response_code=422)
    await pc.close()


@pytest.mark.parametrize("audio, video", [(True, False), (False, True), (True, True)])
def test_incorrect_modality(audio, video):
    # FastRTC raises when the offer arrives; this server when the Stream is built.
    with pytest.raises(ValueError, match=r"modality must be .*"):
        make_stream(modality="dummy")


async def test_concurrency_limit_reached_two_peers(serve):
    server = serve(make_stream(concurrency_limit=1))
    pc1, pc2 = await setup_peer_connection(video=True), await setup_peer_connection(video=True)
    await send_offer(pc1, server.http)
    status, metadata = await send_offer(pc2, server.http, return_status_and_metadata=True)
    assert status == "failed"
    assert metadata == {"error": "connection_already_exists"}
    await close_peer_connection(pc1)
    await close_peer_connection(pc2)


async def test_concurrency_limit_reached_three_peers_same_id(serve):
    server = serve(make_stream(concurrency_limit=2))
    pcs = [await setup_peer_connection(video=True) for _ in range(3)]
    await send_offer(pcs[0], server.http)
    for pc in pcs[1:]:
        status, metadata = await send_offer(pc, server.http, return_status_and_metadata=True)
        assert status == "failed"
        assert metadata == {"error": "connection_already_exists"}
    for pc in pcs:
        await close_peer_connection(pc)


async def test_concurrency_limit_reached_three_peers(serve):
    server = serve(make_stream(concurrency_limit=2))
    pcs = [await setup_peer_connection(video=True) for _ in range(3)]
    await send_offer(pcs[0], server.http, webrtc_id="foo")
    await send_offer(pcs[1], server.http, webrtc_id="bar")
    status, metadata = await send_offer(pcs[2], server.http, webrtc_id="baz", return_status_and_metadata=True)
    assert status == "failed"
    assert metadata == {"error": "concurrency_limit_reached", "limit": 2}
    for pc in pcs:
        await close_peer_connection(pc)


async def test_concurrency_limit_reached_peers_with_no_mediastreams(serve):
    server = serve(make_stream(concurrency_limit=1))
    pc1, pc2 = await setup_peer_connection(), await setup_peer_connection()
    await send_offer(pc1, server.http, webrtc_id="foo")
    status, metadata = await send_offer(pc2, server.http, webrtc_id="bar", return_status_and_metadata=True)
    assert status == "failed"
    assert metadata == {"error": "concurrency_limit_reached", "limit": 1}
    await close_peer_connection(pc1)
    await close_peer_connection(pc2)


@pytest.mark.parametrize("modality", ["audio", "video"])
async def test_successful_connection_allow_extra_tracks(serve, modality):
    server = serve(make_stream(allow_extra_tracks=True, modality=modality))
    pc = await setup_peer_connection(audio=True, video=True)
    await send_offer(pc, server.http, audio=True, video=True)
    await close_peer_connection(pc)


def test_tags_are_correctly_mounted():
    from fastapi.testclient import TestClient

    tags = [{"name": "fastrtc", "description": "awesome fastrtc endpoints"}]
    app = FastAPI(openapi_tags=tags)
    stream = Stream(handler=Echo(), mode="send-receive", modality="audio")
    stream.mount(app, path="/api/v1/llm", tags=["fastrtc"])
    swagger = TestClient(app=app).get("openapi.json").json()
    assert swagger["paths"]["/api/v1/llm/webrtc/offer"]["post"]["tags"] == ["fastrtc"]
    assert swagger["tags"] == tags
    assert "webrtc_id" in str(swagger["paths"]["/api/v1/llm/webrtc/offer"]["post"]["requestBody"])


# -- the rest of the API surface ----------------------------------------------------------------
def grey(i: int) -> np.ndarray:
    return np.full((120, 160, 3), 100, np.uint8)


async def test_video_stream_handler_works_as_in_fastrtc(serve):
    """`Stream(VideoStreamHandler(fn))` used to be a non-callable stub failing every frame."""
    calls: list = []

    def darken(frame, level):
        calls.append(level)
        return frame // 2

    class Level:
        value = 7

    stream = Stream(VideoStreamHandler(darken, skip_frames=True), modality="video", concurrency_limit=2,
                    additional_inputs=[Level()])
    server = serve(stream)
    client, answer = await connect(server.http, "vsh", video=FrameSource(grey, fps=10), recv_video=True)
    try:
        await wait_for(lambda: len(client.frames) >= 3)
        _, arr, _ = client.frames[-1]
        assert abs(float(arr.mean()) - 50) < 10, arr.mean()
        assert calls and calls[-1] == 7
        assert not [m for m in client.messages if m.get("type") == "error"]
    finally:
        await client.close()
    with pytest.raises(TypeError):
        VideoStreamHandler("not callable")


class StartsUp(StreamHandler):
    started: list[str] = []

    def __init__(self) -> None:
        super().__init__()

    def start_up(self) -> None:
        from server import get_current_context

        StartsUp.started.append(get_current_context().webrtc_id)

    def receive(self, frame) -> None:
        pass

    def emit(self):
        return None

    def copy(self) -> StartsUp:
        return StartsUp()


async def test_start_up_runs_on_every_front_end(serve):
    """`start_up()` used to run over WebSocket only, never over WebRTC."""
    StartsUp.started.clear()
    stream = Stream(StartsUp(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    pc = await setup_peer_connection(audio=True)
    await send_offer(pc, server.http, webrtc_id="rtc", audio=True)
    async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
        await ws.send('{"event": "start", "websocket_id": "ws"}')
        await wait_for(lambda: "ws" in StartsUp.started, 10)
    await wait_for(lambda: "rtc" in StartsUp.started, 10)
    await pc.close()


def startup_reply(*args):
    yield 16000, np.full(8000, 1000, np.int16)


async def test_reply_on_pause_startup_fn_speaks_first_over_webrtc(serve):
    stream = Stream(ReplyOnPause(lambda a: iter([]), startup_fn=startup_reply), modality="audio", concurrency_limit=2)
    server = serve(stream)
    client, _ = await connect(server.http, "greet", audio=AudioSource(np.zeros(48000 * 5, np.int16)))
    try:
        await wait_for(lambda: any(np.abs(a).max() > 500 for _, a in client.audio), 20)
    finally:
        await client.close()


class AVSource(AudioVideoStreamHandler):
    """Receive mode: a tone and grey frames from the server."""

    def __init__(self) -> None:
        super().__init__(output_sample_rate=24000)

    def receive(self, frame) -> None:
        pass

    def emit(self):
        time.sleep(0.02)
        return 24000, np.full(480, 2000, np.int16)

    def video_receive(self, frame) -> None:
        pass

    def video_emit(self):
        return np.full((120, 160, 3), 180, np.uint8)

    def copy(self) -> AVSource:
        return AVSource()


async def test_audio_video_receive_mode_with_an_av_handler(serve):
    """Used to be refused with a 400 mislabelled `invalid_sdp`."""
    stream = Stream(AVSource(), modality="audio-video", mode="receive", concurrency_limit=2)
    server = serve(stream)
    client, answer = await connect(server.http, "av", recv_audio=True, recv_video=True)
    try:
        assert answer.get("type") == "answer", answer
        await wait_for(lambda: len(client.frames) >= 3 and any(np.abs(a).max() > 1000 for _, a in client.audio))
        _, arr, _ = client.frames[-1]
        assert abs(float(arr.mean()) - 180) < 15
    finally:
        await client.close()


class BadCopy(StreamHandler):
    def receive(self, frame) -> None:
        pass

    def emit(self):
        return None

    def copy(self):
        raise RuntimeError("cannot copy")


async def test_a_negotiation_error_that_is_not_about_the_sdp_is_not_called_invalid_sdp(serve):
    stream = Stream(BadCopy(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    pc = await setup_peer_connection(audio=True)
    out = await send_offer(pc, server.http, response_code=500)
    assert out["meta"]["error"] == "negotiation_failed" and "cannot copy" in out["meta"]["detail"]
    await pc.close()
    assert stream.active_sessions == 0


@batched(max_batch_size=4, device="cpu", process=True)
def mounted_double(frames, args):
    return [(frames[i], AdditionalOutputs(i)) for i in range(frames.shape[0])]


async def test_mount_carries_the_stream_lifespan(serve):
    """`stream.mount(app)` used to leave sessions open at shutdown and workers unstarted."""
    stream = Stream(Echo(), modality="audio", concurrency_limit=2)
    app = FastAPI()
    stream.mount(app, path="/rtc")
    server = serve(app)
    async with websockets.connect(f"{server.ws}/rtc/websocket/offer") as ws:
        await ws.send('{"event": "start", "websocket_id": "m"}')
        await wait_for(lambda: stream.active_sessions == 1, 10)
        await asyncio.to_thread(server.stop)  # the app's shutdown closes the stream's sessions
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert stream.active_sessions == 0

    video = Stream(mounted_double, modality="video", concurrency_limit=1)
    app2 = FastAPI()
    video.mount(app2)
    server2 = serve(app2)
    await wait_for(lambda: mounted_double._runner is not None and mounted_double._runner.pid is not None, 60)
    await asyncio.to_thread(server2.stop)
    assert mounted_double._runner is None  # stopped with the app


async def test_start_announces_where_to_go_device_and_batchers(caplog):
    stream = Stream(ReplyOnPause(lambda a: iter([a])), modality="audio", ui_args={"title": "Echo"})
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    logging.getLogger("uvicorn.error").addHandler(caplog.handler)  # uvicorn's may not propagate
    try:
        async with stream.router.lifespan_context(stream):
            pass
    finally:
        logging.getLogger("uvicorn.error").removeHandler(caplog.handler)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "uvicorn.error")
    assert "/ui" in text and "device cpu" in text and "silero_vad" in text, text


def test_echo_app_page_links_to_the_ui():
    from fastapi.testclient import TestClient

    from server.echo_app import stream

    with contextlib.closing(TestClient(stream)) as client:
        html = client.get("/").text
    assert 'href="/ui"' in html and "pause" in html
    assert "pause" in stream.ui_args["subtitle"]


class StereoIn(StreamHandler):
    shapes: list = []

    def __init__(self) -> None:
        super().__init__(expected_layout="stereo", input_sample_rate=48000)

    def receive(self, frame) -> None:
        StereoIn.shapes.append((frame[0], frame[1].shape, frame[1].dtype))

    def emit(self):
        return None

    def copy(self) -> StereoIn:
        return StereoIn()


async def test_a_stereo_handler_gets_two_planar_channels_over_webrtc(serve):
    StereoIn.shapes.clear()
    stream = Stream(StereoIn(), modality="audio", concurrency_limit=2)
    server = serve(stream)
    client, _ = await connect(server.http, "st", audio=AudioSource(np.full(48000, 1000, np.int16)))
    try:
        await wait_for(lambda: len(StereoIn.shapes) >= 5)
    finally:
        await client.close()
    rate, shape, dtype = StereoIn.shapes[-1]
    assert rate == 48000 and shape[0] == 2 and shape[1] > 0 and dtype == np.int16, StereoIn.shapes[-1]
