"""Batched video handlers in their own process (`process=True`): real aiortc peers, a real
child process; a hanging or crashing handler is killed and restarted, and sessions recover."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from server import AdditionalOutputs, Stream
from server.detection import _detect
from server.video import BatchedHandler, batched
from tests.test_detection_app import ASTRONAUT, FACE, green_fraction
from tests.test_metrics import scrape, val
from tests.waiting import wait_for
from tests.webrtc_client import FrameSource, connect

H, W = 120, 160


def grey(i: int) -> np.ndarray:
    return np.full((H, W, 3), 100, np.uint8)


@batched(max_batch_size=8, max_queue_delay_ms=10, device="cpu", process=True, call_timeout_s=3.0)
def brighten(frames: torch.Tensor, args: list[tuple]) -> list:
    """+40 on every pixel; reports the pid it ran in. An input "hang:PATH" / "crash:PATH"
    misbehaves once (PATH marks that it happened: a restarted child must not repeat it)."""
    for (what,) in args:
        if isinstance(what, str) and ":" in what:
            kind, path = what.split(":", 1)
            if not os.path.exists(path):
                Path(path).touch()
                if kind == "hang":
                    time.sleep(120)
                if kind == "crash":
                    os._exit(7)
    out = (frames.int() + 40).clamp(max=255).to(torch.uint8)
    return [(out[i], AdditionalOutputs(os.getpid())) for i in range(frames.shape[0])]


class Mode:
    value = "ok"


def outputs(client) -> list:
    return [m["data"][0] for m in client.messages if m.get("type") == "fetch_output"]


def errors(client) -> list[str]:
    return [m["message"] for m in client.messages if m.get("type") == "error"]


def _stream() -> Stream:
    return Stream(
        brighten, modality="video", concurrency_limit=4, additional_inputs=[Mode()],
        additional_outputs=[object()], additional_outputs_handler=lambda a, b: b,
    )


async def _two_clients(server):
    a, _ = await connect(server.http, "a", video=FrameSource(grey, fps=10), recv_video=True, keep_frames=5)
    b, _ = await connect(server.http, "b", video=FrameSource(grey, fps=10), recv_video=True, keep_frames=5)
    return a, b


async def test_handler_runs_in_a_child_process(serve):
    stream = _stream()
    server = serve(stream)
    a, b = await _two_clients(server)
    try:
        await wait_for(lambda: len(a.frames) >= 3 and len(b.frames) >= 3, 60)
        _, arr, _ = a.frames[-1]
        assert abs(float(arr.mean()) - 140) < 8, arr.mean()  # 100 + 40, through VP8 both ways
        pids = set(outputs(a)) | set(outputs(b))
        assert len(pids) == 1 and os.getpid() not in pids, pids
        assert brighten.process and brighten._runner is not None and brighten._runner.pid in pids
    finally:
        await asyncio.gather(a.close(), b.close())
    await wait_for(lambda: stream.active_sessions == 0, 10)


@pytest.mark.parametrize("kind", ["hang", "crash"])
async def test_misbehaving_handler_is_restarted_and_sessions_recover(serve, tmp_path, kind):
    stream = _stream()
    server = serve(stream)
    a, b = await _two_clients(server)
    try:
        await wait_for(lambda: len(outputs(a)) >= 2 and len(outputs(b)) >= 2, 60)
        pid0 = outputs(a)[-1]
        stream.set_input("a", f"{kind}:{tmp_path / 'once'}")
        # The batch holding a's frame fails once (killed after call_timeout_s, or died): its
        # frames are retried alone (or dropped as late), nobody is disconnected or blamed for
        # a failure that does not repeat, and nobody waits forever.
        await wait_for(lambda: brighten._runner is not None and brighten._runner.restarts >= 1, 30)
        # A fresh child takes over; both sessions' frames flow again, from the new pid.
        stream.set_input("a", "ok")
        n_a, n_b = len(outputs(a)), len(outputs(b))
        await wait_for(lambda: len(outputs(a)) > n_a + 3 and len(outputs(b)) > n_b + 3, 60)
        assert outputs(a)[-1] == outputs(b)[-1] != pid0
        assert brighten._runner is not None and brighten._runner.restarts >= 1
        assert stream.active_sessions == 2  # nobody was disconnected
        assert not errors(a) and not errors(b), (errors(a), errors(b))
        # operators see it: /metrics counts the restart, /health names the new child
        samples, _ = await scrape(server.http)
        assert val(samples, "batchrtc_worker_restarts_total", batcher="video:brighten") >= 1
        assert val(samples, "batchrtc_worker_up", batcher="video:brighten") == 1
        async with httpx.AsyncClient(timeout=10) as http:
            health = (await http.get(f"{server.http}/health")).json()
        assert health["worker"]["pid"] == outputs(a)[-1] and health["worker"]["restarts"] >= 1
    finally:
        await asyncio.gather(a.close(), b.close())


def test_process_needs_an_importable_function():
    def local(frames, args):
        return frames

    with pytest.raises(ValueError, match="module-level"):
        batched(local, process=True, device="cpu")
    # Left to the default on CPU it simply runs in-process.
    assert not batched(local, device="cpu").process


async def test_face_detection_in_a_child_process(serve):
    class Slider:
        value = 0.9

    handler = BatchedHandler(_detect, max_batch_size=4, max_queue_delay_ms=5, device="cpu", process=True)
    stream = Stream(
        handler, modality="video", concurrency_limit=2, additional_inputs=[Slider()],
        additional_outputs=[object()], additional_outputs_handler=lambda old, new: new,
    )
    server = serve(stream)
    client, _ = await connect(server.http, "faces", video=FrameSource(lambda i: ASTRONAUT, fps=5), recv_video=True)
    try:
        await wait_for(lambda: len(client.frames) >= 3, 60)
        _, frame, _ = client.frames[-1]
        x0, y0, x1, _ = FACE
        assert green_fraction(frame, x0 + 10, y0 - 2, x1 - 10, y0 + 5) > 0.3
        dets = outputs(client)
        assert dets and len(dets[-1]) == 1 and dets[-1][0]["score"] > 0.95
        assert handler._runner is not None and handler._runner.pid != os.getpid()
    finally:
        await client.close()
