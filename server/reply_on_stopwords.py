"""`ReplyOnStopWords`: FastRTC's wake-word turn taking on top of `ReplyOnPause`.

Until a stop word is heard, every `audio_chunk_duration` of audio goes through the shared
batched VAD; the last `STOPWORD_WINDOW_S` seconds are transcribed by the STT model on the
session's handler threads (never on the event loop) and searched for a stop word, when speech
has just ended and every `STT_STRIDE_S` during speech. (FastRTC transcribes its 2 s window
every chunk, 0.6 s; PocketSphinx needs ~0.7 s of CPU per second of audio, so that would not
keep up. Windows 1.2 s apart overlap by 0.8 s: a stop word up to 0.8 s long is whole in one.)
Once one is heard the client gets FastRTC's `{"type": "stopword"}` message and
`ReplyOnPause`'s machinery takes over: the speech after the stop word, up to the next pause,
is the utterance `fn` receives. After that pause a stop word is needed again.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from .engine import EngineTimeout, EngineUnavailable
from .pause_detection import ModelOptions, PauseDetectionModel
from .reply_on_pause import AlgoOptions, ReplyOnPause
from .speech_to_text import STTModel, get_stt_model
from .utils import create_message, to_mono

logger = logging.getLogger(__name__)

__all__ = ["STOPWORD_WINDOW_S", "STT_STRIDE_S", "ReplyOnStopWords"]

# FastRTC's: the last 2 s of audio are transcribed, so a stop word split across two chunks
# is still heard whole.
STOPWORD_WINDOW_S = 2.0
# During speech the window is transcribed once per this much new audio.
STT_STRIDE_S = 1.2


def _stop_word_pattern(stop_word: str) -> re.Pattern[str]:
    """FastRTC's match: whole words, case-insensitive, any whitespace between the words of a
    phrase, trailing punctuation allowed."""
    words = stop_word.lower().strip().split()
    return re.compile(r"\b" + r"\s+".join(map(re.escape, words)) + r"[.,!?]*\b")


class ReplyOnStopWords(ReplyOnPause):
    """Call `fn` with what the user says after one of `stop_words`, once they pause.

    FastRTC's signature; `stt_model` (an addition) replaces the default
    `get_stt_model("moonshine/base")` (offline: PocketSphinx unless local Moonshine files are
    present; see docs/speech_models.md).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        stop_words: list[str],
        startup_fn: Callable[..., Any] | None = None,
        algo_options: AlgoOptions | None = None,
        model_options: ModelOptions | None = None,
        can_interrupt: bool = True,
        expected_layout: Literal["mono", "stereo"] = "mono",
        output_sample_rate: int = 24000,
        output_frame_size: int | None = None,
        input_sample_rate: int = 48000,
        model: PauseDetectionModel | None = None,
        needs_args: bool = False,
        stt_model: STTModel | None = None,
    ) -> None:
        if isinstance(stop_words, str) or not all(isinstance(w, str) and w.strip() for w in stop_words):
            raise TypeError("stop_words must be a list of non-empty strings, e.g. ['computer']")
        if not stop_words:
            raise ValueError("stop_words must name at least one word or phrase")
        if stt_model is not None and not callable(getattr(stt_model, "stt", None)):
            raise TypeError("stt_model must be an STTModel: an object with stt((sample_rate, audio)) -> str")
        super().__init__(
            fn,
            startup_fn=startup_fn,
            algo_options=algo_options,
            model_options=model_options,
            can_interrupt=can_interrupt,
            expected_layout=expected_layout,
            output_sample_rate=output_sample_rate,
            output_frame_size=output_frame_size,
            input_sample_rate=input_sample_rate,
            model=model,
            needs_args=needs_args,
        )
        self.stop_words = list(stop_words)
        self._patterns = [_stop_word_pattern(w) for w in self.stop_words]
        self.stt_model: STTModel = stt_model if stt_model is not None else get_stt_model("moonshine/base")
        self.heard_stop_word = False
        # The audio being listened to for a stop word: (mono chunk, VAD heard speech in it).
        self._window: deque[tuple[np.ndarray, bool]] = deque()
        self._window_len = 0
        self._untranscribed = False  # speech in the window the STT has not seen yet
        self._since_stt = 0  # samples since that speech began or was last transcribed

    def _init_kwargs(self) -> dict[str, Any]:
        return {**super()._init_kwargs(), "stop_words": self.stop_words,
                "stt_model": self.stt_model}

    def copy(self) -> ReplyOnStopWords:
        clone = ReplyOnStopWords(**self._init_kwargs())
        clone.default_args = list(self.default_args)
        return clone

    def stop_word_detected(self, text: str) -> bool:
        """Whether `text` contains one of the stop words (FastRTC's public method)."""
        text = text.lower()
        return any(p.search(text) for p in self._patterns)

    # ReplyOnPause hands each hop (sliding) or chunk (tumbling) here; until a stop word is
    # heard, audio is listened to instead of judged for turns.
    async def _on_hop(self, sr: int, piece: np.ndarray) -> None:
        if self.heard_stop_word:
            await super()._on_hop(sr, piece)
        else:
            await self._listen(sr, piece)

    async def _on_chunk(self, sr: int, chunk: np.ndarray) -> None:
        if self.heard_stop_word:
            await super()._on_chunk(sr, chunk)
        else:
            await self._listen(sr, chunk)

    async def _has_speech(self, sr: int, mono: np.ndarray) -> bool:
        if self._silent(sr, mono) is not None:
            return False
        try:
            if self.model is not None:
                return await self._speech_seconds(sr, mono) > 0
            assert self._vad is not None
            probs = await self._vad.process(mono)  # keeps the VAD stream's state continuous
        except (EngineUnavailable, EngineTimeout) as e:
            logger.warning("ReplyOnStopWords: VAD unavailable, transcribing anyway: %s", e)
            return True
        return bool(probs.size) and float(probs.max()) >= self.model_options.threshold

    async def _listen(self, sr: int, chunk: np.ndarray) -> None:
        st = self._state
        mono = to_mono(chunk)
        speech = await self._has_speech(sr, mono)
        if self._state is not st or self._shut_down:
            return  # the session reset or ended meanwhile
        self._window.append((mono, speech))
        self._window_len += mono.shape[-1]
        while self._window_len - self._window[0][0].shape[-1] >= STOPWORD_WINDOW_S * sr:
            self._window_len -= self._window.popleft()[0].shape[-1]
        if not speech and not self._untranscribed:
            return  # nothing new to transcribe: no STT call
        if speech and not self._untranscribed:
            self._untranscribed, self._since_stt = True, 0
        self._since_stt += mono.shape[-1]
        if speech and self._since_stt < STT_STRIDE_S * sr:
            return  # mid-speech: wait for the speech to end or a stride to pass
        self._untranscribed, self._since_stt = False, 0
        audio = np.concatenate([c for c, _ in self._window])
        text = await self.run_blocking(self.stt_model.stt, (sr, audio))
        logger.debug("ReplyOnStopWords heard %r", text)
        if self._state is not st or self._shut_down or not self.stop_word_detected(text):
            return
        self.heard_stop_word = True
        self._window.clear()
        self._window_len = 0
        self._untranscribed, self._since_stt = False, 0
        self.send_stopword()

    def send_stopword(self) -> None:
        """Tell the client a stop word was heard (FastRTC's message; safe from any thread)."""
        self.send_message_sync(create_message("stopword", ""))

    def _reset_vad(self, sr: int) -> None:
        super()._reset_vad(sr)
        self._window.clear()  # audio at another rate cannot join the window
        self._window_len = 0
        self._untranscribed, self._since_stt = False, 0

    async def _pause(self, sr: int) -> None:
        self.heard_stop_word = False  # each turn needs its own stop word
        await super()._pause(sr)
