"""FastRTC's pause-detection protocol, and Silero VAD run FastRTC's way (one call per chunk).

`ReplyOnPause(fn, model=...)` accepts any object with FastRTC's `PauseDetectionModel` shape.
Without `model`, every connection's VAD runs in the shared batched engine
(`server.vad_engine`); with one, each 0.6 s chunk is handed to `model.vad` on a worker thread,
one call per connection per chunk, as FastRTC 0.0.34 does.

`SileroVADModel` is that per-call path with Silero: one `onnxruntime.InferenceSession` (1
intra-op + 1 inter-op thread, CPU provider) over the `silero_vad.onnx` file that ships inside
the installed `silero-vad` wheel (nothing is downloaded), shared by every connection. Each call
resamples the chunk to 16 kHz, starts the model's state from zero, runs every 512-sample
window (the v5+ model; FastRTC's v4 used 1024) and applies Silero's own segment logic. It is
the baseline `benchmarks/bench_reply.py --modes fastrtc-onnx` measures the batched engine
against.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

# Importing silero_vad sets torch to one thread for the whole process (its model.py calls
# torch.set_num_threads(1)); we only want its segment logic, so put the setting back.
_threads = torch.get_num_threads()
from silero_vad.utils_vad import get_speech_timestamps_from_probs  # noqa: E402

torch.set_num_threads(_threads)

from models.resample import StreamingResampler  # noqa: E402

from .utils import audio_to_float32, to_mono  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "AudioChunk",
    "ModelOptions",
    "PauseDetectionModel",
    "SileroVADModel",
    "SileroVadOptions",
    "get_silero_model",
    "speech_timestamps",
]

VAD_RATE = 16000
WINDOW = 512  # samples per Silero v5+ window at 16 kHz
CONTEXT = 64  # samples of the previous window the v5+ model sees
HIDDEN = 128

AudioChunk: TypeAlias = dict[str, int]  # {"start": sample, "end": sample} at 16 kHz
ModelOptions: TypeAlias = Any


class PauseDetectionModel(Protocol):
    """FastRTC's protocol: `vad` returns (seconds of speech in the chunk, speech segments)."""

    def vad(
        self,
        audio: tuple[int, npt.NDArray[np.int16] | npt.NDArray[np.float32]],
        options: ModelOptions,
    ) -> tuple[float, list[AudioChunk]]: ...

    def warmup(self) -> None: ...


@dataclass
class SileroVadOptions:
    threshold: float = 0.5
    min_speech_duration_ms: int = 250
    max_speech_duration_s: float = math.inf
    min_silence_duration_ms: int = 2000
    # Accepted for compatibility: FastRTC's v4 ONNX model used 1024-sample windows; the v5+
    # model from the wheel always uses 512 at 16 kHz.
    window_size_samples: int = 1024
    speech_pad_ms: int = 400


def speech_timestamps(
    probs: npt.ArrayLike, options: SileroVadOptions, audio_length_samples: int | None = None
) -> list[AudioChunk]:
    """Silero's segment logic over one chunk's 16 kHz window probabilities."""
    # A list (ReplyOnPause's sliding window, ~25 windows per hop) is read as it is.
    probs = [float(p) for p in (probs if isinstance(probs, list) else np.asarray(probs).reshape(-1))]
    if not probs:
        return []
    return get_speech_timestamps_from_probs(
        probs,
        sampling_rate=VAD_RATE,
        threshold=options.threshold,
        min_speech_duration_ms=options.min_speech_duration_ms,
        max_speech_duration_s=options.max_speech_duration_s,
        min_silence_duration_ms=options.min_silence_duration_ms,
        speech_pad_ms=options.speech_pad_ms,
        audio_length_samples=audio_length_samples or len(probs) * WINDOW,
    )


def onnx_model_path() -> str:
    """`silero_vad.onnx` inside the installed silero-vad wheel."""
    path = resources.files("silero_vad") / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall silero-vad (>= 5.1)")
    return str(path)


@functools.lru_cache(maxsize=None)
def _resampler(rate: int) -> StreamingResampler:
    return StreamingResampler(rate, VAD_RATE, device="cpu")


def to_16k(sample_rate: int, audio: np.ndarray) -> np.ndarray:
    """A whole chunk, mono float32 at 16 kHz (same polyphase filter as the batched path, run
    in numpy from zero history, aligned like `StreamingResampler.resample`)."""
    x = audio_to_float32(to_mono(np.asarray(audio))).reshape(-1)
    if sample_rate == VAD_RATE:
        return x
    rs = _resampler(int(sample_rate))
    n_out = x.size * rs.up // rs.down
    # Pad to a multiple of `down`, plus enough zeros to flush the filter's delay.
    pad = (-x.size) % rs.down + rs.down * -(-rs.delay // rs.up)
    y, _ = rs.process_numpy(np.concatenate([x, np.zeros(pad, np.float32)]),
                            np.zeros(rs.history_size, np.float32))
    return y[rs.delay : rs.delay + n_out]


class SileroVADModel:
    """Silero VAD through onnxruntime, one call per chunk, fresh state each call (FastRTC's
    `SileroVADModel`). Thread-safe: onnxruntime sessions may be run from many threads."""

    def __init__(self, path: str | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as e:  # pragma: no cover - a runtime dependency
            raise RuntimeError("SileroVADModel needs onnxruntime (pip install onnxruntime)") from e
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(
            path or onnx_model_path(), providers=["CPUExecutionProvider"], sess_options=opts
        )
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise RuntimeError(f"expected a Silero v5+ model (input, state, sr); got {sorted(names)}")
        self._sr = np.array(VAD_RATE, dtype=np.int64)

    def speech_probs(self, audio16k: np.ndarray) -> np.ndarray:
        """One probability per 512-sample window, state and context from zero; the last
        partial window is zero-padded (as FastRTC and `get_speech_timestamps` do)."""
        x = np.asarray(audio16k, dtype=np.float32).reshape(-1)
        n = -(-x.size // WINDOW)
        padded = np.zeros((1, CONTEXT + n * WINDOW), np.float32)
        padded[0, CONTEXT : CONTEXT + x.size] = x
        state = np.zeros((2, 1, HIDDEN), np.float32)
        out = np.empty(n, np.float32)
        for i in range(n):
            # The model sees the previous window's last 64 samples before each window.
            inp = padded[:, i * WINDOW : (i + 1) * WINDOW + CONTEXT]
            prob, state = self.session.run(None, {"input": inp, "state": state, "sr": self._sr})
            out[i] = prob.reshape(-1)[0]
        return out

    def vad(
        self,
        audio: tuple[int, npt.NDArray[np.int16] | npt.NDArray[np.float32]],
        options: SileroVadOptions | None,
    ) -> tuple[float, list[AudioChunk]]:
        sample_rate, samples = audio
        x = to_16k(int(sample_rate), samples)
        chunks = speech_timestamps(self.speech_probs(x), options or SileroVadOptions(), x.size)
        return sum(c["end"] - c["start"] for c in chunks) / VAD_RATE, chunks

    def warmup(self) -> None:
        for _ in range(2):
            self.vad((24000, np.zeros(24000, np.float32)), None)


_model_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cached_model() -> SileroVADModel:
    model = SileroVADModel()
    model.warmup()
    return model


def get_silero_model() -> PauseDetectionModel:
    """The process's `SileroVADModel`, loaded and warmed up on first use (FastRTC's name)."""
    with _model_lock:  # lru_cache alone may build two under a race
        return _cached_model()
