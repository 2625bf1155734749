"""Silero VAD throughput: our batched ``SileroVAD`` vs per-stream TorchScript / onnxruntime.

One VAD frame = one 512-sample window at 16 kHz = 32 ms of audio; a real-time stream needs
31.25 frames/s. Everything is measured in one run on one machine and printed as one table:

* ``batched (eager)``  -- ``models.silero.SileroVAD`` at batch sizes 1, 2, 4, ... 4096, one
  window per stream per step, LSTM state (h, c) fed back every step, under
  ``torch.inference_mode()``. On CPU, "per core" divides by the torch thread count. The
  headline rows (and the ratio and verdict) use the thread count the server's VAD worker runs
  with (``server.vad_engine.default_vad_threads``: 1 on CPU); the same sizes are repeated
  with torch's default thread count (all cores) as extra rows.
* ``per-stream torchscript`` -- ``silero_vad.load_silero_vad()`` (the .jit model), one
  instance per stream, ``model(chunk, 16000)`` one window at a time, streams round-robin.
* ``per-stream onnxruntime (OnnxWrapper)`` -- ``silero_vad.load_silero_vad(onnx=True)``
  (the wheel's ``silero_vad.onnx``, 1 intra-op + 1 inter-op thread, CPU provider), one
  wrapper per stream, one window at a time.
* ``per-stream onnxruntime (raw session)`` -- the same .onnx file in one
  ``onnxruntime.InferenceSession`` (1+1 threads) called directly with numpy inputs and a
  per-stream state array, the way FastRTC's pause detection drives Silero (no torch
  wrapper overhead): the strictest per-stream baseline, used for the headline ratio.
* on CUDA: the batched module on the GPU, eager and CUDA-graph (one captured step per batch
  bucket with static input/state buffers, state copied back inside the graph), timed with
  CUDA events on pre-staged device inputs; the graph variant also reports the step *with*
  the pinned-host -> device copy of the batch's input and the device -> pinned-host copy of
  its probabilities, so the number is honest about transfer.

Usage::

    python -m benchmarks.bench_vad                 # CPU (+ CUDA if available), ~2-3 min on 2 cores
    python -m benchmarks.bench_vad --quick         # < 30 s smoke run
    python -m benchmarks.bench_vad --device cuda   # GPU rows (CPU baselines still run on the host)

Writes ``benchmarks/results/bench_vad_<device>.md`` (``--out``) and a ``.json`` with the raw
numbers next to it. Both record the command. Before timing, the batched module is checked
against the wheel's TorchScript model on the four speech fixtures (max |p - TorchScript|, on
CPU and, with CUDA rows, on the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.harness import OtherLoad, machine_info, system_busy, usable_cpus, wait_for_idle

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64
FRAMES_PER_STREAM_S = SAMPLE_RATE / WINDOW  # 31.25 windows/s = one real-time stream
HIDDEN = 128

DEFAULT_BATCH_SIZES = [2 ** i for i in range(13)]  # 1 .. 4096
# Small batches are launch-bound on a GPU; go further so the saturation point is visible.
DEFAULT_CUDA_BATCH_SIZES = [2 ** i for i in range(16)]  # 1 .. 32768
QUICK_BATCH_SIZES = [1, 16, 256]

RATIO_BATCH = 256  # batch of the headline CPU ratio
RATIO_TARGET = 5.0           # CPU: batched/core at B=256 >= 5x per-stream onnxruntime/core
CUDA_FPS_TARGET = 1_000_000  # GPU: >= 1M frames/s ...
CUDA_STEP_MS_TARGET = 5.0    # ... with one batch's run time <= 5 ms

# `import silero_vad` runs torch.set_num_threads(1) process-wide (silero_vad/model.py), so
# remember torch's own default before anything imports it; the batched CPU rows restore it.
_TORCH_DEFAULT_THREADS = None if "silero_vad" in sys.modules else torch.get_num_threads()

NOISY_LOAD = 0.15  # rows timed while other processes used more than this get a dagger

M_BATCHED = "batched (eager)"
M_GRAPH = "batched (CUDA graph)"
M_JIT = "per-stream torchscript"
M_ORT_WRAP = "per-stream onnxruntime (OnnxWrapper)"
M_ORT_RAW = "per-stream onnxruntime (raw session)"


@dataclass
class Row:
    method: str
    device: str
    batch: int                # windows per step (1 for per-stream methods)
    threads: int | None       # CPU threads used (None on CUDA)
    step_ms: float            # median time of one step (one batch / one per-stream call)
    frames_s: float
    streams: float            # real-time streams = frames_s / 31.25
    frames_s_per_core: float | None  # CPU only
    iters: int
    p10_ms: float
    p90_ms: float
    mean_ms: float
    # CUDA-graph rows: the same step including pinned H2D of inputs + D2H of probabilities.
    copy_step_ms: float | None = None
    copy_frames_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_WAIT_IDLE_S = 0.0  # set by --wait-idle


# ---------------------------------------------------------------------------- input audio
def make_audio(n_streams: int, n_windows: int, seed: int = 0) -> torch.Tensor:
    """[n_streams, CONTEXT + n_windows*WINDOW] float32: low-amplitude noise + two sines per
    stream (frequencies, phases and levels differ per stream), fixed seed."""
    g = torch.Generator().manual_seed(seed)
    n = CONTEXT + n_windows * WINDOW
    t = torch.arange(n, dtype=torch.float32) / SAMPLE_RATE
    f1 = 100 + 300 * torch.rand(n_streams, 1, generator=g)
    f2 = 500 + 2500 * torch.rand(n_streams, 1, generator=g)
    ph = 2 * torch.pi * torch.rand(n_streams, 2, generator=g)
    a = 0.02 + 0.2 * torch.rand(n_streams, 2, generator=g)
    x = a[:, :1] * torch.sin(2 * torch.pi * f1 * t + ph[:, :1])
    x += a[:, 1:] * torch.sin(2 * torch.pi * f2 * t + ph[:, 1:])
    x += 0.01 * torch.randn(n_streams, n, generator=g)
    return x.clamp_(-1.0, 1.0)


def model_inputs(audio: torch.Tensor) -> torch.Tensor:
    """[B, CONTEXT + P*WINDOW] -> [P, B, CONTEXT + WINDOW]: the model input of each of the P
    consecutive windows (previous 64 samples, then the window), contiguous per step."""
    frames = audio.unfold(1, CONTEXT + WINDOW, WINDOW)  # [B, P, 576]
    return frames.transpose(0, 1).contiguous()


def _pool_windows(max_batch: int, cap_floats: int = 40_000_000) -> int:
    """How many distinct consecutive windows to cycle through (bounded host memory)."""
    return int(max(1, min(4, cap_floats // (max_batch * (CONTEXT + WINDOW)))))


# ---------------------------------------------------------------------------- timing
def _stats(times_s: list[float]) -> tuple[float, float, float, float]:
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return statistics.median(ms), q[0], q[-1], statistics.fmean(ms)


def _iters_for(est_s: float, target_s: float, min_iters: int, max_iters: int) -> int:
    return int(min(max_iters, max(min_iters, target_s / max(est_s, 1e-7))))


def time_cpu(step: Callable[[], None], target_s: float, warmup: int = 3,
             min_iters: int = 5, max_iters: int = 20_000,
             load: dict[str, Any] | None = None) -> list[float]:
    """Per-step wall times (perf_counter), iterations scaled so the loop takes ~target_s.
    load (if given) receives "other_load": other processes' CPU share during the timed loop."""
    if _WAIT_IDLE_S > 0:
        wait_for_idle(_WAIT_IDLE_S)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    n_cal = 0
    while n_cal < 3 or (time.perf_counter() - t0) < min(0.05, target_s / 10):
        step()
        n_cal += 1
    est = (time.perf_counter() - t0) / n_cal
    n = _iters_for(est, target_s, min_iters, max_iters)
    times = []
    pc = time.perf_counter
    with OtherLoad() as ol:
        for _ in range(n):
            a = pc()
            step()
            times.append(pc() - a)
    if load is not None:
        load["other_load"] = ol.value
    return times


