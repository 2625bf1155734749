"""The default app (`uvicorn server.app:stream`) and the audio app start and serve."""

from __future__ import annotations

import httpx

from server.detection import detector


def test_default_app_is_the_batched_face_detection_stream(serve):
    from server.app import stream

    assert stream.modality == "video" and stream.additional_inputs and stream.additional_outputs
    assert stream.handler.batcher is not None  # a batched handler
    server = serve(stream)
    r = httpx.get(f"{server.http}/", timeout=10)
    assert r.status_code == 200 and "/ui" in r.text
    assert httpx.get(f"{server.http}/webrtc/docs", timeout=10).status_code == 200
    assert httpx.get(f"{server.http}/health", timeout=10).json()["status"] == "ok"
    assert str(detector().device) == str(stream.handler.device)


def test_echo_app_is_reply_on_pause_audio(serve):
    from server.echo_app import stream

    assert stream.modality == "audio"
    server = serve(stream)
    assert httpx.get(f"{server.http}/", timeout=10).status_code == 200
