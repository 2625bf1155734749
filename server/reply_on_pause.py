"""`ReplyOnPause`: FastRTC's turn taking, with Silero VAD on the shared batcher.

Semantics follow FastRTC 0.0.34: audio is accumulated; every `audio_chunk_duration` seconds
the VAD measures the seconds of speech in the chunk (Silero's own segment logic over the
chunk's window probabilities). More than `started_talking_threshold` -> the user started
talking; after that, a chunk with less than `speech_threshold` of speech -> pause: `fn` is
called with the whole utterance. Unlike FastRTC, the VAD state carries across chunks (one
stream per connection, v5+ model from the installed wheel) and all sessions share one batched
model call.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Importing silero_vad sets torch to one thread for the whole process (its model.py calls
# torch.set_num_threads(1)); we only want its segment logic, so put the setting back.
_threads = torch.get_num_threads()
from silero_vad.utils_vad import get_speech_timestamps_from_probs  # noqa: E402

torch.set_num_threads(_threads)

from .handlers import AsyncStreamHandler, EmitType
from .utils import call_on_loop, create_message, to_mono
from .vad_engine import VAD_RATE, WINDOW, VADStream, get_vad_engine

logger = logging.getLogger(__name__)


@dataclass
class AlgoOptions:
    audio_chunk_duration: float = 0.6
    started_talking_threshold: float = 0.2
    speech_threshold: float = 0.1
    max_continuous_speech_s: float = math.inf


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


ModelOptions = SileroVadOptions


def speech_seconds(probs: np.ndarray, options: SileroVadOptions) -> float:
    """Seconds of speech Silero's segment logic finds in one chunk's window probabilities."""
    if len(probs) == 0:
        return 0.0
    n = len(probs) * WINDOW
    segments = get_speech_timestamps_from_probs(
        [float(p) for p in probs],
        sampling_rate=VAD_RATE,
        threshold=options.threshold,
        min_speech_duration_ms=options.min_speech_duration_ms,
        max_speech_duration_s=options.max_speech_duration_s,
        min_silence_duration_ms=options.min_silence_duration_ms,
        speech_pad_ms=options.speech_pad_ms,
        audio_length_samples=n,
    )
    return sum(s["end"] - s["start"] for s in segments) / VAD_RATE


@dataclass
class _TurnState:
    started_talking: bool = False
    buffer: list[np.ndarray] = field(default_factory=list)
    buffered: int = 0
    utterance: list[np.ndarray] = field(default_factory=list)
    utterance_len: int = 0
    sample_rate: int = 0


class ReplyOnPause(AsyncStreamHandler):
    def __init__(
        self,
        fn: Callable[..., Any],
        startup_fn: Callable[..., Any] | None = None,
        algo_options: AlgoOptions | None = None,
        model_options: SileroVadOptions | None = None,
        can_interrupt: bool = True,
        expected_layout: str = "mono",
        output_sample_rate: int = 24000,
        output_frame_size: int | None = None,
        input_sample_rate: int = 48000,
        model: Any = None,
        needs_args: bool = False,
    ) -> None:
        super().__init__(
            expected_layout,  # type: ignore[arg-type]
            output_sample_rate,
            output_frame_size,
            input_sample_rate=input_sample_rate,
        )
        self.fn = fn
        self.startup_fn = startup_fn
        self.algo_options = algo_options or AlgoOptions()
        self.model_options = model_options or SileroVadOptions()
        self.can_interrupt = can_interrupt
        self.needs_args = needs_args
        self.model = model  # a custom PauseDetectionModel is not batched; kept for API parity
        self.default_args: list[Any] = []
        self._state = _TurnState()
        self._vad: VADStream | None = None
        self._out: asyncio.Queue[EmitType] = asyncio.Queue(maxsize=64)
        self._reply: asyncio.Task | None = None
        self.replies_started = 0
        self._shut_down = False

    def copy(self) -> ReplyOnPause:
        clone = ReplyOnPause(
            self.fn,
            self.startup_fn,
            self.algo_options,
            self.model_options,
            self.can_interrupt,
            self.expected_layout,
            self.output_sample_rate,
            None,
            self.input_sample_rate,
            self.model,
            self.needs_args,
        )
        clone.default_args = list(self.default_args)
        return clone

    @property
    def responding(self) -> bool:
        return self._reply is not None and not self._reply.done()

    # -- input -----------------------------------------------------------------------------
    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        if self._shut_down or (self.responding and not self.can_interrupt):
            return
        sr, array = frame
        audio = to_mono(np.asarray(array))
        if self._state.sample_rate != sr:
            self._reset_vad(sr)
        st = self._state  # after a reset: the first frame belongs to the new state
        st.buffer.append(audio)
        st.buffered += audio.shape[0]
        if st.buffered < self.algo_options.audio_chunk_duration * sr:
            return
        chunk = np.concatenate(st.buffer)
        st.buffer, st.buffered = [], 0
        await self._on_chunk(sr, chunk)

    def _reset_vad(self, sr: int) -> None:
        if self._vad is not None:
            self._vad.close()
            self._vad = None
        if self._shut_down:  # a frame that raced the session's end: never take a new slot
            raise RuntimeError("ReplyOnPause: the connection has ended")
        self._vad = get_vad_engine().open_stream(sr)
        self._state = _TurnState(sample_rate=sr)

    async def _on_chunk(self, sr: int, chunk: np.ndarray) -> None:
        assert self._vad is not None
        probs = await self._vad.process(chunk)
        dur = speech_seconds(probs, self.model_options)
        st = self._state
        algo = self.algo_options
        if dur > algo.started_talking_threshold and not st.started_talking:
            st.started_talking = True
            await self.send_message(create_message("log", "started_talking"))
        if not st.started_talking:
            return
        st.utterance.append(chunk)
        st.utterance_len += chunk.shape[0]
        if dur < algo.speech_threshold or st.utterance_len / sr >= algo.max_continuous_speech_s:
            utterance = np.concatenate(st.utterance).reshape(1, -1)
            st.started_talking = False
            st.utterance, st.utterance_len = [], 0
            await self.send_message(create_message("log", "pause_detected"))
            await self._start_reply(sr, utterance)

    # -- output ----------------------------------------------------------------------------
    async def _start_reply(self, sr: int, utterance: np.ndarray) -> None:
        if self.responding:
            # Only reachable with can_interrupt: the new turn replaces the old reply.
            self._reply.cancel()  # type: ignore[union-attr]
        if self.can_interrupt:
            # As FastRTC: a new turn also drops reply audio still queued or playing, even
            # when its generator already finished (the phone client gets Twilio's `clear`).
            self._drain()
            self.clear_queue()
        args = self.latest_args[1:] if self.latest_args else list(self.default_args)
        self.replies_started += 1
        self._reply = asyncio.create_task(self._run(self.fn, (sr, utterance), *args))

    async def start_up(self) -> None:
        if self.startup_fn is not None:
            args = self.latest_args[1:] if self.latest_args else list(self.default_args)
            self._reply = asyncio.create_task(self._run(self.startup_fn, *args))

    async def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            first = True
            if inspect.isasyncgen(result):
                async for item in result:
                    first = await self._put(item, first)
            elif inspect.isgenerator(result):
                sentinel = object()
                while True:
                    # A sync generator may do blocking model work: step it on a thread.
                    item = await self.run_blocking(next, result, sentinel)
                    if item is sentinel:
                        break
                    first = await self._put(item, first)
            elif result is not None:
                await self._put(result, first)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the handler's fault: tell this client, keep the session
            logger.exception("ReplyOnPause handler raised")
            if self._report_error is not None:
                self._report_error(e)
            else:
                await self.send_message(create_message("error", f"{type(e).__name__}: {e}"))

    async def _put(self, item: EmitType, first: bool) -> bool:
        if item is None:
            return first
        if first:
            await self.send_message(create_message("log", "response_starting"))
        await self._out.put(item)
        return False

    def _drain(self) -> None:
        while not self._out.empty():
            self._out.get_nowait()

    async def emit(self) -> EmitType:
        return await self._out.get()

    def shutdown(self) -> None:
        """May run on a handler thread: the reply task is cancelled on its own loop."""
        self._shut_down = True
        if self._reply is not None:
            if self._loop is not None:
                call_on_loop(self._loop, self._reply.cancel)
            else:
                self._reply.cancel()
        if self._vad is not None:
            self._vad.close()
            self._vad = None