def time_cuda(step: Callable[[], None], target_s: float, warmup: int = 5,
              min_iters: int = 20, max_iters: int = 5_000) -> tuple[list[float], float]:
    """Per-step GPU-stream times from CUDA events (back-to-back steps, so a launch-bound step
    shows its real length), plus the wall-clock mean per step of the whole timed loop."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_cal = 0
    while n_cal < 5 or (time.perf_counter() - t0) < min(0.05, target_s / 10):
        step()
        n_cal += 1
        if n_cal % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / n_cal
    n = _iters_for(est, target_s, min_iters, max_iters)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda.synchronize()
    w0 = time.perf_counter()
    for i in range(n):
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize()
    wall_mean = (time.perf_counter() - w0) / n
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], wall_mean


def _row(method: str, device: str, batch: int, threads: int | None, times_s: list[float],
         per_core: bool, **extra: Any) -> Row:
    med, p10, p90, mean = _stats(times_s)
    fps = batch / (med / 1e3)
    return Row(method=method, device=device, batch=batch, threads=threads, step_ms=med,
               frames_s=fps, streams=fps / FRAMES_PER_STREAM_S,
               frames_s_per_core=(fps / threads) if (per_core and threads) else None,
               iters=len(times_s), p10_ms=p10, p90_ms=p90, mean_ms=mean, extra=dict(extra))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- agreement
def agreement(device: str) -> float:
    """max |p - TorchScript| over the four speech fixtures: our module on `device` (one
    stream each, all windows in one forward_windows call) vs the wheel's TorchScript model
    run window by window on the CPU, both from zero state."""
    from silero_vad import load_silero_vad

    from benchmarks.fixtures import SPEECH_FIXTURES, load_wav

    threads = torch.get_num_threads()
    jit = load_silero_vad()  # sets torch to 1 thread process-wide: restored below
    torch.set_num_threads(threads)
    model = load_model(device)
    err = 0.0
    with torch.inference_mode():
        for name in SPEECH_FIXTURES:
            sr, x = load_wav(name)
            assert sr == SAMPLE_RATE
            n = len(x) // WINDOW
            w = torch.from_numpy((x[: n * WINDOW].astype(np.float32) / 32768.0).reshape(n, WINDOW))
            jit.reset_states()
            ref = torch.tensor([jit(w[i], SAMPLE_RATE).item() for i in range(n)])
            h = torch.zeros(1, HIDDEN, device=device)
            c = torch.zeros(1, HIDDEN, device=device)
            ctx = torch.zeros(1, CONTEXT, device=device)
            probs, *_ = model.forward_windows(w[None].to(device), ctx, h, c)
            err = max(err, float((probs[0].float().cpu() - ref).abs().max()))
    return err


# ---------------------------------------------------------------------------- batched
def load_model(device: str) -> torch.nn.Module:
    from models.silero import SileroVAD

    return SileroVAD.from_package(sample_rate=SAMPLE_RATE, device=device)


def bench_batched_cpu(batch_sizes: list[int], target_s: float, warmup: int = 3,
                      model: torch.nn.Module | None = None, **extra: Any) -> list[Row]:
    """Batched rows with the current torch.get_num_threads(); extra goes into Row.extra."""
    model = model if model is not None else load_model("cpu")
    threads = torch.get_num_threads()
    extra.setdefault("headline", False)
    pool_n = _pool_windows(max(batch_sizes))
    audio = make_audio(max(batch_sizes), pool_n, seed=1)
    rows = []
    with torch.inference_mode():
        for b in batch_sizes:
            xs = model_inputs(audio[:b])  # [P, b, 576]
            st = {"h": torch.zeros(b, HIDDEN), "c": torch.zeros(b, HIDDEN), "i": 0}

            def step() -> None:
                i = st["i"]
                _, st["h"], st["c"] = model(xs[i % pool_n], st["h"], st["c"])
                st["i"] = i + 1

            load: dict[str, Any] = {}
            times = time_cpu(step, target_s, warmup=warmup, load=load)
            rows.append(_row(M_BATCHED, "cpu", b, threads, times, per_core=True, **extra,
                             **load))
            _log(f"  cpu batched B={b:5d} threads={threads}: {rows[-1].step_ms:8.3f} ms  "
                 f"{rows[-1].frames_s:12,.0f} frames/s")
            del xs, st
    return rows


def bench_batched_cuda(batch_sizes: list[int], target_s: float, graphs: bool = True,
                       warmup: int = 5, device: str = "cuda") -> list[Row]:
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA requested but torch.cuda.is_available() is False")
    model = load_model(device)
    dev = torch.device(device)
    pool_n = _pool_windows(max(batch_sizes))
    audio = make_audio(max(batch_sizes), pool_n, seed=1)
    rows: list[Row] = []
    with torch.inference_mode():
        for b in batch_sizes:
            host = model_inputs(audio[:b])                     # [P, b, 576] on host
            xs = host.to(dev)                                   # pre-staged on the device
            st = {"h": torch.zeros(b, HIDDEN, device=dev),
                  "c": torch.zeros(b, HIDDEN, device=dev), "i": 0}

            def eager_step() -> None:
                i = st["i"]
                _, st["h"], st["c"] = model(xs[i % pool_n], st["h"], st["c"])
                st["i"] = i + 1

            times, wall = time_cuda(eager_step, target_s, warmup=warmup)
            rows.append(_row(M_BATCHED, "cuda", b, None, times, per_core=False,
                             wall_mean_ms=wall * 1e3))
            _log(f"  cuda eager  B={b:5d}: {rows[-1].step_ms:8.3f} ms  "
                 f"{rows[-1].frames_s:14,.0f} frames/s")
            if graphs:
                rows.append(_bench_graph(model, host, xs, b, target_s, warmup, dev))
                r = rows[-1]
                _log(f"  cuda graph  B={b:5d}: {r.step_ms:8.3f} ms  {r.frames_s:14,.0f} "
                     f"frames/s | with copies {r.copy_step_ms:8.3f} ms "
                     f"{r.copy_frames_s:14,.0f} frames/s")
            del xs, st
            torch.cuda.empty_cache()
    return rows


def _bench_graph(model: torch.nn.Module, host: torch.Tensor, xs: torch.Tensor, b: int,
                 target_s: float, warmup: int, dev: torch.device) -> Row:
    """One step captured in a CUDA graph: static input/state buffers; the new h, c are
    copied back into the static state inside the graph, so replays carry the state."""
    pool_n = xs.shape[0]
    static_x = xs[0].clone()
    static_h = torch.zeros(b, HIDDEN, device=dev)
    static_c = torch.zeros(b, HIDDEN, device=dev)

    def body() -> torch.Tensor:
        p, h2, c2 = model(static_x, static_h, static_c)
        static_h.copy_(h2)
        static_c.copy_(c2)
        return p

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as the docs require
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_p = body()
    static_h.zero_()
    static_c.zero_()
    torch.cuda.synchronize()

    times, wall = time_cuda(graph.replay, target_s, warmup=warmup)
    row = _row(M_GRAPH, "cuda", b, None, times, per_core=False, wall_mean_ms=wall * 1e3)

    # Same step with the honest transfers: pinned host input -> static_x (H2D), replay,
    # probabilities -> pinned host (D2H).
    pinned_in = host.pin_memory()                       # [P, b, 576]
    pinned_out = torch.empty(pool_n, b, pin_memory=True)
    st = {"i": 0}

    def copy_step() -> None:
        i = st["i"] % pool_n
        static_x.copy_(pinned_in[i], non_blocking=True)
        graph.replay()
        pinned_out[i].copy_(static_p, non_blocking=True)
        st["i"] += 1

    ctimes, cwall = time_cuda(copy_step, target_s, warmup=warmup)
    cmed = _stats(ctimes)[0]
    row.copy_step_ms = cmed
    row.copy_frames_s = b / (cmed / 1e3)
    row.extra.update(copy_p10_ms=_stats(ctimes)[1], copy_p90_ms=_stats(ctimes)[2],
                     copy_wall_mean_ms=cwall * 1e3, copy_iters=len(ctimes))
    del graph
    return row


# ---------------------------------------------------------------------------- per-stream
def _per_stream_row(method: str, n_streams: int, threads: int, round_fn: Callable[[], None],
                    target_s: float, warmup: int) -> Row:
    """round_fn = one window for each of n_streams streams (round-robin). Reported per call."""
    load: dict[str, Any] = {}
    times = time_cpu(round_fn, target_s, warmup=warmup, min_iters=5, load=load)
    per_call = [t / n_streams for t in times]
    return _row(method, "cpu", 1, threads, per_call, per_core=True,
                streams_round_robin=n_streams, **load)


def bench_jit_per_stream(n_streams: int, target_s: float, threads: int = 1,
                         warmup: int = 3) -> Row:
    from silero_vad import load_silero_vad

    models = [load_silero_vad() for _ in range(n_streams)]
    for m in models:
        m.reset_states()
    audio = make_audio(n_streams, 16, seed=2)[:, CONTEXT:]  # the jit model keeps its own context
    chunks = [[audio[s, k * WINDOW:(k + 1) * WINDOW].clone() for k in range(16)]
              for s in range(n_streams)]
    st = {"k": 0}

    def round_fn() -> None:
        k = st["k"] % 16
        for s in range(n_streams):
            models[s](chunks[s][k], SAMPLE_RATE)
        st["k"] += 1

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _per_stream_row(M_JIT, n_streams, threads, round_fn, target_s, warmup)
    finally:
        torch.set_num_threads(prev)


def _onnx_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silero-vad is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.onnx")


def bench_onnx_wrapper_per_stream(n_streams: int, target_s: float, warmup: int = 3) -> Row:
    """silero_vad.load_silero_vad(onnx=True): OnnxWrapper, already 1 intra + 1 inter thread
    on the CPU provider (see silero_vad/utils_vad.py); one wrapper (state) per stream."""
    from silero_vad import load_silero_vad

    wrappers = [load_silero_vad(onnx=True) for _ in range(n_streams)]
    for w in wrappers:
        so = w.session.get_session_options()
        assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1, \
            "installed silero-vad's OnnxWrapper no longer pins onnxruntime to 1 thread"
    audio = make_audio(n_streams, 16, seed=3)[:, CONTEXT:]
    chunks = [[audio[s, k * WINDOW:(k + 1) * WINDOW].clone() for k in range(16)]
              for s in range(n_streams)]
    st = {"k": 0}

    def round_fn() -> None:
        k = st["k"] % 16
        for s in range(n_streams):
            wrappers[s](chunks[s][k], SAMPLE_RATE)
        st["k"] += 1

    return _per_stream_row(M_ORT_WRAP, n_streams, 1, round_fn, target_s, warmup)


def bench_onnx_raw_per_stream(n_streams: int, target_s: float, warmup: int = 3) -> Row:
    """The wheel's silero_vad.onnx in one InferenceSession (1+1 threads, CPU provider), driven
    directly with numpy (input [1, 576], state [2, 1, 128], sr), per-stream state + context."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(_onnx_path(), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    if names != {"input", "state", "sr"}:
        raise RuntimeError(f"unexpected silero_vad.onnx inputs: {sorted(names)}")
    audio = make_audio(n_streams, 16, seed=4).numpy()
    windows = [[audio[s, CONTEXT + k * WINDOW: CONTEXT + (k + 1) * WINDOW][None, :].copy()
                for k in range(16)] for s in range(n_streams)]
    states = [np.zeros((2, 1, HIDDEN), dtype=np.float32) for _ in range(n_streams)]
    contexts = [np.zeros((1, CONTEXT), dtype=np.float32) for _ in range(n_streams)]
    sr = np.array(SAMPLE_RATE, dtype=np.int64)
    st = {"k": 0}

    def round_fn() -> None:
        k = st["k"] % 16
        for s in range(n_streams):
            x = np.concatenate([contexts[s], windows[s][k]], axis=1)
            _, states[s] = sess.run(None, {"input": x, "state": states[s], "sr": sr})
            contexts[s] = x[:, -CONTEXT:]
        st["k"] += 1

    return _per_stream_row(M_ORT_RAW, n_streams, 1, round_fn, target_s, warmup)


