"""The shared, batched speech detector: one batcher for every audio session of the process.

Each session opens a `VADStream`. Its audio chunks (at the session's input rate) go to one
`DynamicBatcher`; a batch is resampled to 16 kHz on the device, re-framed per stream into
512-sample windows (with each stream's pending samples and 64-sample context kept in a
device-resident state table), run through Silero VAD once, and the new state is scattered
back in place. Only the per-window probabilities come back to the host.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from batching import BatchingConfig, DynamicBatcher, StateSlots
from models.device import default_device
from models.resample import StreamingResampler
from models.silero import SileroVAD
from models.vad_core import script_core

from .config import load_settings

logger = logging.getLogger(__name__)

VAD_RATE = 16000
LATENCY_BUDGET_S = 0.05  # a chunk's deadline from submit: steers when a batch runs
# On CPU, input samples per scripted forward (see VADEngine._run_batch): ~15 MB held at once
# (~30 bytes per sample), 18 pre-turn chunks (0.6 s at 48 kHz) or 113 hops (96 ms) per forward.
CPU_ROWS_SAMPLES = 1 << 19
WINDOW = 512
CONTEXT = 64

# On CPU one intra-op thread per VAD batcher: at these op sizes torch's intra-op threading
# scales poorly (benchmarks/results/bench_vad_cpu.md: per core, 1 thread does far more than
# 2), and the other cores stay free for the event loop and the codecs.
CPU_VAD_THREADS = 1


def default_vad_threads(device: torch.device | str) -> int | None:
    """Torch intra-op threads for the VAD worker on `device` (None: leave torch's default).

    `BATCHRTC_VAD_THREADS` overrides it (read in `get_vad_engine`). The benchmark
    (`benchmarks/bench_vad.py`) reads this same function for its headline row."""
    return CPU_VAD_THREADS if torch.device(device).type == "cpu" else None


def to_float32(samples: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1] (int16 is scaled)."""
    if samples.dtype == np.int16:
        return samples.astype(np.float32) * np.float32(1 / 32768)
    return np.asarray(samples, dtype=np.float32)


@dataclass
class _Work:
    stream: VADStream
    rate: int
    # int16 or float32 [n], n a multiple of the resampler's `down`. int16 stays int16 until
    # the batch converts all of them in one op: half the memory while it waits, and no
    # per-chunk conversion on the event loop.
    samples: np.ndarray
    pending_len: int  # 16 kHz samples waiting on the device from earlier chunks
    n_windows: int
    generation: int
    hist_generation: int


class VADEngine:
    """Batched resampling + Silero VAD for many streams, state kept on the device.

    `threads`: torch intra-op threads of the batcher's worker thread, where every batch runs
    (`torch.set_num_threads` is per thread: the rest of the process keeps its setting).
    None: `default_vad_threads(device)` (1 on CPU; torch's default on CUDA); 0: torch's
    default everywhere.
    """

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        capacity: int = 4096,
        max_batch_size: int = 512,
        max_queue_delay_ms: float = 20.0,
        max_queue_size: int = 8192,
        threads: int | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if threads is None:
            threads = default_vad_threads(self.device)
        if threads is not None and threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = threads or None
        self.capacity = capacity
        self.model = SileroVAD.from_package(VAD_RATE, device=self.device)
        self._core = script_core(self.model)
        self.state = StateSlots(
            capacity,
            {"h": (128,), "c": (128,), "ctx": (CONTEXT,), "pending": (WINDOW,)},
            device=self.device,
        )
        self._resamplers: dict[int, StreamingResampler] = {}
        self._histories: dict[int, StateSlots] = {}
        self._setup_lock = threading.Lock()
        self.batcher: DynamicBatcher[_Work, np.ndarray] = DynamicBatcher(
            self._run_batch,
            name="silero_vad",
            # audio is never dropped for lateness; the deadline steers the flush only
            config=BatchingConfig(max_batch_size, max_queue_delay_ms, max_queue_size,
                                  deadline_ms=LATENCY_BUDGET_S * 1e3, drop_if_late=False),
            # Chunks whose lengths share a power-of-two range (so at most 2x apart) share a
            # batch, zero-padded: a session whose hops came late sends longer ones, and
            # grouping by exact length would split the batch into many small ones.
            group_key=lambda w: (w.rate, w.samples.shape[0].bit_length()),
            initializer=self._init_worker_thread,
        )

    def _init_worker_thread(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    # -- streams ---------------------------------------------------------------------------
    def open_stream(self, sample_rate: int) -> VADStream:
        if sample_rate <= 0:
            raise ValueError(f"sample rate must be positive, got {sample_rate}")
        self._ensure_rate(sample_rate)
        return VADStream(self, sample_rate)

    def _ensure_rate(self, rate: int) -> None:
        if rate == VAD_RATE or rate in self._resamplers:
            return
        with self._setup_lock:
            if rate in self._resamplers:
                return
            rs = StreamingResampler(rate, VAD_RATE, device=self.device)
            self._histories[rate] = StateSlots(
                self.capacity, {"x": (rs.history_size,)}, device=self.device
            )
            self._resamplers[rate] = rs

    def close(self) -> None:
        self.batcher.close()

    # -- the batch -------------------------------------------------------------------------
    def _run_batch(self, items: list[_Work]) -> list[np.ndarray]:
        # On CPU the forward's intermediates (~30 bytes per input sample) are process memory:
        # a batch of 200 pre-turn 0.6 s chunks at 48 kHz held ~80 MB at once, which set the
        # server's peak RSS. Rows are run CPU_ROWS_SAMPLES at a time (200 such chunks: 82 -> 16
        # MB held, the batch ~6 % slower, ad hoc on 2 cores);
        # every part's state is written back only after all ran, so a batch that raises still
        # advances no stream (the batcher then retries its items). A GPU keeps one forward.
        n = max(w.samples.shape[0] for w in items)
        rows = len(items) if self.device.type != "cpu" else max(1, CPU_ROWS_SAMPLES // max(1, n))
        parts = [self._forward(items[i : i + rows]) for i in range(0, len(items), rows)]
        for _, write_back in parts:
            write_back()
        return [p for probs, _ in parts for p in probs]

    def _forward(self, items: list[_Work]) -> tuple[list[np.ndarray], Callable[[], None]]:
        """One scripted forward over `items`: their probabilities, and the write-back of their
        new state (to run once the whole batch succeeded)."""
        dev = self.device
        rate = items[0].rate
        chunks = [w.samples for w in items]
        if any(c.dtype != chunks[0].dtype for c in chunks):
            chunks = [to_float32(c) for c in chunks]  # mixed clients: convert each
        scale = 1 / 32768 if chunks[0].dtype == np.int16 else None
        lengths = [c.shape[0] for c in chunks]
        n = max(lengths)
        ragged = min(lengths) != n  # rows zero-padded to the longest (see VADBatchCore)
        shape, dtype = (len(chunks), n), (torch.int16 if scale else torch.float32)
        # CUDA: straight into pinned memory, then copied asynchronously
        host = torch.empty(shape, pin_memory=True, dtype=dtype) if dev.type == "cuda" else None
        if not ragged:
            stacked = np.stack(chunks, out=None if host is None else host.numpy())
        else:
            stacked = np.empty(shape, dtype=chunks[0].dtype) if host is None else host.numpy()
            for i, c in enumerate(chunks):
                stacked[i, : c.shape[0]] = c
                stacked[i, c.shape[0]:] = 0
        x = host.to(dev, non_blocking=True) if host is not None else torch.from_numpy(stacked)
        slots = [w.stream.slot for w in items]
        k_host = [w.n_windows for w in items]
        with torch.inference_mode():
            hist = rs_weight = None
            down = 1
            if rate != VAD_RATE:
                hist_table = self._histories[rate]
                hslots = [w.stream.hist_slot for w in items]
                hist = hist_table.gather(hslots)["x"]
                rs = self._resamplers[rate]
                rs_weight, down = rs.kernel, rs.down
            st = self.state.gather(slots)
            p = torch.tensor([w.pending_len for w in items], device=dev)
            k = torch.tensor(k_host, device=dev)
            # One scripted call (models/vad_core.py): the GIL is released once for the batch.
            # Unoptimized execution (thread-local): the profiling executor's re-specialising
            # for every new batch shape costs 30-70 ms and gains nothing at these op sizes.
            with torch.jit.optimized_execution(False):
                probs, new_hist, new_pending, h, c, ctx = self._core(
                    x, scale or 1.0, hist, rs_weight, down, st["pending"], p, k, max(k_host),
                    st["ctx"], st["h"], st["c"],
                    torch.tensor(lengths, device=dev) if ragged else None,
                )
            probs_host = probs.float().cpu().numpy()

        def write_back() -> None:  # the last step: a batch that raised never advances a stream
            if rate != VAD_RATE:
                hist_table.scatter(
                    hslots, {"x": new_hist}, generations=[w.hist_generation for w in items]
                )
            self.state.scatter(
                slots,
                {"h": h, "c": c, "ctx": ctx, "pending": new_pending},
                generations=[w.generation for w in items],
            )

        return [probs_host[i, : k_host[i]] for i in range(len(items))], write_back


class VADStream:
    """One audio stream's handle on the shared VAD: push samples, get window probabilities."""

    def __init__(self, engine: VADEngine, sample_rate: int) -> None:
        self.engine = engine
        self.sample_rate = sample_rate
        self.slot = engine.state.acquire()
        self.generation = engine.state.generation(self.slot)
        self.hist_slot = -1
        self.hist_generation = 0
        self._down = 1
        self._up = 1
        if sample_rate != VAD_RATE:
            rs = engine._resamplers[sample_rate]
            table = engine._histories[sample_rate]
            try:
                self.hist_slot = table.acquire()
            except Exception:
                engine.state.release(self.slot)
                raise
            self.hist_generation = table.generation(self.hist_slot)
            self._up, self._down = rs.up, rs.down
        engine.batcher.add_producer()  # see DynamicBatcher's "nothing more can arrive" rule
        self._carry = np.zeros(0, dtype=np.float32)  # < `down` input samples not yet usable
        self._pending = 0
        self._lock = asyncio.Lock()
        self.closed = False
        self.windows_done = 0

    async def process(
        self, samples: np.ndarray, *, latency_budget_s: float = LATENCY_BUDGET_S, source: object = None
    ) -> np.ndarray:
        """Feed mono samples (int16 or float in [-1, 1]); returns one probability per
        512-sample window completed at 16 kHz (possibly none). `source`: who sent it (the
        engine process passes the front-end worker, for its per-batch metrics)."""
        if self.closed:
            raise RuntimeError("VAD stream is closed")
        x = np.asarray(samples).reshape(-1)
        if x.dtype != np.int16:
            x = np.ascontiguousarray(x, dtype=np.float32)
        async with self._lock:
            if self._carry.size:
                if self._carry.dtype != x.dtype:
                    x = np.concatenate([to_float32(self._carry), to_float32(x)])
                else:
                    x = np.concatenate([self._carry, x])
            usable = x.size - x.size % self._down
            self._carry = x[usable:].copy()
            if usable == 0:
                return np.zeros(0, dtype=np.float32)
            produced = usable * self._up // self._down
            before = self._pending
            total = before + produced
            n_windows = total // WINDOW
            self._pending = total % WINDOW
            work = _Work(
                self, self.sample_rate, x[:usable], before, n_windows,
                self.generation, self.hist_generation,
            )
            try:
                probs = await self.engine.batcher.submit(
                    work, deadline=time.monotonic() + latency_budget_s, source=source
                )
            except BaseException:
                # Nothing was written back for this chunk: keep the bookkeeping in step.
                self._pending = before
                raise
            self.windows_done += n_windows
            return probs

    def close(self) -> None:
        """Release the state slots (a batch still in flight for them will not write back)."""
        if self.closed:
            return
        self.closed = True
        self.engine.batcher.remove_producer()
        self.engine.state.release(self.slot)
        if self.hist_slot >= 0:
            self.engine._histories[self.sample_rate].release(self.hist_slot)


_default_engine: VADEngine | None = None
_default_lock = threading.Lock()


def get_vad_engine() -> VADEngine:
    """The process-wide engine every `ReplyOnPause` shares (created on first use). While a
    stream is served with an engine process, the engine process's VAD (same `open_stream`)."""
    global _default_engine
    from .engine import engine_client

    client = engine_client()
    if client is not None:
        return client.vad  # type: ignore[return-value]
    with _default_lock:
        if _default_engine is None:
            settings = load_settings()
            _default_engine = VADEngine(
                max_batch_size=settings.vad_max_batch,
                max_queue_delay_ms=settings.vad_max_delay_ms,
                threads=settings.vad_threads,
            )
        return _default_engine


def current_vad_engine() -> VADEngine | None:
    """The process-wide engine if it exists (never creates it)."""
    return _default_engine


def set_vad_engine(engine: VADEngine | None) -> None:
    """Replace the process-wide engine (tests and benchmarks use their own settings)."""
    global _default_engine
    with _default_lock:
        _default_engine = engine
