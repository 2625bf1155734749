"""The speech WAV fixtures the tests and the benchmarks both use (real espeak-ng speech; the
files live in tests/fixtures/, regenerate them with tests/fixtures/make_fixtures.sh)."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# All 16 kHz mono int16; real (espeak-ng) speech separated by pauses.
SPEECH_FIXTURES: tuple[str, ...] = (
    "speech_pause_speech_16k.wav",  # sentence, 2.5 s digital silence, sentence, 1 s silence
    "two_voices_noise_16k.wav",     # en-gb male + en-us female, 1.2 s pause, white noise
    "fast_short_pauses_16k.wav",    # fast female, 3 phrases, 0.7 s / 1.0 s pauses, white noise
    "slow_long_pause_16k.wav",      # slow en-gb-scotland, 2 s pause, quieter noise
)


def load_wav(name: str) -> tuple[int, np.ndarray]:
    """Read a fixture (name relative to FIXTURES_DIR, or a path) -> (sample_rate, int16 1-D)."""
    path = Path(name)
    if not path.is_absolute():
        path = FIXTURES_DIR / path
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
    if channels > 1:  # keep the first channel; fixtures are mono anyway
        data = data.reshape(-1, channels)[:, 0].copy()
    return rate, data


def speech_spans(name: str) -> list[tuple[float, float]]:
    """Where make_fixtures.sh put speech in fixture `name`: [(start_s, end_s), ...]."""
    spans = json.loads((FIXTURES_DIR / "speech_spans.json").read_text())
    return [(float(a), float(b)) for a, b in spans[name]]