# ---------------------------------------------------------------------------- summary
def _nearest(rows: list[Row], batch: int) -> Row | None:
    return min(rows, key=lambda r: (abs(r.batch - batch), r.batch)) if rows else None


def summarize(rows: list[Row]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpu_all = [r for r in rows if r.method == M_BATCHED and r.device == "cpu"]
    cpu_b = [r for r in cpu_all if r.extra.get("headline")]  # the server's thread count
    alt = [r for r in cpu_all if not r.extra.get("headline")]  # torch's default thread count
    ort = {r.method: r for r in rows if r.method in (M_ORT_RAW, M_ORT_WRAP)}
    ref = _nearest(cpu_b, RATIO_BATCH)
    if ref is not None and ref.frames_s_per_core:
        out["cpu_ratio_batch"] = ref.batch
        out["cpu_threads"] = ref.threads
        out["cpu_batched_per_core"] = ref.frames_s_per_core
        for key, m in (("raw", M_ORT_RAW), ("wrapper", M_ORT_WRAP)):
            if m in ort and ort[m].frames_s_per_core:
                out[f"ratio_vs_ort_{key}"] = ref.frames_s_per_core / ort[m].frames_s_per_core
        ref_alt = _nearest(alt, RATIO_BATCH)
        if ref_alt is not None and ref_alt.batch == ref.batch and M_ORT_RAW in ort:
            out["alt_threads"] = ref_alt.threads
            out["cpu_batched_per_core_alt_threads"] = ref_alt.frames_s_per_core
            out["ratio_vs_ort_raw_alt_threads"] = (ref_alt.frames_s_per_core
                                                   / ort[M_ORT_RAW].frames_s_per_core)
        best = max(cpu_b, key=lambda r: r.frames_s_per_core or 0)
        out["cpu_peak_per_core"] = best.frames_s_per_core
        out["cpu_peak_batch"] = best.batch
        if "ratio_vs_ort_raw" in out:
            out["cpu_target_met"] = (ref.batch == RATIO_BATCH
                                     and out["ratio_vs_ort_raw"] >= RATIO_TARGET)
    cuda = {}
    for label, m, copies in (("eager", M_BATCHED, False), ("graph", M_GRAPH, False),
                             ("graph+copies", M_GRAPH, True)):
        rs = [r for r in rows if r.method == m and r.device == "cuda"]
        if not rs:
            continue
        pts = [(r.batch, r.copy_step_ms if copies else r.step_ms,
                r.copy_frames_s if copies else r.frames_s) for r in rs]
        pts = [p for p in pts if p[1] is not None]
        peak = max(pts, key=lambda p: p[2])
        ok = [p for p in pts if p[1] <= CUDA_STEP_MS_TARGET]
        best_ok = max(ok, key=lambda p: p[2]) if ok else None
        largest_ok = max(ok, key=lambda p: p[0]) if ok else None
        cuda[label] = {
            "peak_frames_s": peak[2], "peak_batch": peak[0], "peak_step_ms": peak[1],
            "largest_batch_within_5ms": largest_ok[0] if largest_ok else None,
            "largest_batch_within_5ms_step_ms": largest_ok[1] if largest_ok else None,
            "best_frames_s_within_5ms": best_ok[2] if best_ok else None,
            "best_batch_within_5ms": best_ok[0] if best_ok else None,
            "target_met": bool(best_ok and best_ok[2] >= CUDA_FPS_TARGET),
        }
    if cuda:
        out["cuda"] = cuda
    return out


# ---------------------------------------------------------------------------- rendering
def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _fmt_ms(v: float) -> str:
    return f"{v:.5f}" if v < 0.1 else f"{v:.4f}" if v < 1 else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def render_markdown(info: dict[str, Any], rows: list[Row], summary: dict[str, Any],
                    config: dict[str, Any]) -> str:
    has_copy = any(r.copy_step_ms is not None for r in rows)
    lines = [
        "# Silero VAD throughput (one frame = 512 samples @ 16 kHz = 32 ms; "
        "one real-time stream = 31.25 frames/s)",
        "",
        f"Machine: CPU {info['cpu_model']} | {info['usable_cpus']} usable / "
        f"{info['logical_cpus']} logical CPUs | torch {info['torch']} "
        f"(batched CPU rows: {info['torch_threads']} thread(s), the server's VAD setting"
        + (f"; then torch's default {info['torch_default_threads']}"
           if info.get("torch_default_threads") not in (None, info["torch_threads"]) else "")
        + f") | onnxruntime {info.get('onnxruntime')} | "
        f"silero-vad {info.get('silero_vad')} | GPU: {info['gpu'] or 'none'}"
        + (f" (CUDA {info.get('cuda')})" if info["gpu"] else ""),
        "",
        f"Other processes' CPU load: {_pct(info.get('system_busy_start'))} before, "
        f"{_pct(info.get('system_busy_end'))} after this run (should be ~0% for clean numbers).",
        "",
        f"Command: `{info.get('command', '?')}`",
        "",
        f"Config: per-stream streams={config['streams']}, ~{config['time_per_size']} s timed "
        f"per size, median step; batched state carried; inputs = fixed-seed noise + sines.",
        "",
    ]
    head = ["method", "device", "batch", "threads", "step ms (median)", "frames/s",
            "real-time streams", "frames/s per core"]
    if has_copy:
        head += ["step ms w/ H2D in + D2H probs", "frames/s w/ copies"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    any_noisy = False
    for r in rows:
        noisy = (r.extra.get("other_load") or 0) > NOISY_LOAD
        any_noisy |= noisy
        cells = [r.method, r.device, str(r.batch),
                 "-" if r.threads is None else str(r.threads),
                 _fmt_ms(r.step_ms)
                 + (" †" if noisy else ""),
                 _fmt(r.frames_s), _fmt(r.streams), _fmt(r.frames_s_per_core)]
        if has_copy:
            cells += ["-" if r.copy_step_ms is None else _fmt_ms(r.copy_step_ms),
                      _fmt(r.copy_frames_s)]
        lines.append("| " + " | ".join(cells) + " |")
    if any_noisy:
        lines += ["", f"† other processes used > {100 * NOISY_LOAD:.0f}% of the CPUs while this "
                  "row was timed (see other_load in the JSON); treat it as noisy."]
    lines += ["", "## Key ratios", ""]
    if "max_abs_err_vs_torchscript" in summary:
        errs = ", ".join(f"{dev}: {e:.2g}" for dev, e in summary["max_abs_err_vs_torchscript"].items())
        lines.append(f"- agreement: batched module vs the wheel's TorchScript model on the four "
                     f"speech fixtures (one stream each, 16 kHz), max |p - TorchScript| = {errs}")
    if "cpu_ratio_batch" in summary:
        b = summary["cpu_ratio_batch"]
        note = "" if b == RATIO_BATCH else f" (batch {RATIO_BATCH} not run; nearest {b})"
        lines.append(f"- CPU batched frames/s per core at batch {b}{note}, "
                     f"{summary['cpu_threads']} thread(s) (what the server's VAD worker runs "
                     f"with: `server.vad_engine.default_vad_threads`): "
                     f"{_fmt(summary['cpu_batched_per_core'])}")
        if "ratio_vs_ort_raw" in summary:
            lines.append(f"- ratio vs per-stream onnxruntime (raw session) per core: "
                         f"**{summary['ratio_vs_ort_raw']:.2f}x**")
        if "ratio_vs_ort_raw_alt_threads" in summary:
            lines.append(f"- same module with torch's default {summary['alt_threads']} threads "
                         f"(not what the server runs): "
                         f"{_fmt(summary['cpu_batched_per_core_alt_threads'])} frames/s per core, "
                         f"{summary['ratio_vs_ort_raw_alt_threads']:.2f}x vs onnxruntime (raw session)")
        if "ratio_vs_ort_wrapper" in summary:
            lines.append(f"- ratio vs per-stream onnxruntime (OnnxWrapper) per core: "
                         f"{summary['ratio_vs_ort_wrapper']:.2f}x")
        lines.append(f"- CPU batched peak per core: {_fmt(summary['cpu_peak_per_core'])} "
                     f"frames/s at batch {summary['cpu_peak_batch']}")
        if "cpu_target_met" in summary:
            lines.append(f"- target (CPU, batch {RATIO_BATCH}, the server's thread count: "
                         f">= {RATIO_TARGET:g}x per-stream onnxruntime raw session per core): "
                         f"**{'MET' if summary['cpu_target_met'] else 'NOT MET'}**")
    for label, c in summary.get("cuda", {}).items():
        within = ("none" if c["largest_batch_within_5ms"] is None else
                  f"batch {c['largest_batch_within_5ms']} "
                  f"({c['largest_batch_within_5ms_step_ms']:.3f} ms)")
        best = ("-" if c["best_frames_s_within_5ms"] is None else
                f"{_fmt(c['best_frames_s_within_5ms'])} frames/s at batch "
                f"{c['best_batch_within_5ms']}")
        lines.append(
            f"- CUDA {label}: peak {_fmt(c['peak_frames_s'])} frames/s at batch "
            f"{c['peak_batch']} ({c['peak_step_ms']:.3f} ms/step); largest batch with one "
            f"batch's run time <= {CUDA_STEP_MS_TARGET:g} ms: {within}; best within "
            f"{CUDA_STEP_MS_TARGET:g} ms: {best}; target (>= {CUDA_FPS_TARGET:,} frames/s "
            f"with <= {CUDA_STEP_MS_TARGET:g} ms): **{'MET' if c['target_met'] else 'NOT MET'}**")
    if "cuda" not in summary:
        lines.append(f"- CUDA target (>= {CUDA_FPS_TARGET:,} frames/s, one batch <= "
                     f"{CUDA_STEP_MS_TARGET:g} ms): not measured (no CUDA rows in this run)")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_vad",
        description="Silero VAD frames/s: batched SileroVAD (CPU, CUDA eager, CUDA graph) vs "
                    "per-stream TorchScript and onnxruntime.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU rows, plus CUDA rows if torch.cuda.is_available(); "
                        "cpu: CPU only; cuda: CPU baselines + CUDA rows (error if no CUDA)")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",") if v],
                   default=None, help="comma-separated, e.g. 1,8,64,256 (default CPU 1..4096 "
                   "powers of two; CUDA 1..32768)")
    p.add_argument("--cuda-batch-sizes", type=lambda s: [int(v) for v in s.split(",") if v],
                   default=None, help="override for the CUDA rows only (default: "
                   "--batch-sizes if given, else 1..32768)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the headline batched CPU rows (default: the "
                        "server's, server.vad_engine.default_vad_threads('cpu')); rows with "
                        "torch's default thread count follow when it differs")
    p.add_argument("--jit-threads", type=int, default=1,
                   help="torch threads for the per-stream TorchScript rows (default 1: a "
                        "single window does not parallelise; per-core numbers use this)")
    p.add_argument("--streams", type=int, default=8,
                   help="streams round-robin for the per-stream methods (default 8)")
    p.add_argument("--time-per-size", type=float, default=None,
                   help="seconds of timed steps per batch size / method (default 1.5; "
                        "quick 0.2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--skip-cpu-batched", action="store_true",
                   help="skip the batched CPU rows (e.g. on a GPU box; no CPU ratio then)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each CPU measurement wait up to SECONDS for other processes "
                        "to use < 10%% of the CPUs (for shared machines; default 0 = don't)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 30 s): batch sizes 1,16,256, 0.2 s per size, 4 streams")
    p.add_argument("--out", default=None,
                   help="markdown output path (default benchmarks/results/bench_vad_<device>.md); "
                        "(_quick.md with --quick); the JSON goes next to it with a .json "
                        "suffix; '-' = don't write")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any], dict[str, Any]]:
    """Run every selected benchmark. Returns (rows, summary, info). Leaves the process's
    torch thread count as it found it."""
    prev_threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(prev_threads)


