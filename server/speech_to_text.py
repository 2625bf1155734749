"""FastRTC's `get_stt_model()` and `STTModel`, served offline.

FastRTC 0.0.34 downloads Moonshine from a model hub. Here `get_stt_model("moonshine/base")`
uses local Moonshine files when they are present (see `server.local_models`) and the
`useful-moonshine-onnx` package is installed; otherwise it falls back, with a logged warning,
to PocketSphinx, whose English acoustic model, language model and dictionary ship inside the
`pocketsphinx` wheel. Nothing is downloaded.

PocketSphinx decodes one utterance at a time on the CPU and holds the GIL for much of it, so
its calls are not batched on the engine like the VAD: they run on worker threads (a small pool
of decoders, each about 90 MB), one call per utterance.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from .local_models import ENV_VAR, find_files, model_dir
from .pause_detection import to_16k
from .utils import audio_to_int16

logger = logging.getLogger(__name__)

__all__ = ["MoonshineSTT", "PocketSphinxSTT", "STTModel", "get_stt_model", "stt_for_chunks"]

STT_RATE = 16000
MOONSHINE_MODELS = ("moonshine/base", "moonshine/tiny")
MOONSHINE_FILES = ("encoder_model.onnx", "decoder_model_merged.onnx")
# Decoders a PocketSphinxSTT keeps: more only help on more cores (each holds ~90 MB).
DEFAULT_DECODERS = max(1, min(4, os.cpu_count() or 1))
# How long a call waits for a free decoder before it gives up (every wait has a timeout).
DECODER_WAIT_S = 60.0


class STTModel(Protocol):
    """FastRTC's speech-to-text protocol."""

    def stt(self, audio: tuple[int, NDArray[np.int16 | np.float32]]) -> str: ...


def _mono_16k(audio: tuple[int, NDArray[Any]]) -> NDArray[np.float32]:
    """`(sample_rate, samples)` as FastRTC accepts it ((n,), (1, n), (n, 1), int16 or float)
    -> mono float32 at 16 kHz, or ValueError saying what is wrong."""
    if not isinstance(audio, tuple) or len(audio) != 2:
        raise ValueError("audio must be a (sample_rate, numpy array) tuple")
    sr, samples = audio
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sr!r}")
    x = np.asarray(samples)
    if x.dtype.kind not in "iuf":
        raise ValueError(f"audio samples must be int16 or float, got dtype {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D or 2-D (channels, samples); got shape {x.shape}")
    if x.dtype.kind == "f":
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    if x.size == 0:
        return np.zeros(0, np.float32)
    return to_16k(int(sr), x)


class PocketSphinxSTT:
    """English speech to text with PocketSphinx's bundled model (offline, CPU).

    Thread-safe: each call borrows one decoder from a pool of at most `max_decoders`, made on
    first use. Much less accurate than Moonshine (see docs/speech_models.md).
    """

    def __init__(self, max_decoders: int = DEFAULT_DECODERS) -> None:
        try:
            import pocketsphinx  # noqa: F401
        except ImportError as e:  # a main dependency: only a broken install gets here
            raise ImportError("speech-to-text needs the pocketsphinx package: pip install pocketsphinx") from e
        if max_decoders < 1:
            raise ValueError(f"max_decoders must be >= 1, got {max_decoders}")
        self.max_decoders = max_decoders
        self._free: queue.LifoQueue[Any] = queue.LifoQueue()
        self._made = 0
        self._lock = threading.Lock()

    def _borrow(self) -> Any:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            make = self._made < self.max_decoders
            if make:
                self._made += 1
        if make:
            from pocketsphinx import Decoder

            try:
                return Decoder(samprate=STT_RATE, loglevel="FATAL")
            except BaseException:
                with self._lock:
                    self._made -= 1
                raise
        try:
            return self._free.get(timeout=DECODER_WAIT_S)
        except queue.Empty:
            raise TimeoutError(f"no PocketSphinx decoder became free within {DECODER_WAIT_S:g} s") from None

    def stt(self, audio: tuple[int, NDArray[np.int16 | np.float32]]) -> str:
        pcm = audio_to_int16(_mono_16k(audio))
        if pcm.size == 0:
            return ""
        decoder = self._borrow()
        try:
            decoder.start_utt()
            decoder.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        finally:
            self._free.put(decoder)
        return hyp.hypstr if hyp is not None else ""


