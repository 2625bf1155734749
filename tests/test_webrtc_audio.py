"""ReplyOnPause over WebRTC: real aiortc peers, Opus audio, real speech."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from server import ReplyOnPause, Stream
from tests.test_websocket_reply import echo, speech_48k
from tests.waiting import wait_for
from tests.webrtc_client import AudioSource, connect

SPANS = json.loads(open("tests/fixtures/speech_spans.json").read())


async def test_reply_on_pause_over_webrtc(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    name = "speech_pause_speech_16k.wav"
    pcm = speech_48k(name, tail_s=2.0)
    source = AudioSource(pcm)
    client, answer = await connect(server.http, "a1", audio=source, recv_audio=True)
    try:
        assert answer["type"] == "answer", answer
        await asyncio.sleep(pcm.size / 48000 + 1.5)
        logs = [m.get("data") for m in client.messages if m.get("type") == "log"]
        assert logs.count("pause_detected") == 2, logs
        assert logs.count("started_talking") == 2, logs
        # Loud audio came back (the echo). Times from the first frame the client sent.
        t0 = source._start
        assert t0 is not None
        loud = [t - t0 for t, a in client.audio if np.abs(a.astype(np.int32)).mean() > 300]
        assert loud, "no reply audio"
        first_reply = loud[0]
        s0, s1 = SPANS[name][0]
        assert first_reply > s1, (first_reply, s1)  # only after the pause
        total = sum(1 for t, a in client.audio if np.abs(a.astype(np.int32)).mean() > 300) * 0.02
        speech = sum(e - s for s, e in SPANS[name])
        assert total > 0.6 * speech, (total, speech)
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)


async def test_an_idle_session_sends_no_audio_until_there_is_a_reply(serve):
    """Between replies the server sends no audio packets (no encoding of silence); the reply
    still arrives, stamped with the time that passed."""
    stream = Stream(ReplyOnPause(echo), modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    silence = np.zeros(48000 * 3, np.int16)
    pcm = np.concatenate([silence, speech_48k("speech_pause_speech_16k.wav", tail_s=2.0)])
    client, answer = await connect(server.http, "quiet", audio=AudioSource(pcm), recv_audio=True)
    try:
        assert answer["type"] == "answer", answer
        await asyncio.sleep(2.5)
        assert stream.active_sessions == 1
        assert client.audio == []  # 2.5 s connected, the user silent: nothing sent
        deadline = asyncio.get_running_loop().time() + 15
        while asyncio.get_running_loop().time() < deadline:
            if any(np.abs(a.astype(np.int32)).mean() > 300 for _, a in client.audio):
                break
            await asyncio.sleep(0.1)
        loud = [a for _, a in client.audio if np.abs(a.astype(np.int32)).mean() > 300]
        assert loud, "no reply audio"
    finally:
        await client.close()


async def test_receive_mode_streams_generated_audio(serve):
    def tone():
        t = np.arange(24000) / 24000
        for _ in range(3):
            yield 24000, (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16).reshape(1, -1)

    stream = Stream(tone, modality="audio", mode="receive", concurrency_limit=2)
    server = serve(stream)
    client, answer = await connect(server.http, "rx", recv_audio=True)
    try:
        assert answer["type"] == "answer", answer
        assert "usedtx" not in answer["sdp"]  # a client that only listens is asked no DTX
        await asyncio.sleep(2.5)
        loud = [a for _, a in client.audio if np.abs(a.astype(np.int32)).mean() > 2000]
        assert len(loud) > 40, len(loud)  # > 0.8 s of the tone arrived
    finally:
        await client.close()


async def test_send_mode_delivers_additional_outputs(serve):
    from server import AdditionalOutputs

    def transcript(audio):
        yield AdditionalOutputs(f"heard {audio[1].shape[1] / audio[0]:.1f} s")

    stream = Stream(ReplyOnPause(transcript), modality="audio", mode="send", concurrency_limit=2,
                    additional_outputs=[object()], additional_outputs_handler=lambda a, b: b)
    server = serve(stream)
    pcm = speech_48k("speech_pause_speech_16k.wav", tail_s=2.0)
    client, answer = await connect(server.http, "tx", audio=AudioSource(pcm))
    try:
        assert answer["type"] == "answer", answer
        await asyncio.sleep(pcm.size / 48000 + 1.0)
        outs = [m["data"][0] for m in client.messages if m.get("type") == "fetch_output"]
        assert len(outs) == 2 and all(o.startswith("heard") for o in outs), outs
    finally:
        await client.close()
