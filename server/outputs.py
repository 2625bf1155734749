"""What a handler's `emit()` may return, checked once for every front end.

FastRTC's `EmitType`: `None`, `(sample_rate, array)`, `(sample_rate, array, layout)`,
`AdditionalOutputs`, `CloseStream`, or `((sample_rate, array), AdditionalOutputs)`. Anything
else (a string, a dict, an absurd sample rate, a 3-D array) is an error the client is told
about, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .utils import AdditionalOutputs, CloseStream

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_AUDIO_SECONDS = 60.0  # one emitted chunk; longer replies come as several chunks


class InvalidOutput(TypeError):
    """A handler returned something that is not a valid output."""


@dataclass(frozen=True)
class Output:
    audio: tuple[int, np.ndarray] | None = None
    extra: AdditionalOutputs | None = None
    close: CloseStream | None = None


def parse_output(item: Any) -> Output:
    """Validate one `emit()` result (not None). Raises `InvalidOutput` with what was wrong."""
    if isinstance(item, AdditionalOutputs):
        return Output(extra=item)
    if isinstance(item, CloseStream):
        return Output(close=item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (AdditionalOutputs, CloseStream)):
        audio = check_audio(item[0])
        if isinstance(item[1], AdditionalOutputs):
            return Output(audio=audio, extra=item[1])
        return Output(audio=audio, close=item[1])
    return Output(audio=check_audio(item))


def check_audio(audio: Any) -> tuple[int, np.ndarray]:
    """`(sample_rate, array)` or `(sample_rate, array, "mono"|"stereo")` -> `(rate, array)`."""
    if not isinstance(audio, tuple) or len(audio) not in (2, 3):
        raise InvalidOutput(
            f"emit() returned {_describe(audio)}; expected (sample_rate, np.ndarray), "
            "AdditionalOutputs, CloseStream, ((sample_rate, np.ndarray), AdditionalOutputs) or None"
        )
    rate, array = audio[0], audio[1]
    if len(audio) == 3 and audio[2] not in ("mono", "stereo"):
        raise InvalidOutput(f"audio layout must be 'mono' or 'stereo', got {audio[2]!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE:
        raise InvalidOutput(
            f"audio sample rate must be an int in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}], got {_describe(rate)}"
        )
    if not isinstance(array, np.ndarray):
        raise InvalidOutput(f"audio samples must be a numpy array, got {_describe(array)}")
    if array.dtype.kind not in "iuf" or array.ndim not in (1, 2):
        raise InvalidOutput(
            f"audio samples must be a 1-D or 2-D (channels, samples) int or float array, got "
            f"{array.dtype} {array.shape}"
        )
    if array.ndim == 2 and min(array.shape) > 8:
        raise InvalidOutput(f"audio array {array.shape} has more than 8 channels")
    if array.size > MAX_AUDIO_SECONDS * int(rate) * (min(array.shape) if array.ndim == 2 else 1):
        raise InvalidOutput(f"one audio chunk may hold at most {MAX_AUDIO_SECONDS:g} s; got {array.shape} at {int(rate)} Hz")
    return int(rate), array


def _describe(obj: Any) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
