"""get_stt_model() / get_tts_model(): the offline models on real eSpeak NG speech."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
from scipy.signal import resample_poly

from server import CartesiaTTSOptions, KokoroTTSOptions, get_stt_model, get_tts_model
from server.speech_to_text import MoonshineSTT, PocketSphinxSTT, stt_for_chunks
from server.text_to_speech import EspeakTTS
from tests.audio_fixtures import load_wav, speech_spans

FIXTURE = "stop_word_16k.wav"
SENTENCES = ["the sky is blue and the grass is green", "hey computer", "what time is it"]


def wer(ref: str, hyp: str) -> float:
    """Word error rate: word-level edit distance over the reference's length."""
    r, h = ref.split(), hyp.lower().split()
    d = np.arange(len(h) + 1)
    for i, rw in enumerate(r, 1):
        prev, d[0] = d.copy(), i
        for j, hw in enumerate(h, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (rw != hw))
    return float(d[-1]) / len(r)


def clips() -> list[tuple[int, np.ndarray]]:
    """Each sentence of the fixture with 0.3 s of its noise floor either side."""
    sr, x = load_wav(FIXTURE)
    return [(sr, x[int((a - 0.3) * sr) : int((b + 0.3) * sr)]) for a, b in speech_spans(FIXTURE)]


def with_noise_floor(sr: int, audio: np.ndarray, seed: int = 0) -> np.ndarray:
    """0.3 s either side and low white noise, as a microphone would record it (PocketSphinx
    misrecognises clean synthetic speech on digital silence far more often)."""
    pad = np.zeros(int(0.3 * sr), np.float32)
    x = np.concatenate([pad, audio.astype(np.float32), pad])
    return x + np.random.default_rng(seed).normal(0, 0.001, x.size).astype(np.float32)


@pytest.fixture(scope="module")
def stt() -> PocketSphinxSTT:
    return PocketSphinxSTT(max_decoders=2)


def test_stt_transcribes_known_sentences(stt):
    got = [stt.stt(c) for c in clips()]
    for ref, hyp in zip(SENTENCES, got):
        assert wer(ref, hyp) <= 0.25, (ref, hyp)
    assert "computer" in got[1].split(), got


def test_stt_accepts_fastrtc_argument_forms(stt):
    sr, x = clips()[0]
    x48 = resample_poly(x.astype(np.float64), 3, 1)
    forms = [
        (sr, x),  # int16 (n,)
        (sr, x.reshape(1, -1)),  # (1, n) as FastRTC's handlers get it
        (sr, x.reshape(-1, 1)),  # (n, 1)
        (sr, x.astype(np.float32) / 32768),  # float32 in [-1, 1]
        (48000, np.clip(np.round(x48), -32768, 32767).astype(np.int16)),  # WebRTC's rate
        (np.int64(sr), x),
    ]
    for audio in forms:
        hyp = stt.stt(audio)
        assert wer(SENTENCES[0], hyp) <= 0.25, (audio[0], audio[1].shape, audio[1].dtype, hyp)


def test_stt_bad_input_gets_clear_errors(stt):
    x = np.zeros(1600, np.int16)
    with pytest.raises(ValueError, match="sample_rate"):
        stt.stt((0, x))
    with pytest.raises(ValueError, match="sample_rate"):
        stt.stt((16000.0, x))
    with pytest.raises(ValueError, match="tuple"):
        stt.stt(x)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        stt.stt((16000, np.zeros((2, 2, 100), np.int16)))
    with pytest.raises(ValueError, match="dtype"):
        stt.stt((16000, np.array(["a", "b"])))
    assert stt.stt((16000, np.zeros(0, np.int16))) == ""
    # NaN and infinities are not audio, but they do not crash the decoder either.
    bad = np.full(1600, np.nan, np.float32)
    bad[::2] = np.inf
    assert isinstance(stt.stt((16000, bad)), str)
    # ... and the model still works afterwards.
    assert wer(SENTENCES[2], stt.stt(clips()[2])) <= 0.25


