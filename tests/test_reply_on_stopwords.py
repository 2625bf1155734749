"""ReplyOnStopWords: FastRTC's stop-word demo, driven by a real WebSocket client with real
speech (tests/fixtures/stop_word_16k.wav: a sentence, "Hey computer.", a question)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from scipy.signal import resample_poly

from server import ReplyOnStopWords, Stream, get_silero_model, get_stt_model
from server.reply_on_stopwords import STOPWORD_WINDOW_S
from tests.audio_fixtures import load_wav, speech_spans
from tests.waiting import wait_for
from tests.webrtc_client import AudioSource, connect
from tests.ws_client import stream_audio

FIXTURE = "stop_word_16k.wav"


def fixture_48k(tail_s: float = 0.0) -> np.ndarray:
    sr, x = load_wav(FIXTURE)
    y = resample_poly(x.astype(np.float64), 3, 1)
    y = np.concatenate([y, np.zeros(int(tail_s * 48000))])
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def test_stop_word_matching_follows_fastrtc():
    h = ReplyOnStopWords(lambda audio: None, ["computer", "hey there"], stt_model=get_stt_model("pocketsphinx"))
    assert h.stop_word_detected("Computer, what time is it?")
    assert h.stop_word_detected("ok COMPUTER!")
    assert h.stop_word_detected("well hey   there you")  # a phrase, any whitespace between
    assert not h.stop_word_detected("computers are fast")  # whole words only
    assert not h.stop_word_detected("hey, there")
    assert not h.stop_word_detected("")


def test_bad_arguments_get_clear_errors():
    stt = get_stt_model("pocketsphinx")
    with pytest.raises(TypeError, match="list of non-empty strings"):
        ReplyOnStopWords(lambda a: None, "computer", stt_model=stt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of non-empty strings"):
        ReplyOnStopWords(lambda a: None, ["computer", ""], stt_model=stt)
    with pytest.raises(ValueError, match="at least one"):
        ReplyOnStopWords(lambda a: None, [], stt_model=stt)
    with pytest.raises(TypeError, match="STTModel"):
        ReplyOnStopWords(lambda a: None, ["computer"], stt_model=object())  # type: ignore[arg-type]


def test_copy_keeps_configuration():
    stt = get_stt_model("pocketsphinx")
    h = ReplyOnStopWords(lambda a: None, ["computer"], stt_model=stt, output_sample_rate=16000)
    h.default_args = [1]
    c = h.copy()
    assert isinstance(c, ReplyOnStopWords) and c is not h
    assert c.stop_words == ["computer"] and c.stt_model is stt
    assert c.output_sample_rate == 16000 and c.default_args == [1]
    assert not c.heard_stop_word


@pytest.mark.parametrize("vad", ["batched", "fastrtc-model"])
async def test_only_speech_after_the_stop_word_gets_a_reply(serve, vad):
    """FastRTC's stop-word demo: the sentence without the stop word gets nothing; after
    "Hey computer." the client is told `stopword`, and the question after it, once the user
    pauses, is what the handler gets and answers. With the shared batched VAD (sliding
    window), and with FastRTC's per-call `model=` (tumbling chunks)."""
    calls: list[tuple[int, np.ndarray]] = []

    def reply(audio: tuple[int, np.ndarray]):
        calls.append(audio)
        sr, samples = audio
        yield sr, samples  # echo the utterance back

    model = get_silero_model() if vad == "fastrtc-model" else None
    handler = ReplyOnStopWords(reply, stop_words=["computer"], model=model)
    stream = Stream(handler, modality="audio", mode="send-receive", concurrency_limit=2)
    server = serve(stream)
    pcm = fixture_48k()
    # Long tail: the STT runs behind real time on a busy 2-core CI machine.
    rec = await stream_audio(f"{server.ws}/websocket/offer", "stop-1", pcm, 48000, tail_s=6.0)

    (s_plain, e_plain), (s_stop, e_stop), (s_q, e_q) = speech_spans(FIXTURE)
    errors = [m for m in rec.messages if m.get("type") == "error"]
    assert not errors, errors
    stopwords = [m for m in rec.messages if m.get("type") == "stopword"]
    assert stopwords == [{"type": "stopword", "data": ""}], rec.messages
    # One turn: the question. The first sentence had no stop word and got no reply.
    assert len(calls) == 1, [c[1].shape for c in calls]
    sr, utterance = calls[0]
    assert sr == 48000 and utterance.shape[0] == 1
    q = e_q - s_q
    # The question, plus at most the pause detector's lead-in and pause windows, and none of
    # the stop-word phrase or the sentence before it (1.5 s and more earlier).
    assert q - 0.1 <= utterance.shape[1] / sr <= q + 2.0, (utterance.shape[1] / sr, q)
    logs = [m["data"] for m in rec.messages if m.get("type") == "log"]
    assert logs.count("pause_detected") == 1 and logs.count("started_talking") == 1, logs
    replies = rec.replies()
    assert len(replies) == 1, [(t, len(r)) for t, r in replies]
    t_first, echoed = replies[0]
    assert t_first > e_q  # no reply before the question was over
    assert abs(echoed.size / 24000 - utterance.shape[1] / sr) < 0.1
    await asyncio.sleep(0.2)
    assert stream.active_sessions == 0


