"""FrameConverter: reused swscale contexts give exactly PyAV's own per-frame conversions."""

from __future__ import annotations

import fractions

import av
import numpy as np
from PIL import Image

from server.frames import ENCODER_FORMAT, FrameConverter

ASTRONAUT = np.tile(np.asarray(Image.open("tests/fixtures/astronaut.png").convert("RGB")), (2, 2, 1))  # 1024x1024


def test_matches_pyav_conversions_and_survives_size_changes():
    conv = FrameConverter()
    tb = fractions.Fraction(1, 90000)
    for i, (h, w) in enumerate([(480, 640), (480, 640), (240, 320), (480, 640)]):
        rgb = np.ascontiguousarray(np.roll(ASTRONAUT, 7 * i, axis=1)[:h, :w])
        decoded = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        for fmt in ("rgb24", "bgr24"):
            assert np.array_equal(conv.to_ndarray(decoded, fmt), decoded.to_ndarray(format=fmt))
        out = conv.to_frame(rgb, "rgb24", pts=3000 * i, time_base=tb)
        # handed to the encoder as yuv420p (it converts nothing), with the same pixels it
        # would have made itself, and the timing of the frame it answers
        assert out.format.name == ENCODER_FORMAT and (out.height, out.width) == (h, w)
        ref = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=ENCODER_FORMAT)
        assert np.array_equal(out.to_ndarray(), ref.to_ndarray())
        assert out.pts == 3000 * i and out.time_base == tb


def test_odd_sized_frames_are_left_to_the_encoder():
    conv = FrameConverter()
    odd = np.ascontiguousarray(ASTRONAUT[:121, :161])
    out = conv.to_frame(odd, "bgr24", pts=0, time_base=fractions.Fraction(1, 90000))
    assert out.format.name == "bgr24" and np.array_equal(out.to_ndarray(format="bgr24"), odd)