def test_stt_concurrent_calls_match_sequential(stt):
    cs = clips()
    expected = [stt.stt(c) for c in cs]
    got: dict[int, str] = {}

    def work(i: int) -> None:
        got[i] = stt.stt(cs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(len(cs))] == expected
    assert stt._made <= stt.max_decoders


def test_stt_for_chunks_joins_each_span(stt):
    sr, x = load_wav(FIXTURE)
    chunks = [{"start": int((a - 0.3) * sr), "end": int((b + 0.3) * sr)} for a, b in speech_spans(FIXTURE)]
    text = stt_for_chunks(stt, (sr, x), chunks)
    assert wer(" ".join(SENTENCES), text) <= 0.2, text


def test_get_stt_model_without_local_files_warns_and_uses_pocketsphinx(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BATCHRTC_MODEL_DIR", str(tmp_path))
    get_stt_model.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="server.speech_to_text"):
            m = get_stt_model("moonshine/tiny")
        assert isinstance(m, PocketSphinxSTT)
        assert str(tmp_path / "moonshine" / "tiny") in caplog.text
        assert get_stt_model("moonshine/tiny") is m  # made once
        # Files present but no Moonshine runtime installed: still offline, still said so.
        folder = tmp_path / "moonshine" / "base"
        folder.mkdir(parents=True)
        for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
            (folder / name).write_bytes(b"not a model")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="server.speech_to_text"):
            m2 = get_stt_model("moonshine/base")
        try:
            import moonshine_onnx  # noqa: F401
        except ImportError:
            assert isinstance(m2, PocketSphinxSTT)
            assert "useful-moonshine-onnx" in caplog.text
        with pytest.raises(ValueError, match="unknown STT model"):
            get_stt_model("whisper")
    finally:
        get_stt_model.cache_clear()


def test_moonshine_without_files_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHRTC_MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BATCHRTC_MODEL_DIR"):
        MoonshineSTT("moonshine/base")
    with pytest.raises(ValueError, match="unknown Moonshine model"):
        MoonshineSTT("moonshine/huge")  # type: ignore[arg-type]


# -- text to speech ------------------------------------------------------------------------


def same_speech(a: np.ndarray, b: np.ndarray) -> bool:
    """The same synthesis: eSpeak's Klatt voice adds random aspiration noise, so two runs of
    one text differ a little sample for sample (correlation down to ~0.9); their loudness
    envelopes (10 ms RMS) agree closely."""
    if a.size != b.size:
        return False
    if not a.any() or not b.any():  # the gap between sentences is silence
        return not a.any() and not b.any()
    n = a.size // 220 * 220
    env_a, env_b = (np.sqrt((x[:n].reshape(-1, 220) ** 2).mean(axis=1)) for x in (a, b))
    return float(np.corrcoef(env_a, env_b)[0, 1]) > 0.98


@pytest.fixture(scope="module")
def tts() -> EspeakTTS:
    return EspeakTTS()


def test_tts_is_audible_speech_at_its_rate(tts):
    sr, audio = tts.tts("Please call me back when you are ready.")
    assert sr == 22050
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = audio.size / sr
    assert 1.2 < seconds < 4.0, seconds  # eight words at ~175 words a minute
    rms = float(np.sqrt(np.mean(audio**2)))
    assert rms > 0.02 and np.abs(audio).max() <= 1.0, rms
    # Speech has energy in the voice band, not a click or a tone.
    spectrum = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(audio.size, 1 / sr)
    voice = spectrum[(freqs > 100) & (freqs < 4000)].sum()
    assert voice / spectrum.sum() > 0.5


@pytest.mark.parametrize("text", ["please call me back when you are ready", "what time is it"])
def test_tts_round_trips_through_stt(tts, stt, text):
    sr, audio = tts.tts(text)
    hyp = stt.stt((sr, with_noise_floor(sr, audio)))
    assert wer(text, hyp) <= 0.25, hyp


