"""FastRTC's `get_tts_model()`, `TTSModel` and `KokoroTTSOptions`, served offline.

FastRTC 0.0.34 downloads Kokoro from a model hub. Here `get_tts_model("kokoro")` uses local
Kokoro files when present (see `server.local_models`) and the `kokoro-onnx` package is
installed; otherwise it falls back, with a logged warning, to eSpeak NG (`server.espeak`:
the library and voices ship in the `espeakng-loader` wheel). Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from .espeak import synthesize
from .local_models import ENV_VAR, find_files, model_dir

logger = logging.getLogger(__name__)

__all__ = ["EspeakTTS", "KokoroTTSModel", "KokoroTTSOptions", "TTSModel", "TTSOptions", "get_tts_model"]

KOKORO_FILES = ("kokoro-v1.0.onnx", "voices-v1.0.bin")
ESPEAK_WPM = 175  # eSpeak's own default rate: speed 1.0
# Kokoro voice names: a letter for the language, one for the gender, "_", a name (af_heart).
_KOKORO_VOICE = re.compile(r"^[a-z][fm]_\w+$")
# eSpeak's Klatt voice: PocketSphinx recognises it far better than the default voice.
ESPEAK_VARIANT = "klatt"


class TTSOptions:
    pass


T = TypeVar("T", bound=TTSOptions, contravariant=True)


class TTSModel(Protocol[T]):
    """FastRTC's text-to-speech protocol."""

    def tts(self, text: str, options: T | None = None) -> tuple[int, NDArray[np.float32] | NDArray[np.int16]]: ...

    def stream_tts(
        self, text: str, options: T | None = None
    ) -> AsyncGenerator[tuple[int, NDArray[np.float32] | NDArray[np.int16]], None]: ...

    def stream_tts_sync(
        self, text: str, options: T | None = None
    ) -> Generator[tuple[int, NDArray[np.float32] | NDArray[np.int16]], None, None]: ...


@dataclass
class KokoroTTSOptions(TTSOptions):
    """FastRTC's options. With eSpeak NG: `lang` picks the language (an eSpeak voice name such
    as `en-us`, `en-gb`, `fr-fr`), `speed` scales the rate; a Kokoro `voice` name (`af_heart`)
    has no eSpeak match and is ignored, any other `voice` is used as an eSpeak voice name."""

    voice: str = "af_heart"
    speed: float = 1.0
    lang: str = "en-us"


@dataclass
class CartesiaTTSOptions(TTSOptions):
    """FastRTC's options for its hosted Cartesia model, so apps that import them load; the
    model itself is not offered here (`get_tts_model("cartesia")` says so)."""

    voice: str = "71a7ad14-091c-4e8e-a314-022ece01c121"
    language: str = "en"
    emotion: list[str] = field(default_factory=list)
    cartesia_version: str = "2024-06-10"
    model: str = "sonic-2"
    sample_rate: int = 22_050


