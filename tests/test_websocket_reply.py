"""ReplyOnPause over the WebSocket front end, with real clients and real speech."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from scipy.signal import resample_poly

from server import ReplyOnPause, Stream
from server.vad_engine import get_vad_engine
from tests.audio_fixtures import load_wav
from tests.ws_client import stream_audio

SPANS = json.loads(open("tests/fixtures/speech_spans.json").read())


def speech_48k(name: str, tail_s: float = 1.5) -> np.ndarray:
    sr, x = load_wav(name)
    y = resample_poly(x.astype(np.float64), 3, 1)
    y = np.concatenate([y, np.zeros(int(tail_s * 48000))])
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def echo(audio):
    sr, samples = audio
    assert samples.ndim == 2 and samples.shape[0] == 1, samples.shape
    yield sr, samples


def best_match(sent_24k: np.ndarray, reply: np.ndarray) -> tuple[int, float]:
    """Offset of `reply` inside `sent_24k` and the normalised correlation there. The reply
    may start a few samples *before* the sent signal (the streaming resampler's delay when the
    utterance starts at the first sample): pad the front so that lag is found too."""
    pad = 1000
    a = np.concatenate([np.zeros(pad), sent_24k.astype(np.float64)])
    b = reply.astype(np.float64)
    n = len(a) + len(b)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)[: len(a)]
    off = int(np.argmax(corr))
    seg = a[off : off + len(b)]
    c = float(np.dot(seg, b[: len(seg)]) / (np.linalg.norm(seg) * np.linalg.norm(b[: len(seg)]) + 1e-9))
    return off - pad, c


async def test_reply_after_each_pause_echoes_the_utterance(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", mode="send-receive", concurrency_limit=4)
    server = serve(stream)
    name = "speech_pause_speech_16k.wav"
    pcm = speech_48k(name)
    rec = await stream_audio(f"{server.ws}/websocket/offer", "echo-1", pcm, 48000, tail_s=2.5)

    replies = rec.replies()
    spans = SPANS[name]
    assert len(replies) == len(spans), [(t, len(r)) for t, r in replies]
    logs = [m["data"] for m in rec.messages if m.get("type") == "log"]
    assert logs.count("pause_detected") == len(spans)
    assert logs.count("started_talking") == len(spans)
    sent_24k = resample_poly(pcm.astype(np.float64), 1, 2)
    chunk = 0.6
    for (t_first, reply), (s0, s1) in zip(replies, spans):
        # The reply starts only after the speech ended (no reply mid-utterance) ...
        assert t_first > s1, (t_first, s1)
        # ... and within the configured chunking + batching delay after it.
        assert t_first < s1 + 3 * chunk + 0.5, (t_first, s1)
        off, corr = best_match(sent_24k, reply)
        # The echo is the audio we sent (mu-law twice and resampled: still highly correlated),
        assert corr > 0.9, corr
        start, end = off / 24000, (off + len(reply)) / 24000
        # covering the utterance, with at most a chunk of lead-in and the pause chunk after.
        assert start <= s0 + 0.05 and start >= s0 - chunk - 0.05, (start, s0)
        assert end >= s1 - 0.05 and end <= s1 + 2 * chunk + 0.05, (end, s1)
    assert not [m for m in rec.messages if m.get("type") == "error"]
    await asyncio.sleep(0.2)
    assert stream.active_sessions == 0


async def test_fifty_concurrent_sessions_all_get_replies_and_batch(serve):
    stream = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=64)
    server = serve(stream)
    before = get_vad_engine().batcher.stats.snapshot()
    name = "two_voices_noise_16k.wav"
    pcm = speech_48k(name)
    recs = await asyncio.gather(
        *(
            stream_audio(f"{server.ws}/websocket/offer", f"s{i}", np.roll(pcm, 480 * i), 48000, tail_s=2.5)
            for i in range(50)
        )
    )
    counts = [len(r.replies()) for r in recs]
    assert all(c >= 1 for c in counts), counts
    after = get_vad_engine().batcher.stats.snapshot()
    new_hist = {k: v - before["batch_size_hist"].get(k, 0) for k, v in after["batch_size_hist"].items()}
    assert max(k for k, v in new_hist.items() if v > 0) > 1, new_hist
    assert after["failed"] == before["failed"]


async def test_first_frame_is_part_of_the_utterance():
    """The very first frame counts: chunks start at the first sample (a reset of the VAD state
    on the first frame must not discard it)."""
    handler = ReplyOnPause(echo).copy()
    frame = np.full((1, 960), 1000, np.int16)
    await handler.receive((48000, frame))
    assert handler._state.buffered == 960
    handler.shutdown()
