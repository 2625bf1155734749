"""Opus DTX on incoming WebRTC audio (server/frontends/webrtc/dtx.py): the answer asks for it,
and the silence a client does not send is still fed to the handler, so a turn that ends in
DTX (or with the client going quiet altogether) still gets its reply."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack

from server import AsyncStreamHandler, ReplyOnPause, Stream
from server.frontends.webrtc.dtx import MAX_GAP_FILL_S, WALL_CLOCK_LAG_S, GapFiller, with_opus_dtx
from tests.test_websocket_reply import echo, speech_48k
from tests.waiting import wait_for
from tests.webrtc_client import AudioSource, connect


# -- the answer ---------------------------------------------------------------------------------
def test_usedtx_is_added_to_opus_and_nothing_else() -> None:
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96 0\r\na=rtpmap:96 opus/48000/2\r\n"
           "a=rtpmap:0 PCMU/8000\r\nm=video 9 UDP/TLS/RTP/SAVPF 97\r\na=rtpmap:97 VP8/90000\r\n")
    out = with_opus_dtx(sdp)
    assert "a=rtpmap:96 opus/48000/2\r\na=fmtp:96 usedtx=1\r\n" in out
    assert out.replace("a=fmtp:96 usedtx=1\r\n", "") == sdp
    # an existing fmtp gains the parameter; a client's own usedtx choice is kept
    assert with_opus_dtx("a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n") == (
        "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1;usedtx=1\r\n")
    kept = "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 usedtx=0\r\n"
    assert with_opus_dtx(kept) == kept
    no_opus = "v=0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    assert with_opus_dtx(no_opus) == no_opus


# -- the media clock ----------------------------------------------------------------------------
def test_gap_filler_follows_rtp_time_and_the_wall_clock() -> None:
    g = GapFiller(48000)
    assert g.on_wait(10.0) == 0  # no frame yet: no clock to follow
    base = (1 << 32) - 960 * 2  # starts just before the 32-bit wrap
    assert g.on_frame(base, 960, 0.0) == 0
    assert g.on_frame((base + 960) % (1 << 32), 960, 0.02) == 0  # consecutive, across the wrap
    assert g.on_frame((base + 960 * 3) % (1 << 32), 960, 0.06) == 960  # one packet missing
    end = (base + 960 * 4) % (1 << 32)
    # 0.3 s with nothing: the wall clock's silence, kept WALL_CLOCK_LAG_S behind now
    due = g.on_wait(0.06 + 0.3)
    assert due == int((0.3 - WALL_CLOCK_LAG_S) * 48000)
    assert g.on_wait(0.06 + 0.3) == 0  # nothing new due
    # the next DTX packet lands 0.4 s after the last frame: only the part not yet fed
    nxt = (end + int(0.4 * 48000)) % (1 << 32)
    assert g.on_frame(nxt, 960, 0.06 + 0.4) == int(0.4 * 48000) - due
    # a frame that comes back in time (already fed as silence) needs nothing before it
    assert g.on_frame((nxt - 960) % (1 << 32), 960, 0.5) == 0
    # a long silence is fed up to MAX_GAP_FILL_S, then the filler waits quietly
    t = 0.5
    total = 0
    while g.waiting:
        t += 0.1
        total += g.on_wait(t)
        assert t < 10
    assert total == int(MAX_GAP_FILL_S * 48000)
    assert g.on_wait(t + 5) == 0


def test_timestamps_that_race_ahead_get_no_more_silence_than_the_wall_clock() -> None:
    """A client whose every packet claims 2 s have passed, sent every 20 ms: the silence fed
    stays within the time that really passed (no 100 s of audio a second to process)."""
    g = GapFiller(48000)
    fed = 0
    for i in range(50):  # one second of wall time
        t = i * 0.02
        fed += g.on_frame(i * 2 * 48000, 960, t) + 960
        fed += g.on_wait(t + 0.01)
    assert fed <= (1.0 + WALL_CLOCK_LAG_S) * 48000 + 960, fed / 48000


# -- through the server -------------------------------------------------------------------------
class QuietAfter(MediaStreamTrack):
    """Speech at real time, then either nothing at all (`then="stop"`) or one 20 ms frame of
    silence every 0.4 s with its timestamp moved on by the time that passed (`"dtx"`, what
    an Opus DTX sender does)."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray, then: str) -> None:
        super().__init__()
        self.pcm = pcm
        self.then = then
        self._start: float | None = None
        self._i = 0
        self.sent_after = 0

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        n_speech = self.pcm.size // 960
        if self._i < n_speech:
            t, chunk, pts = self._i * 0.02, self.pcm[self._i * 960 : (self._i + 1) * 960], self._i * 960
        elif self.then == "stop":
            await asyncio.Event().wait()
        else:
            k = self._i - n_speech + 1
            t = n_speech * 0.02 + k * 0.4
            chunk, pts = np.zeros(960, np.int16), int(t * 48000)
            self.sent_after += 1
        wait = self._start + t - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, 48000)
        self._i += 1
        return frame


@pytest.mark.parametrize("then", ["stop", "dtx"])
async def test_a_turn_that_ends_in_dtx_or_quiet_still_gets_its_reply(serve, then) -> None:
    stream = Stream(ReplyOnPause(echo), modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    # The recording's first utterance, cut 0.1 s after its speech ends: what follows is the
    # silence the client does not send.
    pcm = speech_48k("speech_pause_speech_16k.wav", tail_s=0.0)[: int(1.85 * 48000)]
    source = QuietAfter(pcm, then)
    client, answer = await connect(server.http, f"dtx-{then}", audio=source, recv_audio=True)
    try:
        assert answer["type"] == "answer", answer
        assert "usedtx=1" in answer["sdp"]
        await wait_for(lambda: any(m.get("data") == "pause_detected" for m in client.messages), 10,
                       what="pause_detected after the client went quiet")
        await wait_for(lambda: any(np.abs(a.astype(np.int32)).mean() > 300 for _, a in client.audio), 10,
                       what="the echo of the utterance")
        if then == "dtx":
            assert source.sent_after >= 1
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)


async def test_continuous_audio_gets_no_silence_added(serve) -> None:
    """A client that sends every packet: the handler gets exactly the audio sent."""
    got: list[int] = []

    class Count(AsyncStreamHandler):
        async def receive(self, frame) -> None:  # type: ignore[override]
            got.append(frame[1].shape[-1])

        async def emit(self):  # type: ignore[override]
            await asyncio.sleep(0.5)

        def copy(self) -> Count:
            return Count()

    stream = Stream(Count(), modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    pcm = np.zeros(48000 * 2, np.int16)
    client, _ = await connect(server.http, "steady", audio=AudioSource(pcm))
    try:
        await asyncio.sleep(2.5)
    finally:
        await client.close()
    assert len(got) > 50 and set(got) == {960}, sorted(set(got))