def test_stream_tts_sync_yields_each_sentence_with_a_gap(tts):
    text = "What time is it? The sky is blue."
    chunks = list(tts.stream_tts_sync(text))
    assert len(chunks) == 3, [c[1].size for c in chunks]
    (sr0, a), (sr1, gap), (sr2, b) = chunks
    assert sr0 == sr1 == sr2 == 22050
    assert gap.size == 22050 // 7 and not gap.any()
    assert same_speech(a, tts.tts("What time is it?")[1])
    assert same_speech(b, tts.tts("The sky is blue.")[1])
    assert list(tts.stream_tts_sync("   ")) == []


async def test_stream_tts_async_matches_sync_and_keeps_the_loop_free(tts):
    text = "What time is it? The sky is blue. Please call me back."
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    t = asyncio.create_task(ticker())
    got = [c async for c in tts.stream_tts(text)]
    t.cancel()
    expected = list(tts.stream_tts_sync(text))
    assert len(got) == len(expected) == 5
    for (sr_a, a), (sr_b, b) in zip(got, expected):
        assert sr_a == sr_b and same_speech(a, b)
    assert ticks > 0  # synthesis ran off the event loop


def test_tts_options(tts):
    text = "The sky is blue and the grass is green."
    _, normal = tts.tts(text)
    _, fast = tts.tts(text, KokoroTTSOptions(speed=1.6))
    assert fast.size < 0.8 * normal.size
    _, british = tts.tts(text, KokoroTTSOptions(lang="en-gb"))
    assert british.size > 0 and not same_speech(british, normal)
    _, named = tts.tts(text, KokoroTTSOptions(voice="en-us+f3"))  # an eSpeak voice name
    assert named.size > 0 and not same_speech(named, normal)
    with pytest.raises(ValueError, match="no voice"):
        tts.tts(text, KokoroTTSOptions(voice="xx-yy"))
    with pytest.raises(ValueError, match="speed"):
        tts.tts(text, KokoroTTSOptions(speed=0))
    with pytest.raises(TypeError, match="str"):
        tts.tts(b"bytes")  # type: ignore[arg-type]
    # A failed call leaves the synthesiser working.
    assert same_speech(tts.tts(text)[1], normal)


def test_get_tts_model_without_local_files_warns_and_uses_espeak(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BATCHRTC_MODEL_DIR", str(tmp_path))
    get_tts_model.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="server.text_to_speech"):
            m = get_tts_model()
        assert isinstance(m, EspeakTTS)
        assert str(tmp_path / "kokoro") in caplog.text
        assert get_tts_model() is m
        with pytest.raises(ValueError, match="Cartesia's hosted TTS is not supported"):
            get_tts_model("cartesia")
        assert CartesiaTTSOptions().sample_rate == 22_050  # FastRTC's options still import
        with pytest.raises(ValueError, match="unknown TTS model"):
            get_tts_model("piper")
    finally:
        get_tts_model.cache_clear()


def test_espeak_without_the_wheel_uses_the_system_library_or_says_what_to_install(monkeypatch):
    import ctypes.util
    import subprocess
    import sys

    from server import espeak

    # Neither the wheel nor a system library: a clear error naming both ways to get one.
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import raises ImportError
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(espeak.EspeakError, match="pip install espeakng-loader"):
        espeak._load()
    monkeypatch.undo()
    if ctypes.util.find_library("espeak-ng") is None:
        pytest.skip("no system libespeak-ng (Debian: apt-get install espeak-ng) to fall back to")
    # Without the wheel, the Debian library and its own voice data speak (a fresh process:
    # the synthesiser is global).
    code = (
        "import sys; sys.modules['espeakng_loader'] = None\n"
        "from server.espeak import synthesize\n"
        "sr, pcm = synthesize('hello there', 'en-us')\n"
        "print(sr, pcm.size, int(abs(pcm).max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    sr, n, peak = map(int, out.stdout.split())
    assert sr == 22050 and n > 0.3 * sr and peak > 1000, out.stdout
