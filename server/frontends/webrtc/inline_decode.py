"""Decode incoming Opus on the event loop instead of in aiortc's decoder thread.

aiortc gives every receiver a decoder thread: each RTP packet's encoded frame goes into a
`queue.Queue`, the thread wakes, decodes, and hands the frame back with
`asyncio.run_coroutine_threadsafe` (a future, a loop wake-up and a task per frame). For a
20 ms Opus packet that handoff costs far more than the decode itself (tens of microseconds
in libopus), and a WebRTC voice session gets 50 packets a second whether the user speaks or
not (`benchmarks/bench_idle.py`, an aiortc client streaming silence).

`decode_audio_on_loop(receiver)` puts an `InlineAudioDecoder` where the receiver keeps that
queue, before the receiver starts: a frame put there is decoded at once, on the loop that
received its packet, and queued on the track (at most `MAX_QUEUED_FRAMES` waiting: aiortc
bounds nothing there). The receiver's thread still starts, but waits
in `get` until the receiver stops; then it ends the track as aiortc always does. Video keeps
its thread (a VP8 frame takes milliseconds to decode).

This reaches into aiortc's private state (`RTCRtpReceiver.__decoder_queue`), so it installs
itself only where that is what it expects, and otherwise leaves aiortc as it is;
`tests/test_webrtc_inline_decode.py` fails if the installed aiortc stops taking it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from typing import Any

from aiortc.codecs import get_decoder

logger = logging.getLogger(__name__)

__all__ = ["InlineAudioDecoder", "decode_audio_on_loop", "MAX_QUEUED_FRAMES"]

# Decoded frames waiting for the session (2 s of 20 ms Opus frames). aiortc's track queue is
# unbounded: a client sending faster than its session takes audio (a flood, or a handler
# slower than real time) would grow it without end. Beyond this, new packets are dropped
# undecoded; the media clock (dtx.GapFiller) then feeds the session silence for the gap.
MAX_QUEUED_FRAMES = 100

_QUEUE_ATTR = "_RTCRtpReceiver__decoder_queue"
_STARTED_ATTR = "_RTCRtpReceiver__started"


class InlineAudioDecoder:
    """Stands in for an audio receiver's decoder queue (`put` from the loop, `get` from the
    receiver's thread)."""

    def __init__(self, track_queue: asyncio.Queue) -> None:
        self._track_queue = track_queue
        self._codec_name: str | None = None
        self._decoder: Any = None
        self._end: queue.SimpleQueue = queue.SimpleQueue()
        self.decoded = 0
        self.failed = 0
        self.dropped = 0

    def put(self, item: Any) -> None:
        if item is None:  # the receiver stops: let its thread end the track
            self._end.put(None)
            return
        if self._track_queue.qsize() >= MAX_QUEUED_FRAMES:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("audio arrives faster than its session takes it: %d packets dropped", self.dropped)
            return
        codec, encoded_frame = item
        try:
            if codec.name != self._codec_name:
                self._decoder = get_decoder(codec)
                self._codec_name = codec.name
            frames = self._decoder.decode(encoded_frame)
        except Exception as e:  # a bad packet is dropped; it must not reach the transport
            self.failed += 1
            if self.failed == 1 or self.failed % 1000 == 0:
                logger.warning("audio decode failed (%d so far): %s: %s", self.failed, type(e).__name__, e)
            return
        for frame in frames:
            self._track_queue.put_nowait(frame)
        self.decoded += len(frames)

    def get(self) -> None:
        return self._end.get()


def decode_audio_on_loop(receiver: Any) -> InlineAudioDecoder | None:
    """Install an `InlineAudioDecoder` on this audio receiver if it has not started and is
    built as this module expects; None (aiortc left as it is) otherwise."""
    current = getattr(receiver, _QUEUE_ATTR, None)
    track_queue = getattr(getattr(receiver, "track", None), "_queue", None)
    if (
        getattr(receiver, _STARTED_ATTR, True)
        or type(current) is not queue.Queue
        or not current.empty()
        or not isinstance(track_queue, asyncio.Queue)
        or getattr(receiver.track, "kind", None) != "audio"
    ):
        return None
    inline = InlineAudioDecoder(track_queue)
    setattr(receiver, _QUEUE_ATTR, inline)
    return inline