def sentences(text: str) -> list[str]:
    """FastRTC's sentence split (after `.`, `!` or `?` and whitespace), empty ones dropped."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


class EspeakTTS:
    """eSpeak NG speech: 22,050 Hz float32, one sentence at a time when streamed."""

    def _voice(self, options: KokoroTTSOptions) -> tuple[str, int]:
        if not options.speed > 0:
            raise ValueError(f"speed must be > 0, got {options.speed!r}")
        if options.voice and not _KOKORO_VOICE.match(options.voice):
            voice = options.voice
        else:
            voice = f"{options.lang or 'en-us'}+{ESPEAK_VARIANT}"
        return voice, round(ESPEAK_WPM * options.speed)

    def _say(self, text: str, options: KokoroTTSOptions) -> tuple[int, NDArray[np.float32]]:
        voice, wpm = self._voice(options)
        sr, pcm = synthesize(text, voice, wpm)
        return sr, pcm.astype(np.float32) / 32768.0

    def tts(self, text: str, options: KokoroTTSOptions | None = None) -> tuple[int, NDArray[np.float32]]:
        return self._say(_check_text(text), options or KokoroTTSOptions())

    def stream_tts_sync(
        self, text: str, options: KokoroTTSOptions | None = None
    ) -> Generator[tuple[int, NDArray[np.float32]], None, None]:
        options = options or KokoroTTSOptions()
        for i, sentence in enumerate(sentences(_check_text(text))):
            sr, audio = self._say(sentence, options)
            if i:  # FastRTC's gap between sentences: 1/7 s
                yield sr, np.zeros(sr // 7, np.float32)
            yield sr, audio

    async def stream_tts(
        self, text: str, options: KokoroTTSOptions | None = None
    ) -> AsyncGenerator[tuple[int, NDArray[np.float32]], None]:
        options = options or KokoroTTSOptions()
        for i, sentence in enumerate(sentences(_check_text(text))):
            # eSpeak blocks (and serialises callers): never on the event loop.
            sr, audio = await asyncio.to_thread(self._say, sentence, options)
            if i:
                yield sr, np.zeros(sr // 7, np.float32)
            yield sr, audio


class KokoroTTSModel:
    """Kokoro (ONNX) from local files, FastRTC's model; needs the `kokoro-onnx` package."""

    def __init__(self, folder: Path) -> None:
        from kokoro_onnx import Kokoro

        self.model = Kokoro(str(folder / KOKORO_FILES[0]), str(folder / KOKORO_FILES[1]))

    def tts(self, text: str, options: KokoroTTSOptions | None = None) -> tuple[int, NDArray[np.float32]]:
        options = options or KokoroTTSOptions()
        audio, sr = self.model.create(_check_text(text), voice=options.voice, speed=options.speed, lang=options.lang)
        return sr, audio

    async def stream_tts(
        self, text: str, options: KokoroTTSOptions | None = None
    ) -> AsyncGenerator[tuple[int, NDArray[np.float32]], None]:
        options = options or KokoroTTSOptions()
        for i, sentence in enumerate(sentences(_check_text(text))):
            first = True
            async for audio, sr in self.model.create_stream(
                sentence, voice=options.voice, speed=options.speed, lang=options.lang
            ):
                if i and first:
                    yield sr, np.zeros(sr // 7, np.float32)
                first = False
                yield sr, audio

    def stream_tts_sync(
        self, text: str, options: KokoroTTSOptions | None = None
    ) -> Generator[tuple[int, NDArray[np.float32]], None, None]:
        loop = asyncio.new_event_loop()
        agen = self.stream_tts(text, options)
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    break
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()


def _local_kokoro() -> TTSModel | None:
    folder = find_files("kokoro", KOKORO_FILES)
    if folder is None:
        logger.warning(
            "get_tts_model('kokoro'): no local Kokoro files in %s (set %s); using the offline "
            "eSpeak NG voice instead (robotic; nothing is downloaded)",
            model_dir() / "kokoro", ENV_VAR,
        )
        return None
    try:
        return KokoroTTSModel(folder)
    except ImportError:
        logger.warning(
            "get_tts_model('kokoro'): Kokoro files found in %s but the kokoro-onnx package is "
            "not installed; using the offline eSpeak NG voice instead", folder,
        )
        return None


@functools.lru_cache(maxsize=None)
def get_tts_model(model: Literal["kokoro", "espeak"] = "kokoro", **kwargs: Any) -> TTSModel:
    """The text-to-speech model for `model`, made once and shared (FastRTC's function).

    `"kokoro"` uses local Kokoro files when present, else eSpeak NG (warned); `"espeak"` asks
    for eSpeak NG directly. FastRTC's `"cartesia"` is a hosted service and is not offered.
    """
    if model == "cartesia":
        raise ValueError(
            "get_tts_model('cartesia'): Cartesia's hosted TTS is not supported by this server; "
            "use get_tts_model() (eSpeak NG, offline) or put Kokoro's files in "
            "$BATCHRTC_MODEL_DIR (see docs/speech_models.md)")
    if model not in ("kokoro", "espeak"):
        raise ValueError(f"unknown TTS model {model!r}: use 'kokoro' or 'espeak'")
    m = _local_kokoro() if model == "kokoro" else None
    if m is None:
        m = EspeakTTS()
    m.tts("Hello, world!")  # warm up, as FastRTC does: loads the model now
    return m