async def test_silence_costs_no_transcription(serve):
    """A noise floor without speech never reaches the STT model: it runs only on windows the
    VAD found speech in."""
    real = get_stt_model("pocketsphinx")
    calls: list[int] = []

    class Counting:
        def stt(self, audio):
            calls.append(audio[1].size)
            return real.stt(audio)

    stream = Stream(
        ReplyOnStopWords(lambda a: None, ["computer"], stt_model=Counting()),
        modality="audio",
        mode="send-receive",
    )
    server = serve(stream)
    quiet = np.random.default_rng(0).normal(0, 30, int(3 * STOPWORD_WINDOW_S * 48000))
    rec = await stream_audio(f"{server.ws}/websocket/offer", "quiet-1", quiet.astype(np.int16), 48000, tail_s=0.5)
    assert not [m for m in rec.messages if m.get("type") in ("error", "stopword")], rec.messages
    assert calls == []
    # The same handler does transcribe speech (so the count above could have been non-zero).
    rec = await stream_audio(f"{server.ws}/websocket/offer", "speech-1", fixture_48k()[: 3 * 48000], 48000, tail_s=1.0)
    assert calls, rec.messages


async def test_stop_word_over_webrtc(serve):
    """The same demo through a real aiortc peer: Opus audio in, the `stopword` message on the
    data channel, the reply as audio."""
    calls: list[tuple[int, np.ndarray]] = []

    def reply(audio: tuple[int, np.ndarray]):
        calls.append(audio)
        yield audio

    stream = Stream(ReplyOnStopWords(reply, ["computer"]), modality="audio", mode="send-receive")
    server = serve(stream)
    pcm = fixture_48k(tail_s=1.0)
    source = AudioSource(pcm)
    client, answer = await connect(server.http, "stop-rtc", audio=source, recv_audio=True)
    s_q, e_q = speech_spans(FIXTURE)[2]  # the question
    try:
        assert answer["type"] == "answer", answer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + pcm.size / 48000 + 8  # the STT may run behind real time
        while not calls and loop.time() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        stopwords = [m for m in client.messages if m.get("type") == "stopword"]
        assert stopwords == [{"type": "stopword", "data": ""}], client.messages
        assert len(calls) == 1, [c[1].shape for c in calls]
        q = e_q - s_q
        assert q - 0.1 <= calls[0][1].shape[1] / calls[0][0] <= q + 2.0
        t0 = source._start
        loud = [t - t0 for t, a in client.audio if np.abs(a.astype(np.int32)).mean() > 300]
        assert loud and loud[0] > e_q, loud[:1]  # the echo, only after the question
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)
