"""Video frame <-> numpy conversion for one session, with reused swscale contexts.

PyAV's `frame.to_ndarray(format=...)` and aiortc's encoder (`frame.reformat("yuv420p")`) build
a new swscale context for every frame, with one slice thread per CPU core. Measured on 640x480
(`python -m benchmarks.bench_video_codec`, `benchmarks/results/bench_video_codec_cpu.md`,
2-core Xeon): RGB out of a decoded frame 0.41 -> 0.13 ms of CPU; RGB back to yuv420p for the
encoder 1.01 ms (a fresh context) -> 0.65 ms including `from_ndarray`, with a context kept
per session and one thread (many sessions already keep every core busy); emulating a 16-core
host, a fresh context costs 3.2 ms. The pixels are identical (`tests/test_frames.py`).
"""

from __future__ import annotations

from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

ENCODER_FORMAT = "yuv420p"  # what aiortc's VP8 and H.264 encoders take without converting


class FrameConverter:
    """Not thread-safe: one per session, used by one conversion at a time."""

    def __init__(self) -> None:
        self._in = VideoReformatter()
        self._out = VideoReformatter()

    def to_ndarray(self, frame: av.VideoFrame, fmt: str) -> np.ndarray:
        """A decoded frame as an `[H, W, 3]` uint8 array in `fmt` (`rgb24` or `bgr24`)."""
        return self._in.reformat(frame, format=fmt, threads=1).to_ndarray()

    def to_frame(self, array: np.ndarray, fmt: str, pts: int | None, time_base: Any) -> av.VideoFrame:
        """An `[H, W, 3]` array in `fmt` as a frame the encoder takes as it is (yuv420p)."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array, dtype=np.uint8), format=fmt)
        if frame.width % 2 == 0 and frame.height % 2 == 0:
            frame = self._out.reformat(frame, format=ENCODER_FORMAT, threads=1)
        frame.pts = pts
        frame.time_base = time_base
        return frame
