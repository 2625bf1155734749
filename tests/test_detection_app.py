"""The face-detection stream end to end: a real picture over WebRTC, boxes where the face is."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from PIL import Image

from server import Stream
from server.detection import face_detection_handler
from tests.webrtc_client import FrameSource, connect

ASTRONAUT = np.asarray(Image.open("tests/fixtures/astronaut.png").convert("RGB"))
# The face's box found on the still picture (see tests/test_detector.py): x 180-268, y 61-172.
FACE = (180, 61, 268, 172)


def green_fraction(img: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    region = img[y0:y1, x0:x1].astype(int)
    green = (region[..., 1] > 180) & (region[..., 0] < 110) & (region[..., 2] < 110)
    return float(green.mean())


async def test_detection_stream_draws_the_box_and_reports_detections(serve):
    class Slider:
        value = 0.9

    stream = Stream(
        face_detection_handler(max_batch_size=8, max_queue_delay_ms=5),
        modality="video",
        concurrency_limit=4,
        additional_inputs=[Slider()],
        additional_outputs=[object()],
        additional_outputs_handler=lambda old, new: new,
    )
    server = serve(stream)
    client, answer = await connect(
        server.http, "faces", video=FrameSource(lambda i: ASTRONAUT, fps=5), recv_video=True
    )
    try:
        assert answer["type"] == "answer", answer
        deadline = time.monotonic() + 40
        while len(client.frames) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(client.frames) >= 5
        _, frame, _ = client.frames[-1]
        x0, y0, x1, y1 = FACE
        # Green outline along the box edges (3 px, VP8-blurred), none in the middle of the face.
        top_edge = green_fraction(frame, x0 + 10, y0 - 2, x1 - 10, y0 + 5)
        left_edge = green_fraction(frame, x0 - 2, y0 + 10, x0 + 5, y1 - 10)
        inside = green_fraction(frame, x0 + 20, y0 + 20, x1 - 20, y1 - 20)
        assert top_edge > 0.3 and left_edge > 0.3, (top_edge, left_edge)
        assert inside < 0.02, inside
        # Far from the face nothing is drawn.
        assert green_fraction(frame, 350, 300, 500, 500) < 0.01
        dets = [m["data"][0] for m in client.messages if m.get("type") == "fetch_output"]
        assert dets and len(dets[-1]) == 1 and dets[-1][0]["score"] > 0.95
        # Raising the threshold above every score removes the box.
        stream.set_input("faces", 1.01)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msgs = [m["data"][0] for m in client.messages if m.get("type") == "fetch_output"]
            if msgs and msgs[-1] == []:
                break
            await asyncio.sleep(0.1)
        assert msgs[-1] == []
    finally:
        await client.close()


def test_handler_filters_by_each_frames_confidence_and_reads_min_face_size(monkeypatch) -> None:
    import pytest
    import torch

    import server.detection as detection

    monkeypatch.setattr(detection, "_detector", None)
    monkeypatch.setenv("BATCHRTC_MIN_FACE_SIZE", "60")
    assert detection.detector().min_face_size == 60
    frames = torch.from_numpy(np.stack([ASTRONAUT, ASTRONAUT, np.zeros_like(ASTRONAUT)]))
    outs = detection._detect(frames, [(0.5,), (1.01,), (None,)])
    dets = [o[1].args[0] for o in outs]
    assert len(dets[0]) == 1 and dets[0][0]["score"] > 0.95  # the face, found with 60 px
    assert dets[1] == [] and dets[2] == []  # above every score; an empty frame
    assert outs[0][0].shape == ASTRONAUT.shape and not np.array_equal(outs[0][0], ASTRONAUT)
    assert np.array_equal(outs[1][0], ASTRONAUT)  # nothing kept, nothing drawn
    monkeypatch.setattr(detection, "_detector", None)
    monkeypatch.setenv("BATCHRTC_MIN_FACE_SIZE", "8")
    with pytest.raises(ValueError, match="BATCHRTC_MIN_FACE_SIZE must be >= 12"):
        detection.detector()