class MoonshineSTT:
    """Moonshine (ONNX) from local files, FastRTC's model; needs `useful-moonshine-onnx`."""

    def __init__(
        self,
        model: Literal["moonshine/base", "moonshine/tiny"] = "moonshine/base",
        models_dir: Path | None = None,
    ) -> None:
        if model not in MOONSHINE_MODELS:
            raise ValueError(f"unknown Moonshine model {model!r}: use one of {MOONSHINE_MODELS}")
        models_dir = models_dir or find_files(model, MOONSHINE_FILES)
        if models_dir is None:
            raise FileNotFoundError(
                f"no Moonshine files ({', '.join(MOONSHINE_FILES)}) in {model_dir() / model}: "
                f"put them there or set {ENV_VAR} (nothing is downloaded)"
            )
        from moonshine_onnx import MoonshineOnnxModel, load_tokenizer

        # The package's tokenizer is bundled; with models_dir it reads the weights from there.
        self.model = MoonshineOnnxModel(models_dir=str(models_dir), model_name=model.split("/")[-1])
        self.tokenizer = load_tokenizer()

    def stt(self, audio: tuple[int, NDArray[np.int16 | np.float32]]) -> str:
        x = _mono_16k(audio)
        if x.size == 0:
            return ""
        tokens = self.model.generate(x.reshape(1, -1))
        return self.tokenizer.decode_batch(tokens)[0]


def _local_moonshine(model: str) -> STTModel | None:
    folder = find_files(model, MOONSHINE_FILES)
    if folder is None:
        logger.warning(
            "get_stt_model(%r): no local Moonshine files in %s (set %s); using the offline "
            "PocketSphinx model instead (less accurate; nothing is downloaded)",
            model, model_dir() / model, ENV_VAR,
        )
        return None
    try:
        return MoonshineSTT(model, folder)
    except ImportError:
        logger.warning(
            "get_stt_model(%r): Moonshine files found in %s but the useful-moonshine-onnx "
            "package is not installed; using the offline PocketSphinx model instead",
            model, folder,
        )
        return None


@functools.lru_cache(maxsize=None)
def get_stt_model(
    model: Literal["moonshine/base", "moonshine/tiny", "pocketsphinx"] = "moonshine/base",
) -> STTModel:
    """The speech-to-text model for `model`, made once and shared (FastRTC's function).

    FastRTC's Moonshine names use local files when present, else PocketSphinx (warned);
    `"pocketsphinx"` asks for the offline model directly.
    """
    if model not in (*MOONSHINE_MODELS, "pocketsphinx"):
        raise ValueError(f"unknown STT model {model!r}: use one of {(*MOONSHINE_MODELS, 'pocketsphinx')}")
    m: STTModel | None = _local_moonshine(model) if model in MOONSHINE_MODELS else None
    if m is None:
        m = PocketSphinxSTT()
    m.stt((STT_RATE, np.zeros(STT_RATE // 10, np.int16)))  # warm up: loads the model now
    return m


def stt_for_chunks(
    stt_model: STTModel,
    audio: tuple[int, NDArray[np.int16 | np.float32]],
    chunks: list[dict[str, int]],
) -> str:
    """FastRTC's helper: transcribe each `{"start", "end"}` sample range, joined by spaces."""
    sr, audio_np = audio
    return " ".join(stt_model.stt((sr, audio_np[c["start"] : c["end"]])) for c in chunks)
