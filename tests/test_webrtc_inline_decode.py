"""Incoming Opus decoded on the event loop (`server/frontends/webrtc/inline_decode.py`):
installed on aiortc's audio receivers, turns still work over real peers, a bad packet is
dropped, and the receiver's parked thread ends with the session."""

from __future__ import annotations

import asyncio
import fractions
import threading

import av
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.codecs import get_encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from server import AsyncStreamHandler, ReplyOnPause, Stream
from server.frontends.webrtc.inline_decode import MAX_QUEUED_FRAMES, InlineAudioDecoder, decode_audio_on_loop
from tests.test_websocket_reply import echo, speech_48k
from tests.waiting import wait_for
from tests.webrtc_client import AudioSource, connect

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def _decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "audio-decoder"]


def _opus_packets(pcm: np.ndarray) -> list[bytes]:
    """Real Opus packets (aiortc's own encoder) for 20 ms frames of 48 kHz mono int16."""
    encoder = get_encoder(OPUS)
    out = []
    for i in range(0, pcm.size - 959, 960):
        frame = av.AudioFrame.from_ndarray(pcm[None, i : i + 960], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i, fractions.Fraction(1, 48000)
        payloads, _ = encoder.encode(frame)
        out += payloads
    return out


def test_packets_decode_into_the_track_queue_and_a_bad_one_is_dropped() -> None:
    t = np.arange(48000) / 48000
    packets = _opus_packets((np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16))
    q: asyncio.Queue = asyncio.Queue()
    dec = InlineAudioDecoder(q)
    for k, p in enumerate(packets):
        dec.put((OPUS, JitterFrame(data=p, timestamp=k * 960)))
    assert dec.decoded == len(packets) == q.qsize() == 50 and dec.failed == 0
    frames = [q.get_nowait() for _ in range(q.qsize())]
    assert all(f.samples == 960 and f.sample_rate == 48000 for f in frames)
    loud = np.abs(frames[-1].to_ndarray().astype(np.int32)).mean()
    assert loud > 1000, loud  # the tone, not silence
    dec.put((OPUS, JitterFrame(data=b"\xff\xff\xff", timestamp=0)))  # code 3, no frame count
    assert dec.failed == 1 and q.qsize() == 0  # dropped, nothing raised into the transport


def test_installed_on_an_audio_receiver_before_it_starts_only() -> None:
    async def main() -> None:
        client, server = RTCPeerConnection(), RTCPeerConnection()
        try:
            client.addTransceiver("audio")
            client.addTransceiver("video")
            await client.setLocalDescription(await client.createOffer())
            # As the server has them in its `track` handler: created, not started.
            await server.setRemoteDescription(client.localDescription)
            audio, video = (t.receiver for t in server.getTransceivers())
            assert (audio.track.kind, video.track.kind) == ("audio", "video")
            audio._RTCRtpReceiver__started = True
            assert decode_audio_on_loop(audio) is None  # a started receiver is left alone
            audio._RTCRtpReceiver__started = False
            # The canary: an aiortc whose receivers no longer look as expected gets None here.
            assert isinstance(decode_audio_on_loop(audio), InlineAudioDecoder)
            assert decode_audio_on_loop(audio) is None  # already replaced
            assert decode_audio_on_loop(video) is None  # video keeps its decoder thread
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


async def test_turns_over_webrtc_with_audio_decoded_on_the_loop(serve):
    before = len(_decoder_threads())
    stream = Stream(ReplyOnPause(echo), modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    pcm = speech_48k("speech_pause_speech_16k.wav", tail_s=2.0)
    client, answer = await connect(server.http, "inline", audio=AudioSource(pcm), recv_audio=True)
    try:
        assert answer["type"] == "answer", answer
        await wait_for(lambda: sum(m.get("data") == "pause_detected" for m in client.messages) == 2, 30)
        conn = stream.sessions["inline"].webrtc
        assert conn.inline_decoder is not None
        sent = pcm.size // 960
        # every packet so far went through it (the tail of silence is still being sent)
        assert conn.inline_decoder.decoded > 0.6 * sent and conn.inline_decoder.failed == 0
        await wait_for(lambda: any(np.abs(a.astype(np.int32)).mean() > 300 for _, a in client.audio), 15)
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)
    # the receiver's thread, parked in `get`, ended with it (and the client's with the client)
    await wait_for(lambda: len(_decoder_threads()) <= before, 10)


class SlowerThanRealTime(AsyncStreamHandler):
    """Takes 50 ms per 20 ms frame: audio piles up in front of it."""

    def copy(self) -> SlowerThanRealTime:
        return SlowerThanRealTime()

    async def receive(self, frame) -> None:
        await asyncio.sleep(0.05)

    async def emit(self):
        await asyncio.sleep(3600)


async def test_audio_waiting_for_a_slow_session_is_bounded(serve):
    stream = Stream(SlowerThanRealTime(), modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    client, answer = await connect(server.http, "slow", audio=AudioSource(np.zeros(48000 * 20, np.int16)))
    try:
        assert answer["type"] == "answer", answer
        await wait_for(lambda: "slow" in stream.sessions and stream.sessions["slow"].webrtc.inline_decoder is not None, 10)
        conn = stream.sessions["slow"].webrtc
        track = next(t.receiver.track for t in conn.pc.getTransceivers() if t.receiver.track.kind == "audio")
        # 50 frames a second arrive, 20 are taken: without a bound 30 more wait every second
        await wait_for(lambda: conn.inline_decoder.dropped > 50, 20)
        assert track._queue.qsize() <= MAX_QUEUED_FRAMES
        assert stream.active_sessions == 1  # the session goes on
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)
