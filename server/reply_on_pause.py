"""`ReplyOnPause`: FastRTC's turn taking, with Silero VAD on the shared batcher.

Semantics follow FastRTC 0.0.34: the VAD measures the seconds of speech in a stretch of audio
(Silero's own segment logic over its window probabilities). More than
`started_talking_threshold` -> the user started talking; after that, a stretch with less than
`speech_threshold` of speech -> pause: `fn` is called with the whole utterance. FastRTC
measures consecutive `audio_chunk_duration` chunks (`AlgoOptions(pause_window="tumbling")`);
by default the stretch is a window sliding over the last 0.8 s (see `AlgoOptions`). Unlike
FastRTC, the VAD state carries across chunks (one stream per connection, v5+ model from the
installed wheel) and all sessions share one batched model call. With `model=` (FastRTC's
`PauseDetectionModel`), that model measures each chunk instead, one call per connection per
chunk on a worker thread, as in FastRTC.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .handlers import AsyncStreamHandler, EmitType
from .pause_detection import ModelOptions, PauseDetectionModel, SileroVadOptions, speech_timestamps
from .utils import call_on_loop, create_message, to_mono
from .engine import EngineTimeout, EngineUnavailable
from .vad_engine import VAD_RATE, WINDOW, VADStream, get_vad_engine

logger = logging.getLogger(__name__)

__all__ = ["AlgoOptions", "ModelOptions", "ReplyOnPause", "SileroVadOptions", "speech_seconds"]

LAYOUTS = ("mono", "stereo")
# How long a turn waits for `set_input` values after asking for them (`send_input`); FastRTC
# waits forever, which leaves a session whose client never answers stuck without a word.
ARGS_TIMEOUT_S = 10.0
# Outside a turn, audio that never reaches this int16 peak (-66 dBFS: digital silence, a muted
# microphone; a quiet room's noise floor is louder) skips the VAD (see `_silent`).
SILENT_PEAK = 16
# While a hop is being judged in the background (see `ReplyOnPause.receive`), at most this
# much audio waits for the next one; past it, `receive` waits too (the front end then stops
# reading the client, as it did before hops were judged in the background).
MAX_WAITING_AUDIO_S = 2.0


@dataclass
class AlgoOptions:
    """FastRTC's turn-taking options, plus how often the rule is checked.

    The rule is FastRTC's: a stretch of audio holding more than `started_talking_threshold`
    seconds of speech starts a turn; after that, one holding less than `speech_threshold`
    seconds ends it. `pause_window="tumbling"` applies it to consecutive chunks of
    `audio_chunk_duration`, as FastRTC does. `"sliding"` (the default) applies it to the last
    `sliding_window_s` of audio every `sliding_hop_s` while a turn is under way (every
    `audio_chunk_duration` before one starts), so a pause is found as soon as the rule
    holds, or (`decide_early`) as soon as it is certain to hold once the window ends. A custom `model=` (FastRTC's per-call `PauseDetectionModel`) always tumbles.
    """

    audio_chunk_duration: float = 0.6
    started_talking_threshold: float = 0.2
    speech_threshold: float = 0.1
    max_continuous_speech_s: float = math.inf
    pause_window: Literal["sliding", "tumbling"] = "sliding"
    # How often the window is rechecked during a turn: every 96 ms (three VAD windows). At
    # 32 ms the VAD and the check ran 25 times a second per speaking session, which cost more
    # latency under load (50 sessions, 2 cores) than it saved.
    sliding_hop_s: float = 0.096
    # The sliding window's length; None: 4/3 of `audio_chunk_duration` (0.8 s by default). On
    # real speech (benchmarks/bench_pauses.py) a 0.8 s sliding window cuts fewer sentences
    # than 0.6 s tumbling chunks and answers sooner; a 0.6 s one answers sooner still but
    # cuts sentences at their commas three times as often.
    sliding_window_s: float | None = None
    # Sliding only: end the turn as soon as the rule's verdict on a window still to come is
    # certain, whatever the next audio holds (see `ReplyOnPause._certain_pause`). With
    # Silero's defaults that is 224 ms sooner than waiting for that window; the pauses found
    # are the same ones.
    decide_early: bool = True

    def __post_init__(self) -> None:
        if self.pause_window not in ("sliding", "tumbling"):
            raise ValueError(f"pause_window must be 'sliding' or 'tumbling', got {self.pause_window!r}")
        if not self.audio_chunk_duration > 0 or not self.sliding_hop_s > 0:
            raise ValueError("audio_chunk_duration and sliding_hop_s must be > 0")


def speech_seconds(probs: np.ndarray, options: SileroVadOptions) -> float:
    """Seconds of speech Silero's segment logic finds in one chunk's window probabilities."""
    return sum(s["end"] - s["start"] for s in speech_timestamps(probs, options)) / VAD_RATE


def _channels(array: np.ndarray, n: int) -> np.ndarray:
    """(n, samples) from (channels, samples), (samples, channels) or (samples,); a single
    channel is repeated (a mono front end feeding a stereo handler)."""
    a = np.asarray(array)
    if a.ndim == 1:
        a = a[None, :]
    elif a.ndim != 2:
        raise ValueError(f"audio must be 1-D or 2-D (channels, samples); got shape {a.shape}")
    elif a.shape[0] > a.shape[1]:  # (samples, channels)
        a = a.T
    if a.shape[0] == n:
        return a
    if a.shape[0] == 1:
        return np.repeat(a, n, axis=0)
    raise ValueError(f"expected 1 or {n} channels, got shape {np.asarray(array).shape}")


@dataclass
class _TurnState:
    started_talking: bool = False
    buffer: list[np.ndarray] = field(default_factory=list)
    buffered: int = 0
    utterance: list[np.ndarray] = field(default_factory=list)
    utterance_len: int = 0
    sample_rate: int = 0
    # Sliding window: the last window probabilities (one per 32 ms) and the audio they cover,
    # which becomes the start of the utterance when a turn starts.
    probs: deque[float] = field(default_factory=deque)
    recent: deque[np.ndarray] = field(default_factory=deque)
    recent_len: int = 0
    silent_16k: float = 0.0  # skipped silent audio not yet a whole window (16 kHz samples)
    # During a turn: input samples after the last check during which no pause can come (see
    # `_quiet_windows`); the checks at hops inside them are skipped, their audio waits in
    # `held` and goes to the VAD with the next hop's.
    quiet_samples: int = 0
    held: list[np.ndarray] = field(default_factory=list)
    held_len: int = 0
    # Hops judged in the background: windows since the rule was last checked, short of a hop.
    unchecked: int = 0


class ReplyOnPause(AsyncStreamHandler):
    """Call `fn((sample_rate, utterance), *inputs)` each time the user pauses.

    `utterance` is `(1, n)` int16 with `expected_layout="mono"`, `(2, n)` with `"stereo"`
    (the VAD then runs on the mix of both channels). `model`: a FastRTC
    `PauseDetectionModel` run per connection per chunk instead of the shared batched VAD.
    `needs_args=True` (or an `fn` with more than one parameter): `fn` gets the connection's
    additional inputs, as in FastRTC: each turn asks the client for them (`send_input`) and
    waits until values arrive (`set_input`) unless some arrived since the previous turn; a
    turn gives up with an error after `ARGS_TIMEOUT_S`. A phone call has no client to ask:
    it gets the stream's default values. `trigger_response()` replies now, without a pause.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
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
    ) -> None:
        if expected_layout not in LAYOUTS:
            raise ValueError(f"expected_layout must be 'mono' or 'stereo', got {expected_layout!r}")
        if model is not None and not callable(getattr(model, "vad", None)):
            raise TypeError(
                "model must be a PauseDetectionModel: an object with "
                "vad((sample_rate, audio), options) -> (speech_seconds, chunks)"
            )
        super().__init__(
            expected_layout,
            output_sample_rate,
            output_frame_size,
            input_sample_rate=input_sample_rate,
        )
        self.fn = fn
        self.startup_fn = startup_fn
        self.algo_options = algo_options or AlgoOptions()
        self._model_options = model_options  # what a custom model gets, as in FastRTC
        self.model_options = model_options or SileroVadOptions()
        self.can_interrupt = can_interrupt
        self.needs_args = needs_args
        self.model = model
        self.default_args: list[Any] = []
        self._state = _TurnState()
        self._vad: VADStream | None = None
        self._out: asyncio.Queue[EmitType] = asyncio.Queue(maxsize=64)
        self._reply: asyncio.Task | None = None
        self.replies_started = 0
        self._shut_down = False
        self._hops: asyncio.Task | None = None  # hops judged in the background (`_behind`)
        self._behind = False
        self._hop_error: Exception | None = None

    def _init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments each connection's copy is made with (subclasses add
        theirs)."""
        return dict(
            fn=self.fn,
            startup_fn=self.startup_fn,
            algo_options=self.algo_options,
            model_options=self._model_options,
            can_interrupt=self.can_interrupt,
            expected_layout=self.expected_layout,
            output_sample_rate=self.output_sample_rate,
            output_frame_size=None,
            input_sample_rate=self.input_sample_rate,
            model=self.model,
            needs_args=self.needs_args,
        )

    def copy(self) -> ReplyOnPause:
        clone = ReplyOnPause(**self._init_kwargs())
        clone.default_args = list(self.default_args)
        return clone

    @property
    def responding(self) -> bool:
        return self._reply is not None and not self._reply.done()

    @property
    def _needs_additional_inputs(self) -> bool:
        """FastRTC's rule: `needs_args`, or an `fn` that takes more than the audio."""
        try:
            n_params = len(inspect.signature(self.fn).parameters)
        except (TypeError, ValueError):  # a builtin without a signature
            n_params = 1
        return self.needs_args or n_params > 1

    # -- input -----------------------------------------------------------------------------
    @property
    def _ignores_input(self) -> bool:
        """Frames are dropped: shut down, or a reply that may not be interrupted is running."""
        return self._shut_down or (self.responding and not self.can_interrupt)

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        if self._ignores_input:
            return
        sr, array = frame
        if self.expected_layout == "stereo":
            audio = _channels(array, 2)  # (2, n): kept for `fn`; the VAD gets the mix
        else:
            audio = to_mono(np.asarray(array))
        if self._state.sample_rate != sr:
            self._reset_vad(sr)
        st = self._state  # after a reset: the first frame belongs to the new state
        st.buffer.append(audio)
        st.buffered += audio.shape[-1]
        if self._hop_error is not None:  # the background hop failed: this call reports it
            e, self._hop_error = self._hop_error, None
            raise e
        if self._hops is not None:  # a hop is being judged: this audio waits for the next one
            if st.buffered > MAX_WAITING_AUDIO_S * sr:
                await asyncio.shield(self._hops)
            return
        chunk = self._due(st, sr)
        if chunk is None:
            return
        if self._behind:
            self._hops = asyncio.create_task(self._judge_in_background(chunk))
        else:
            await self._judge(chunk)

    def receive_nowait(self, frame: tuple[int, np.ndarray]) -> bool:
        """`receive` for a frame that completes no hop, without awaiting: it is only
        buffered. This is what most frames do (4 of 5 in a turn, 29 of 30 outside one), and
        `Session.receive` tries it first, skipping a coroutine chain and the handler-timeout
        watch per 20 ms frame. False, with nothing done, when `receive` must run: a hop or
        chunk is due, a background hop failed or must be waited for, the rate changed, stereo
        input, or a subclass with its own `receive`."""
        if type(self).receive is not ReplyOnPause.receive:
            return False
        if self._ignores_input:
            return True  # dropped, as `receive` drops it
        sr, array = frame
        st = self._state
        if st.sample_rate != sr or self._hop_error is not None or self.expected_layout == "stereo":
            return False
        audio = to_mono(np.asarray(array))
        n = audio.shape[-1]
        if self._hops is not None:
            if st.buffered + n > MAX_WAITING_AUDIO_S * sr:
                return False
        elif st.buffered + n >= self._hop_s(st) * sr:
            return False  # `_due` would hand out a hop (or move the buffer to `held`)
        st.buffer.append(audio)
        st.buffered += n
        return True

    # A hop is judged while `receive` waits (the next frame is read only after its verdict)
    # as long as the VAD answers sooner than the hop's audio lasts. When it answers later (a
    # loaded engine: 250 ms for a 96 ms hop), a session judged that way falls further behind
    # its client with every hop, its frames piling up unread. It then goes `_behind`: hops are
    # judged in a task while `receive` keeps taking audio, and each next hop is all the audio
    # that came meanwhile (one VAD item however long the wait), its rule still checked every
    # `sliding_hop_s` of it (`_on_hop`).
    def _due(self, st: _TurnState, sr: int) -> np.ndarray | None:
        """The audio of the next hop (sliding) or chunk (tumbling), taken from the buffer, or
        None while not enough has come."""
        sliding = self._sliding
        hop = self._hop_s(st)
        if st.buffered < hop * sr:
            return None
        if sliding and st.started_talking and st.held_len + st.buffered <= st.quiet_samples:
            st.held += st.buffer  # no pause can be decided here: check at a later hop
            st.held_len += st.buffered
            st.buffer, st.buffered = [], 0
            return None
        if sliding:  # everything that came: one VAD item, the rule checked per hop in it
            parts = st.held + st.buffer
            st.held, st.held_len, st.buffer, st.buffered = [], 0, [], 0
        else:  # FastRTC's chunks: the frames up to the first that completes one
            parts, n = [], 0
            while n < hop * sr:
                parts.append(st.buffer.pop(0))
                n += parts[-1].shape[-1]
            st.buffered -= n
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    @property
    def _sliding(self) -> bool:
        """The sliding window applies (a custom `model=` always tumbles)."""
        return self.algo_options.pause_window == "sliding" and self.model is None

    def _hop_s(self, st: _TurnState) -> float:
        """Seconds of audio per hop (sliding) or chunk (tumbling) in this state."""
        algo = self.algo_options
        if self._sliding and st.started_talking:
            return algo.sliding_hop_s
        # Before a turn only its start is looked for, which may come a chunk late (the
        # window's audio is kept and becomes the utterance's start): tumbling's pace.
        return algo.audio_chunk_duration

    async def _judge(self, chunk: np.ndarray) -> None:
        sr = self._state.sample_rate
        started = time.monotonic()
        if self._sliding:
            await self._on_hop(sr, chunk)
        else:
            await self._on_chunk(sr, chunk)
        # Against one hop, not this chunk: a merged chunk judged in less than it lasts says
        # nothing about whether the next single hop would be.
        self._behind = time.monotonic() - started > self._hop_s(self._state)

    async def _judge_in_background(self, chunk: np.ndarray | None) -> None:
        try:
            while chunk is not None and not self._shut_down:
                await self._judge(chunk)
                chunk = self._due(self._state, self._state.sample_rate)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported by the next `receive`, as if it had raised there
            self._hop_error = e
        finally:
            if self._hops is asyncio.current_task():
                self._hops = None

    def _cancel_hops(self) -> None:
        if self._hops is not None:
            self._hops.cancel()
            self._hops = None

    def _reset_vad(self, sr: int) -> None:
        self._cancel_hops()  # they judge the old rate's audio with the old stream
        if self._vad is not None:
            self._vad.close()
            self._vad = None
        if self._shut_down:  # a frame that raced the session's end: never take a new slot
            raise RuntimeError("ReplyOnPause: the connection has ended")
        if self.model is None:  # a custom model keeps no per-connection state of ours
            self._vad = get_vad_engine().open_stream(sr)
        self._state = _TurnState(sample_rate=sr)

    async def _speech_seconds(self, sr: int, mono: np.ndarray) -> float:
        if self.model is not None:
            # FastRTC's path: one blocking call per chunk, on the session's handler threads
            # (never on the event loop).
            dur, _ = await self.run_blocking(self.model.vad, (sr, mono), self._model_options)
            return float(dur)
        assert self._vad is not None
        return speech_seconds(await self._vad.process(mono), self.model_options)

    async def _on_chunk(self, sr: int, chunk: np.ndarray) -> None:
        mono = to_mono(chunk)
        if self._silent(sr, mono) is not None:
            return  # no speech outside a turn: nothing to decide
        try:
            dur = await self._speech_seconds(sr, mono)
        except (EngineUnavailable, EngineTimeout) as e:
            # The engine process is restarting: this chunk was not judged. Keep it (if a turn
            # is under way) and decide on the next one; the VAD restarts from zero state.
            logger.warning("ReplyOnPause: a chunk was not judged: %s", e)
            if self._state.started_talking:
                self._state.utterance.append(chunk)
                self._state.utterance_len += chunk.shape[-1]
            return
        st = self._state
        algo = self.algo_options
        if dur > algo.started_talking_threshold and not st.started_talking:
            st.started_talking = True
            await self.send_message(create_message("log", "started_talking"))
        if not st.started_talking:
            return
        st.utterance.append(chunk)
        st.utterance_len += chunk.shape[-1]
        if dur < algo.speech_threshold or st.utterance_len / sr >= algo.max_continuous_speech_s:
            await self._pause(sr)

    def _silent(self, sr: int, mono: np.ndarray) -> np.ndarray | None:
        """Outside a turn, audio whose peak is under `SILENT_PEAK` (digital silence, a muted
        microphone) is not sent to the VAD: it counts as windows of probability 0. A silent
        session then costs no model work."""
        st = self._state
        if st.started_talking or self.model is not None or mono.size == 0:
            return None
        peak = np.abs(mono).max()
        if (peak * 32768 if mono.dtype.kind == "f" else peak) >= SILENT_PEAK:
            return None
        st.silent_16k += mono.size * VAD_RATE / sr
        n = int(st.silent_16k // WINDOW)
        st.silent_16k -= n * WINDOW
        return np.zeros(n, dtype=np.float32)

    async def _on_hop(self, sr: int, piece: np.ndarray) -> None:
        """Sliding window: FastRTC's rule on the last `sliding_window_s` of audio."""
        st = self._state
        assert self._vad is not None
        mono = to_mono(piece)
        probs = self._silent(sr, mono)
        try:
            if probs is None:
                probs = await self._vad.process(mono)
        except (EngineUnavailable, EngineTimeout) as e:
            logger.warning("ReplyOnPause: audio was not judged: %s", e)
            probs = np.zeros(0, dtype=np.float32)  # keep the audio, decide on the next hop
        if self._state is not st:  # the session reset while the VAD ran
            return
        if not self._behind or probs.size == 0:
            st.unchecked = 0
            await self._step(sr, piece, probs)
            return
        # Audio of several hops (it came while the previous hop was judged): the rule is
        # checked after each hop's worth of windows, as if they had come one by one; windows
        # short of a hop wait, unchecked, for the next piece's. The audio is cut with the
        # windows, each window's share of the piece.
        n, total, done = piece.shape[-1], probs.size, 0
        while done < total and self._state is st:
            need = max(1, round(self._hop_s(st) * VAD_RATE / WINDOW) - st.unchecked)
            end = min(total, done + need)
            full = end - done == need
            st.unchecked = 0 if full else st.unchecked + end - done
            await self._step(sr, piece[..., n * done // total : n * end // total], probs[done:end],
                             decide=full)
            done = end

    async def _step(self, sr: int, piece: np.ndarray, probs: np.ndarray, decide: bool = True) -> None:
        """One hop: `probs` are the windows the VAD finished in `piece`; the rule is checked
        on the window they end unless `decide` is False."""
        st = self._state
        algo = self.algo_options
        span = algo.sliding_window_s or algo.audio_chunk_duration * 4 / 3
        window = max(1, round(span * VAD_RATE / WINDOW))
        st.probs.extend(probs.tolist())
        while len(st.probs) > window:
            st.probs.popleft()
        n = piece.shape[-1]
        if st.started_talking:
            st.utterance.append(piece)
            st.utterance_len += n
        else:
            st.recent.append(piece)
            st.recent_len += n
            keep = span * sr
            while st.recent and st.recent_len - st.recent[0].shape[-1] >= keep:
                st.recent_len -= st.recent.popleft().shape[-1]
        if probs.size == 0 or not decide:
            return  # no new window (or not a whole hop's), no new decision
        if not st.started_talking:
            if max(st.probs) < self.model_options.threshold:
                return  # no window above the threshold: no speech (and no segment logic)
            if speech_seconds(np.asarray(st.probs), self.model_options) <= algo.started_talking_threshold:
                return
            st.started_talking = True
            st.quiet_samples = 0
            st.utterance, st.utterance_len = list(st.recent), st.recent_len
            st.recent.clear()
            st.recent_len = 0
            await self.send_message(create_message("log", "started_talking"))
            return
        if st.utterance_len / sr >= algo.max_continuous_speech_s:
            await self._pause(sr)
            return
        # A list, not an array: the rule's helpers below run per hop on ~25 windows, where a
        # numpy call costs more than a Python loop (a mid-speech check: ~75 -> ~15 us).
        probs_now = list(st.probs)
        if self._decides_pause(probs_now, window):
            await self._pause(sr)
            return
        # Skip the checks at the hops whose audio ends inside the quiet windows; the hops
        # checked are the ones checked without skipping, so the same pauses are found at the
        # same times. (One window fewer: the VAD may hold up to a window's samples pending.)
        quiet = max(0, self._quiet_windows(probs_now) - 1)
        st.quiet_samples = quiet * WINDOW * sr // VAD_RATE

    def _decides_pause(self, probs: Sequence[float], window: int) -> bool:
        return self._holds_pause(probs) or (
            self.algo_options.decide_early and self._certain_pause(probs, window))

    def _quiet_windows(self, probs: Sequence[float]) -> int:
        """Windows of audio still to come during which no pause can be decided, whatever
        they hold: the rule's windows over them all still contain the latest stretch of
        `_surely_speech` windows (and so does the early decision's, which drops its first
        `_lookahead()` windows). Mid-speech that is ~9 windows (0.29 s): the check at the
        next hop can be skipped, so the VAD gets an item and the rule runs half as often per
        speaking session, and no pause comes later for it."""
        need, starts, ends = self._speech_runs(probs)
        long_ends = [e for s, e in zip(starts, ends) if e - s >= need]
        if not long_ends:
            return 0
        start = long_ends[-1] - need  # the latest stretch of `need` windows starts here
        return max(0, start - (self._lookahead() if self.algo_options.decide_early else 0))

    def _holds_pause(self, probs: Sequence[float]) -> bool:
        """FastRTC's rule on these windows: less than `speech_threshold` seconds of speech."""
        if self._surely_speech(probs):
            return False
        return speech_seconds(probs, self.model_options) < self.algo_options.speech_threshold

    def _lookahead(self) -> int:
        """Windows of audio still to come that cannot change the rule's verdict: Silero's
        segment logic drops a segment that starts within `min_speech_duration_ms` of the end
        of the audio it is given (it keeps one only if longer than that)."""
        min_speech = VAD_RATE * self.model_options.min_speech_duration_ms / 1000
        return int(min_speech // WINDOW)

    def _certain_pause(self, probs: Sequence[float], window: int) -> bool:
        """Whether the rule will hold for the window that ends `_lookahead()` windows from
        now, whatever those windows hold: it is checked with them all speech (probability
        1). That is the worst case for the rule: speech can only start a segment (dropped,
        too short), keep an open one open, or cancel a pending silence; silence could only
        end a segment sooner. So the pause that window would find is found now."""
        ahead = min(self._lookahead(), window - 1)
        if ahead <= 0 or len(probs) < window:
            return False
        future = [*probs[len(probs) - (window - ahead):], *[1.0] * ahead]
        return self._holds_pause(future)

    def _surely_speech(self, probs: Sequence[float]) -> bool:
        """A cheap sufficient test that the window holds at least `speech_threshold` seconds
        of speech, so Silero's segment logic (Python, per window) need not run: a run of
        windows all above the threshold, longer than `min_speech_duration_ms`, is one kept
        segment at least that long (padding only lengthens it)."""
        need, starts, ends = self._speech_runs(probs)
        return any(e - s >= need for s, e in zip(starts, ends))

    def _speech_runs(self, probs: Sequence[float]) -> tuple[int, list[int], list[int]]:
        """The run length `_surely_speech` asks for, and the runs of windows above the
        threshold: their starts and (exclusive) ends. The threshold is compared as float32,
        as numpy compares a float32 array with it (the windows' probabilities are float32)."""
        opts = self.model_options
        need_s = max(opts.min_speech_duration_ms / 1000, self.algo_options.speech_threshold)
        need = int(need_s * VAD_RATE / WINDOW) + 2
        threshold = float(np.float32(opts.threshold))
        starts: list[int] = []
        ends: list[int] = []
        inside = False
        for i, p in enumerate(probs):
            if p >= threshold:
                if not inside:
                    starts.append(i)
                    inside = True
            elif inside:
                ends.append(i)
                inside = False
        if inside:
            ends.append(len(probs))
        return need, starts, ends

    async def _pause(self, sr: int) -> None:
        st = self._state
        utterance = np.concatenate(st.utterance, axis=-1).reshape(
            2 if self.expected_layout == "stereo" else 1, -1
        )
        st.started_talking = False
        st.utterance, st.utterance_len = [], 0
        st.quiet_samples = 0
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
        self._reply_task(sr, utterance)

    def _reply_task(self, sr: int, utterance: np.ndarray) -> None:
        self.replies_started += 1
        self._reply = asyncio.create_task(self._turn(self.fn, (sr, utterance)))

    async def start_up(self) -> None:
        if self.startup_fn is not None:
            self._reply = asyncio.create_task(self._turn(self.startup_fn))

    async def _inputs(self) -> list[Any]:
        """The additional inputs `fn` gets this turn (FastRTC: none unless it needs them)."""
        if not self._needs_additional_inputs:
            return []
        if self.phone_mode:  # nobody to ask (FastRTC passes none at all)
            return list(self.latest_args[1:] if self.latest_args else self.default_args)
        # FastRTC's wait_for_args: ask every turn, wait unless values came since the last one.
        await self.fetch_args()
        try:
            await asyncio.wait_for(self.args_set.wait(), ARGS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the reply function needs additional inputs and none arrived within "
                f"{ARGS_TIMEOUT_S:g} s of send_input: the client answers send_input through "
                "a route that calls stream.set_input(webrtc_id, ...)"
            ) from None
        return self.latest_args[1:]

    async def _turn(self, fn: Callable[..., Any], *first: Any) -> None:
        try:
            inputs = await self._inputs()
        except TimeoutError as e:
            self._handler_error(e)
            return
        await self._run(fn, *first, *inputs)
        self.reset()  # as FastRTC after a reply: the next turn asks for fresh values

    def trigger_response(self) -> None:
        """Reply now, as if the user had just paused (FastRTC's): `fn` gets the audio of the
        turn under way, or an empty `(1, 0)` array outside one. Ignored while a reply runs
        (FastRTC keeps the running one). Safe from any thread, e.g. a Gradio event or a route
        (`stream.handlers[webrtc_id].trigger_response()`)."""
        if self._loop is None:
            raise RuntimeError("trigger_response: this handler is not attached to a connection "
                               "(use stream.handlers[webrtc_id], the connection's own copy)")
        call_on_loop(self._loop, self._trigger)

    def _trigger(self) -> None:
        if self._shut_down or self.responding:
            return
        st = self._state
        sr = st.sample_rate or self.input_sample_rate
        channels = 2 if self.expected_layout == "stereo" else 1
        parts = [*st.utterance, *st.held, *st.buffer] if st.started_talking else []
        utterance = (np.concatenate(parts, axis=-1).reshape(channels, -1) if parts
                     else np.zeros((channels, 0), dtype=np.int16))
        # A fresh turn state (FastRTC: `state.new()`); the VAD stream's own state carries on.
        self._state = _TurnState(sample_rate=st.sample_rate)
        self.send_message_sync(create_message("log", "pause_detected"))
        self._reply_task(sr, utterance)

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
            self._handler_error(e)

    def _handler_error(self, e: BaseException) -> None:
        if self._report_error is not None:
            self._report_error(e)
        else:
            self.send_message_sync(create_message("error", f"{type(e).__name__}: {e}"))

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
        if self._hops is not None:
            if self._loop is not None:
                call_on_loop(self._loop, self._cancel_hops)
            else:
                self._cancel_hops()
        if self._reply is not None:
            if self._loop is not None:
                call_on_loop(self._loop, self._reply.cancel)
            else:
                self._reply.cancel()
        if self._vad is not None:
            self._vad.close()
            self._vad = None