def _run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any], dict[str, Any]]:
    global _WAIT_IDLE_S
    _WAIT_IDLE_S = max(0.0, getattr(args, "wait_idle", 0.0) or 0.0)
    from server.vad_engine import default_vad_threads  # after _TORCH_DEFAULT_THREADS was read

    default_threads = _TORCH_DEFAULT_THREADS or usable_cpus()
    # Headline rows: the server's own VAD thread count on CPU (or --threads to try another).
    batched_threads = args.threads or default_vad_threads("cpu") or default_threads
    quick = args.quick
    target_s = args.time_per_size if args.time_per_size else (0.2 if quick else 1.5)
    streams = args.streams if not (quick and args.streams == 8) else 4
    batch_sizes = args.batch_sizes or (QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    cuda_sizes = (args.cuda_batch_sizes or args.batch_sizes
                  or (QUICK_BATCH_SIZES + [4096] if quick else DEFAULT_CUDA_BATCH_SIZES))
    info = machine_info()
    info["torch_threads"] = batched_threads
    info["torch_default_threads"] = default_threads
    info["command"] = "python -m benchmarks.bench_vad " + " ".join(
        shlex.quote(a) for a in (getattr(args, "argv", None) or []))
    info["system_busy_start"] = system_busy()
    if (info["system_busy_start"] or 0) > 0.15:
        _log(f"WARNING: other processes keep {_pct(info['system_busy_start'])} of the CPUs "
             f"busy; CPU numbers will be noisy")
    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load deprecation
        _log(f"per-stream baselines ({streams} streams, ~{target_s} s each)")
        rows.append(bench_onnx_raw_per_stream(streams, target_s, warmup=args.warmup))
        rows.append(bench_onnx_wrapper_per_stream(streams, target_s, warmup=args.warmup))
        rows.append(bench_jit_per_stream(streams, target_s, threads=args.jit_threads,
                                         warmup=args.warmup))
        for r in rows:
            _log(f"  {r.method}: {r.step_ms:.4f} ms/call  {r.frames_s:,.0f} frames/s")
        errs = {"cpu": agreement("cpu")}
        if use_cuda:
            errs["cuda"] = agreement("cuda")
        _log(f"agreement with TorchScript: {errs}")
        torch.set_num_threads(batched_threads)  # undo silero_vad's import-time set_num_threads(1)
        if not args.skip_cpu_batched:
            _log(f"batched CPU ({torch.get_num_threads()} threads, the server's setting)")
            model = load_model("cpu")
            rows.extend(bench_batched_cpu(batch_sizes, target_s, warmup=args.warmup,
                                          model=model, headline=True))
            if default_threads != batched_threads:
                # Extra rows: torch's default thread count (all cores), which the server does
                # not use for the VAD on CPU.
                _log(f"batched CPU ({default_threads} threads, torch's default)")
                torch.set_num_threads(default_threads)
                try:
                    rows.extend(bench_batched_cpu(batch_sizes, target_s, warmup=args.warmup,
                                                  model=model))
                finally:
                    torch.set_num_threads(batched_threads)
        if use_cuda:
            _log(f"batched CUDA on {torch.cuda.get_device_name(0)}")
            rows.extend(bench_batched_cuda(cuda_sizes, target_s, graphs=not args.no_graph,
                                           warmup=max(args.warmup, 5)))
    info["system_busy_end"] = system_busy()
    info["device_run"] = "cuda" if use_cuda else "cpu"
    info["config"] = {"streams": streams, "time_per_size": target_s, "quick": quick,
                      "batch_sizes": batch_sizes, "cuda_batch_sizes": cuda_sizes if use_cuda
                      else None, "jit_threads": args.jit_threads,
                      "torch_threads": torch.get_num_threads()}
    summary = summarize(rows)
    summary["max_abs_err_vs_torchscript"] = errs
    return rows, summary, info


def write_results(md: str, rows: list[Row], summary: dict[str, Any], info: dict[str, Any],
                  out: str | None) -> tuple[Path, Path] | None:
    if out == "-":
        return None
    md_path = Path(out) if out else (Path(__file__).resolve().parent / "results"
                                     / f"bench_vad_{info['device_run']}"
                                       f"{'_quick' if info['config']['quick'] else ''}.md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    json_path = md_path.with_suffix(".json")
    json_path.write_text(json.dumps(
        {"info": info, "summary": summary, "rows": [asdict(r) for r in rows],
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, summary, info = run(args)
    md = render_markdown(info, rows, summary, info["config"])
    print(md)
    paths = write_results(md, rows, summary, info, args.out)
    if paths:
        _log(f"wrote {paths[0]} and {paths[1]}")
    _log(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
