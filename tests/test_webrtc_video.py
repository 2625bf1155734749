"""WebRTC video through real aiortc peers: plain and batched handlers, freshness, errors."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import torch

from server import AdditionalOutputs, Stream
from server.video import batched
from tests.waiting import wait_for
from tests.webrtc_client import FrameSource, connect

H, W = 240, 320


def gradient(i: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 1] = 128
    img[:, : W // 2, 0] = 200  # left half reddish
    return img


def invert(frame: np.ndarray) -> np.ndarray:
    return 255 - frame


async def test_plain_video_handler_round_trip(serve):
    stream = Stream(invert, modality="video", mode="send-receive", concurrency_limit=4)
    server = serve(stream)
    client, answer = await connect(server.http, "v1", video=FrameSource(gradient), recv_video=True)
    try:
        assert answer["type"] == "answer"
        await wait_for(lambda: len(client.frames) >= 10)
        _, arr, _ = client.frames[-1]
        # the returned frames are processed: inverted (VP8 is lossy: compare coarse means)
        left, right = arr[:, : W // 2].reshape(-1, 3).mean(0), arr[:, W // 2 :].reshape(-1, 3).mean(0)
        assert abs(left[0] - 55) < 20 and abs(left[1] - 127) < 20, left
        assert abs(right[0] - 255) < 20, right
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)


SH, SW = H // 2, W // 2


def small_gradient(i: int) -> np.ndarray:
    """`gradient` at a quarter of the pixels (SH x SW)."""
    return gradient(i)[::2, ::2].copy()


async def test_batched_handler_sixteen_sessions_batch_together(serve):
    calls: list[int] = []

    @batched(max_batch_size=16, max_queue_delay_ms=15, device="cpu")
    def brighten(frames: torch.Tensor, args: list[tuple]) -> list:
        assert frames.dtype == torch.uint8 and frames.shape[1:] == (SH, SW, 3)
        calls.append(frames.shape[0])
        out = (frames.int() + 40).clamp(max=255).to(torch.uint8)
        return [(out[i], AdditionalOutputs(float(args[i][0]))) for i in range(frames.shape[0])]

    class Slider:
        value = 0.3

    stream = Stream(
        brighten, modality="video", concurrency_limit=20, additional_inputs=[Slider()],
        additional_outputs=[object()], additional_outputs_handler=lambda a, b: b,
    )
    server = serve(stream)
    clients = []

    async def wait(cond, timeout: float) -> None:  # says where b0 stands if it runs out
        try:
            await wait_for(cond, timeout)
        except AssertionError:
            s = stream.sessions.get("b0")
            raise AssertionError(
                f"b0's server session {'active' if s is not None and s.active else 'gone'}, its "
                f"client {clients[0].pc.connectionState}; frames {[len(c.frames) for c in clients]}"
            ) from None

    try:
        for i in range(16):
            # Small frames at 5 fps: this one process plays 16 clients and the server on two
            # cores. At 320x240 and 10 fps a host stealing CPU time kept its event loops over
            # 0.5 s late for 30 s, and ICE consent (RFC 7675) expired on a session (aioice
            # closes it, as a browser would).
            c, ans = await connect(server.http, f"b{i}", video=FrameSource(small_gradient, fps=5), recv_video=True, keep_frames=3)
            assert ans["type"] == "answer", ans
            clients.append(c)
        await wait(lambda: all(len(c.frames) >= 5 for c in clients), 40)
        assert max(calls) > 1, calls
        _, arr, _ = clients[0].frames[1]
        assert arr[:, SW // 2 :, 0].mean() > 20 and arr[:, SW // 2 :, 1].mean() > 150  # 128 + 40
        # default input value reached the handler before any set_input; then the new one
        assert any(m.get("type") == "fetch_output" and m["data"] == [0.3] for m in clients[0].messages)
        stream.set_input("b0", 0.9)
        # a liveness bound, not a speed target: 16 video sessions share this box's two cores
        # (once, in a full run on a host stealing CPU time, 10 s was not enough)
        await wait(lambda: any(m.get("data") == [0.9] for m in clients[0].messages), 30)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    await wait_for(lambda: stream.active_sessions == 0, 15)


def stamped(i: int) -> np.ndarray:
    """A frame whose top-left 64x64 block encodes i mod 64 as grey level (survives VP8)."""
    img = gradient(i)
    img[:64, :64] = (i % 64) * 4
    return img


def send_time_of(src: FrameSource, arrival: float, block: np.ndarray) -> float | None:
    """Send time of the newest frame whose stamp matches `block` and was sent before `arrival`
    (RTP timestamps are rebased by each hop, so frames are matched by content)."""
    k = int(round(float(block[8:56, 8:56].mean()) / 4)) % 64
    times = [t for pts, t in src.sent.items() if (pts // 3000) % 64 == k and t <= arrival]
    return max(times) if times else None


async def test_slow_handler_keeps_latency_bounded_and_other_session_flows(serve):
    def slow(frame: np.ndarray) -> np.ndarray:
        time.sleep(0.1)
        return frame

    stream = Stream(slow, modality="video", concurrency_limit=4)
    server = serve(stream)
    src = FrameSource(stamped, fps=30)
    src2 = FrameSource(gradient, fps=30)
    slow_client, _ = await connect(server.http, "slow", video=src, recv_video=True, keep_frames=10_000)
    other, _ = await connect(server.http, "other", video=src2, recv_video=True, keep_frames=0)
    try:
        await asyncio.sleep(4.0)
        session = stream.sessions["slow"]
        pipe = session.video
        # The handler runs ~10 times a second; everything else was dropped, not queued.
        assert pipe.dropped > pipe.processed
        lat = []
        for t, arr, _ in slow_client.frames[-10:]:
            sent = send_time_of(src, t, arr[:64, :64].astype(float))
            if sent is not None:
                lat.append(t - sent)
        assert len(lat) >= 8, lat
        # Bounded, not growing: about two handler periods (a frame waits at most one in the
        # mailbox, then one to be processed) plus transport (aiortc adds a frame interval per
        # receiving hop, ~67 ms): ~0.3 s here, 0.35 once in a full run on a host stealing CPU.
        # FastRTC's unbounded queue would be 2-3 s behind by now (20 frames a second queued).
        assert sorted(lat)[len(lat) // 2] < 0.6 and max(lat) < 1.0, lat
        assert pipe.mailbox is None or pipe.received - pipe.processed - pipe.dropped <= 2
        # the second session's frames keep flowing (handlers run on the pool, not the loop)
        n0 = len(other.frames)
        await asyncio.sleep(1.0)
        assert len(other.frames) - n0 >= 7
    finally:
        await slow_client.close()
        await other.close()


async def test_bad_offers_are_4xx_and_leave_nothing_behind(serve):
    stream = Stream(invert, modality="video", concurrency_limit=1)
    server = serve(stream)
    async with httpx.AsyncClient() as http:
        url = f"{server.http}/webrtc/offer"
        r = await http.post(url, json={"type": "offer", "webrtc_id": "x"})
        assert r.status_code == 400 and r.json()["meta"]["error"] == "invalid_sdp"
        r = await http.post(url, json={"sdp": "v=0 garbage", "type": "offer", "webrtc_id": "x"})
        assert r.status_code == 400 and r.json()["status"] == "failed", r.text
        r = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500
        r = await http.post(url, json={"sdp": "x", "type": "offer"})
        assert r.status_code == 422  # webrtc_id is required
        r = await http.post(url, json={"type": "ice-candidate", "webrtc_id": "ghost", "candidate": {"candidate": "x"}})
        assert r.json()["meta"]["error"] == "unknown_connection"
    assert stream.active_sessions == 0
    # the single slot is still free: a good offer connects
    c, ans = await connect(server.http, "good", video=FrameSource(gradient), recv_video=True)
    try:
        assert ans["type"] == "answer"
        again, ans2 = await connect(server.http, "good", video=FrameSource(gradient), recv_video=True)
        assert ans2["meta"]["error"] in ("connection_already_exists", "concurrency_limit_reached")
    finally:
        await c.close()


async def test_raising_video_handler_only_hurts_its_session(serve):
    def maybe_fail(frame: np.ndarray, who: str) -> np.ndarray:
        if who == "bad":
            raise RuntimeError("detector exploded")
        return frame

    class Who:
        value = "good"

    stream = Stream(maybe_fail, modality="video", concurrency_limit=4, additional_inputs=[Who()])
    server = serve(stream)
    bad, _ = await connect(server.http, "bad", video=FrameSource(gradient), recv_video=True, keep_frames=0)
    good, _ = await connect(server.http, "good", video=FrameSource(gradient), recv_video=True, keep_frames=0)
    try:
        await wait_for(lambda: "bad" in stream.sessions)
        stream.set_input("bad", "bad")
        await wait_for(lambda: any(m.get("type") == "error" for m in bad.messages), 15)
        assert "detector exploded" in [m for m in bad.messages if m.get("type") == "error"][0]["message"]
        n0 = len(good.frames)
        await asyncio.sleep(1.0)
        assert len(good.frames) - n0 >= 10
        assert not any(m.get("type") == "error" for m in good.messages)
    finally:
        await bad.close()
        await good.close()


async def test_receive_mode_streams_generated_video(serve):
    def frames():
        for i in range(300):
            img = np.zeros((H, W, 3), np.uint8)
            img[..., 2] = 220  # red in BGR, FastRTC's layout for per-frame video
            yield img

    stream = Stream(frames, modality="video", mode="receive", concurrency_limit=2)
    server = serve(stream)
    client, answer = await connect(server.http, "rx-video", recv_video=True)
    try:
        assert answer["type"] == "answer", answer
        await wait_for(lambda: len(client.frames) >= 10, 20)
        _, arr, _ = client.frames[-1]
        assert arr[..., 0].mean() > 180 and arr[..., 2].mean() < 60  # red arrives as RGB red
    finally:
        await client.close()


async def test_send_mode_returns_detections_without_converting_or_encoding_a_frame(serve, monkeypatch):
    """mode="send" (camera in, results out as AdditionalOutputs): no video track back, and not
    one frame converted back for an encoder (what makes send-only sessions cheap)."""
    from server.frames import FrameConverter

    back: list[int] = []
    real_to_frame = FrameConverter.to_frame
    monkeypatch.setattr(FrameConverter, "to_frame", lambda self, *a, **k: back.append(1) or real_to_frame(self, *a, **k))

    @batched(max_batch_size=8, max_queue_delay_ms=5, device="cpu")
    def mean_red(frames: torch.Tensor, args: list[tuple]) -> list:
        return [(f, AdditionalOutputs(float(f[..., 0].float().mean()))) for f in frames]

    stream = Stream(mean_red, modality="video", mode="send", concurrency_limit=2)
    server = serve(stream)
    client, answer = await connect(server.http, "send-1", video=FrameSource(gradient))
    try:
        assert answer["type"] == "answer"
        assert "m=video" in answer["sdp"] and "a=recvonly" in answer["sdp"]
        await wait_for(lambda: sum(m.get("type") == "fetch_output" for m in client.messages) >= 10)
        red = [m["data"][0] for m in client.messages if m.get("type") == "fetch_output"]
        assert all(abs(r - 100) < 15 for r in red[-5:]), red[-5:]  # half the frame at 200, half 0
        session = next(iter(stream.sessions.values()))
        assert session.video.processed >= 10
        assert back == [] and client.frames == []
    finally:
        await client.close()
