"""Reply audio is not kept after it is sent: per connection, the handler's array, its float32
conversion and the sinks' partial frames used to stay alive until that connection's next reply
(at 200 voice sessions, ~25 MB of the server's peak RSS; benchmarks/memory_per_session.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import tracemalloc
import weakref
from collections.abc import Iterator

import numpy as np
import websockets

from server import AsyncStreamHandler, Stream
from server.audio_out import AudioOut
from server.frontends.webrtc.tracks import AudioOutputTrack, TrackAudioSink
from tests.test_stream_api import recv_until


@contextlib.contextmanager
def held_memory() -> Iterator[list[int]]:
    """Bytes of Python/numpy memory the block leaves allocated (in the list it yields)."""
    gc.collect()
    tracemalloc.start()
    held: list[int] = []
    try:
        before = tracemalloc.get_traced_memory()[0]
        yield held
        gc.collect()
        held.append(tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()


def test_audio_out_keeps_no_copy_of_a_converted_chunk() -> None:
    conv = AudioOut(24000)
    conv.convert(48000, np.zeros(480, dtype=np.float32))  # the filter is designed once, here
    # 10 s at 48 kHz plus one sample (carried to the next chunk): its float32 form is 1.9 MB
    chunk = np.random.default_rng(0).uniform(-0.5, 0.5, 48000 * 10 + 1).astype(np.float32)
    with held_memory() as held:
        conv.convert(48000, chunk)
    assert held[0] < 16 * 1024, f"{held[0]} bytes kept after the chunk was converted"
    # and the odd sample did carry: the next chunk continues the same stream
    assert conv.convert(48000, np.zeros(1, dtype=np.float32)).size == 1


async def test_the_webrtc_sink_keeps_no_copy_of_a_written_chunk() -> None:
    track = AudioOutputTrack(48000)
    sink = TrackAudioSink(track, sends_audio=True)
    pcm = np.ones(48000 + 7, dtype=np.int16)  # 50 whole 20 ms frames and 7 samples held back

    async def write_and_play() -> None:
        await sink.write(pcm)
        assert track.queue.qsize() == 50 and sink.pending()
        track.clear()  # as if the track had sent them

    with held_memory() as held:
        await write_and_play()
    assert held[0] < 16 * 1024, f"{held[0]} bytes kept after the frames were sent"
    await sink.idle()  # the 7 samples are still played, padded to a frame
    assert track.queue.get_nowait()[:7].tolist() == [1] * 7


class OneBigReply(AsyncStreamHandler):
    """Emits one 4 s reply, then waits; remembers the reply array weakly."""

    emitted: list[weakref.ref] = []

    def __init__(self) -> None:
        super().__init__(output_sample_rate=24000)
        self._sent = False
        self._never = asyncio.Event()

    def copy(self) -> OneBigReply:
        return OneBigReply()

    async def receive(self, frame) -> None:
        pass

    async def emit(self):
        if self._sent:
            await self._never.wait()
        self._sent = True
        audio = np.random.default_rng(1).uniform(-0.5, 0.5, (1, 48000 * 4 + 1)).astype(np.float32)
        OneBigReply.emitted.append(weakref.ref(audio))
        return 48000, audio


async def test_a_sent_reply_array_is_freed_while_the_session_waits_for_the_next(serve) -> None:
    OneBigReply.emitted.clear()
    server = serve(Stream(OneBigReply(), modality="audio", mode="send-receive", concurrency_limit=2))
    async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "mem1"}))
        await recv_until(ws, lambda m: m.get("event") == "media")
        for _ in range(50):  # the pump drops it right after the write: give its loop a turn
            gc.collect()
            if OneBigReply.emitted and OneBigReply.emitted[0]() is None:
                break
            await asyncio.sleep(0.02)
        assert OneBigReply.emitted, "the handler never emitted"
        assert OneBigReply.emitted[0]() is None, "the sent reply's array is still referenced"
