"""Load benchmark: N concurrent real-time WebSocket ``ReplyOnPause`` sessions, the shared
batched Silero VAD vs what a FastRTC app runs instead, end of speech -> first reply byte.

Modes (one run compares them; every step on a fresh server):

* ``batched`` -- the default app, ``python -m uvicorn server.echo_app:stream --port P
  --log-level warning`` (``ReplyOnPause(echo)``), ``BATCHRTC_VAD_MAX_BATCH`` = 512: every
  session's 0.6 s chunks go through the one shared batched VAD engine.
* ``fastrtc-onnx`` -- the baseline: ``benchmarks.reply_apps:fastrtc_onnx_stream`` (factory),
  ``Stream(ReplyOnPause(echo, model=get_silero_model()))``, the same echo: Silero VAD the way
  FastRTC runs it, one ``onnxruntime`` session (1+1 threads) called once per connection per
  chunk on a worker thread, state from zero each call.
* ``fastrtc`` -- FastRTC 0.0.34 itself (``benchmarks/fastrtc_app.py``: the same echo in
  FastRTC's own ``Stream(ReplyOnPause(echo))``), run by the Python of another environment that
  has ``pip install "fastrtc[vad]==0.0.34"`` (``--fastrtc-python``), with the Silero ONNX file
  of the installed ``silero-vad`` wheel instead of FastRTC's download from the Hugging Face hub.
  Not in the default modes (it needs that environment).
* ``batched-b1`` -- the default app with ``BATCHRTC_VAD_MAX_BATCH`` = 1 (shown as ``batched,
  max_batch_size=1``): the same engine, one worker thread running every session's chunk in
  turn (``unbatched`` is accepted as its old name).

Each server process has ``BATCHRTC_CONCURRENCY`` large. One warm-up session (not measured)
loads the model first. Its CPU (all threads, ``cpu_times`` delta over the steady window /
wall time, % of one core) and RSS are read with psutil.

* The load generator runs in 1-2 separate worker processes (``multiprocessing`` spawn), each
  one asyncio loop driving N/k WebSocket clients from a single send scheduler, so client CPU
  is not server CPU (it is reported separately: on a 2-core machine both compete).
* Each client streams a speech fixture (16 kHz WAV -> 48 kHz int16 with
  ``scipy.signal.resample_poly`` as in ``tests/test_websocket_reply.py``, plus trailing
  silence so every pause is detected) as mu-law ``media`` frames at real-time pace. Frame i
  carries audio [i*f, (i+1)*f) and is sent when that audio has "happened", at session start +
  (i+1)*f. Session starts are staggered uniformly over ``--stagger-s``. Client j streams
  fixture j mod len(fixtures).
* Client settings: by default two configurations, one table each: first the defaults (20 ms
  frames, permessage-deflate offered and taken, as uvicorn does by default), then 100 ms
  frames without permessage-deflate. ``--frame-ms`` / ``--no-compression`` run one
  configuration only.

Latencies per utterance (all on the client's clock, CLOCK_MONOTONIC is shared by processes):

* ``e2r`` end of speech -> first reply byte: first ``media`` after the k-th
  ``response_starting`` log (the first after the k-th ``pause_detected``: FastRTC logs one per
  audio chunk of a reply), minus the end of the utterance's last speech span
  (``tests/fixtures/speech_spans.json``) on the session's timeline.
* ``overhead`` (server-added latency): first reply byte minus the *actual* send time of the
  frame that completed the 0.6 s chunk in which the pause was detected. Which frame that is
  is computed exactly before the run by replaying the same mu-law frames through the real
  ``ReplyOnPause`` handler in-process (private unbatched engine), so it also follows the
  server's chunk alignment (per mode: the batched engine carries VAD state across chunks,
  the per-call model does not, so their pauses may complete on different frames). The
  client cross-checks it: the k-th ``pause_detected`` log must
  arrive after that frame was sent (else the step counts a ``mismatch``).
* ``detect`` pause-completing frame sent -> ``pause_detected`` arrives (VAD path only).
* ``floor`` end of speech -> end of the pause chunk: what the 0.6 s chunking alone costs.

A missing reply, an ``{"type": "error"}`` message, a failed connection or an aborted session
counts as an error. Every percentile is shown with its sample count ``n``. The target (printed
met / not met per mode and configuration, never adjusted): >= 200 concurrent sessions with
p95 overhead < 100 ms, all replies and 0 errors.

Usage::

    python -m benchmarks.bench_reply                          # full run, ~20-30 min on 2 cores
    python -m benchmarks.bench_reply --quick                  # smoke (N = 1, 10), *_quick.md
    python -m benchmarks.bench_reply --sessions 50,100 --modes batched --frame-ms 40

Writes ``benchmarks/results/bench_reply.md`` (``--out``), ``.json`` (raw numbers) and
``.png`` (p95 vs N) next to it. ``--vad-stats`` starts the server through a factory in this
module that adds one GET route returning the batcher's stats (batch-size histogram); the
default uses the plain ``server.echo_app:stream`` command.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as _dt
import functools
import json
import math
import multiprocessing as mp
import os
import shlex
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS_DIR, child_main, client_loop, code_version, machine_info
from benchmarks.server_process import UvicornProcess, wait_for_workers

# Heavy imports (torch, the server package, scipy, websockets) are done lazily: client worker
# processes import this module and must stay light; the server factory imports what it needs.

FIXTURES = (
    "speech_pause_speech_16k.wav",
    "two_voices_noise_16k.wav",
    "fast_short_pauses_16k.wav",
    "slow_long_pause_16k.wav",
)
INPUT_RATE = 48000
# mode -> (uvicorn app arguments, BATCHRTC_VAD_MAX_BATCH or None, which VAD replays pauses)
MODES: dict[str, tuple[list[str], int | None, str]] = {
    "batched": (["server.echo_app:stream"], 512, "engine"),
    "fastrtc-onnx": (["benchmarks.reply_apps:fastrtc_onnx_stream", "--factory"], None, "onnx"),
    "fastrtc": (["benchmarks.fastrtc_app:app"], None, "onnx"),
    "batched-b1": (["server.echo_app:stream"], 1, "engine"),
    "batched-w2": (["server.echo_app:stream", "--workers", "2"], 512, "engine"),
    "batched-tumbling": (["benchmarks.reply_apps:tumbling_stream", "--factory"], 512,
                         "engine-tumbling"),
}
MODE_LABELS = {
    "batched": "batched",
    "fastrtc-onnx": "per-session onnxruntime (FastRTC)",
    "fastrtc": "FastRTC 0.0.34 itself",
    "batched-b1": "batched, max_batch_size=1",
    "batched-w2": "batched, --workers 2 (engine process)",
    "batched-tumbling": "batched, tumbling 0.6 s chunks (FastRTC's pause window)",
}
MODE_ALIASES = {"unbatched": "batched-b1"}
DEFAULT_MODES = "batched,fastrtc-onnx,batched-b1"
# Client configurations of a default run: the defaults first, then what changes.
CONFIGS: dict[str, tuple[int, str | None]] = {
    "default": (20, "deflate"),
    "frame100-nodeflate": (100, None),
}
CONFIG_TITLES = {
    "default": "Default client settings: 20 ms frames, permessage-deflate (uvicorn's default)",
    "frame100-nodeflate": "Changed: 100 ms frames, permessage-deflate off",
}
TARGET_SESSIONS = 200
TARGET_OVERHEAD_P95_MS = 100.0
# Issue 16's end of speech -> first reply targets: p95 at N sessions <= ms (every reply arrived).
E2R_TARGETS = ((10, 900.0), (200, 1200.0))
DEFAULT_SESSIONS = "1,50,100,200"
QUICK_SESSIONS = "1,10"
VAD_STATS_PATH = "/_bench/vad_stats"
BARGE_IN_WINDOW_S = 0.6  # > the 0.5 s piece spacing of the paced echo reply


# =============================================================================== workload
@dataclass
class Workload:
    """One fixture, ready to stream: pre-encoded media messages + where pauses happen."""

    name: str
    frame_ms: int
    messages: list[str]            # JSON text of each media frame, in order
    duration_s: float              # audio length streamed (speech + tail)
    pause_frames: list[int]        # frame index whose arrival completes a pause chunk
    speech_end_s: list[float]      # per pause: end of the utterance's last speech span
    pause_chunk_end_s: list[float]  # per pause: end of the pause-completing frame's audio
    spans: list[tuple[float, float]]

    @property
    def n_frames(self) -> int:
        return len(self.messages)


def _fixture_pcm48(name: str, tail_s: float, max_audio_s: float | None) -> np.ndarray:
    from scipy.signal import resample_poly

    from benchmarks.fixtures import load_wav

    sr, x = load_wav(name)
    if sr != 16000:
        raise ValueError(f"{name}: expected a 16 kHz fixture, got {sr}")
    if max_audio_s is not None:
        x = x[: int(max_audio_s * sr)]
    y = resample_poly(x.astype(np.float64), 3, 1)
    y = np.concatenate([y, np.zeros(int(tail_s * INPUT_RATE))])
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def _reference_pause_frames(frames: list[np.ndarray], vad: str = "engine") -> list[int]:
    """Replay the frames (already mu-law round-tripped, as the server decodes them) through
    the real ReplyOnPause -- on a private unbatched engine (``vad="engine"``) or with the
    per-call onnxruntime Silero (``"onnx"``, the ``fastrtc-onnx`` server's) -- and return the
    indices of the frames whose arrival started a reply (the pause-completing frames)."""
    from server.reply_on_pause import ReplyOnPause
    from server.vad_engine import VADEngine

    import server.reply_on_pause as rop

    engine = VADEngine(device="cpu", capacity=8, max_batch_size=1, max_queue_delay_ms=0.0)
    model = None
    algo = rop.AlgoOptions()
    if vad == "onnx":
        from server.pause_detection import get_silero_model

        model = get_silero_model()
    elif vad == "engine-tumbling":
        algo = rop.AlgoOptions(pause_window="tumbling")
    elif vad != "engine":
        raise ValueError(f"vad must be 'engine', 'engine-tumbling' or 'onnx', got {vad!r}")

    def _echo(audio):  # never called: only replies_started is looked at
        yield audio

    async def replay() -> list[int]:
        h = ReplyOnPause(_echo, model=model, algo_options=algo)
        hits: list[int] = []
        for i, fr in enumerate(frames):
            before = h.replies_started
            await h.receive((INPUT_RATE, fr.reshape(1, -1)))
            if h.replies_started != before:
                hits.append(i)
        h.shutdown()
        return hits

    saved = rop.get_vad_engine
    rop.get_vad_engine = lambda: engine  # the handler module's global, restored below
    try:
        return asyncio.run(replay())
    finally:
        rop.get_vad_engine = saved
        engine.close()


def build_workloads(
    fixtures: list[str], *, frame_ms: int = 20, tail_s: float = 1.5, max_audio_s: float | None = None,
    vad: str = "engine",
) -> list[Workload]:
    from server.codecs import ulaw_decode, ulaw_encode
    from benchmarks.fixtures import speech_spans

    out = []
    step = INPUT_RATE * frame_ms // 1000
    for name in fixtures:
        pcm = _fixture_pcm48(name, tail_s, max_audio_s)
        enc = [ulaw_encode(pcm[s : s + step]) for s in range(0, pcm.size, step)]
        messages = [
            json.dumps({"event": "media", "media": {"payload": base64.b64encode(b).decode("ascii")}})
            for b in enc
        ]
        pauses = _reference_pause_frames([ulaw_decode(b) for b in enc], vad)
        spans = speech_spans(name)
        ends, chunk_ends = [], []
        for p in pauses:
            t_end = min((p + 1) * step, pcm.size) / INPUT_RATE
            before = [b for a, b in spans if b <= t_end]
            ends.append(max(before) if before else float("nan"))
            chunk_ends.append(t_end)
        out.append(
            Workload(name, frame_ms, messages, pcm.size / INPUT_RATE, pauses, ends, chunk_ends, spans)
        )
    return out


# ================================================================================= server
def vad_stats_app():  # uvicorn --factory target (only with --vad-stats)
    """The default app plus one read-only GET route with the shared batcher's stats."""
    from server.echo_app import stream
    from server.vad_engine import get_vad_engine

    @stream.get(VAD_STATS_PATH)
    async def _vad_stats() -> dict:
        return get_vad_engine().batcher.stats.snapshot()

    return stream


FASTRTC_START_TIMEOUT_S = 180.0  # FastRTC imports gradio, librosa and numba at start


def silero_onnx_path() -> str:
    """The Silero ONNX file inside the installed silero-vad wheel (what FastRTC would download)."""
    import silero_vad

    path = Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: the silero-vad wheel has no silero_vad.onnx")
    return str(path)


def fastrtc_env(fastrtc_python: str | None) -> dict[str, str]:
    """The environment `benchmarks/fastrtc_app.py` runs with (see its docstring); ValueError
    without the other environment's python to run it."""
    if not fastrtc_python:
        raise ValueError('mode "fastrtc" needs --fastrtc-python: the python of an environment '
                         'with pip install "fastrtc[vad]==0.0.34"')
    # The wheel's model file, and nothing from the hub at run time.
    return {"FASTRTC_SILERO_ONNX": silero_onnx_path(), "HF_HUB_OFFLINE": "1"}


class ServerProcess(UvicornProcess):
    """The mode's uvicorn app (see ``MODES``) in its own process; killed on exit."""

    def __init__(
        self,
        mode: str,
        *,
        concurrency: int,
        max_delay_ms: float | None = None,
        vad_stats: bool = False,
        log_dir: Path | None = None,
        start_timeout_s: float = 60.0,
        fastrtc_python: str | None = None,
    ) -> None:
        mode = MODE_ALIASES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        self.mode = mode
        target, max_batch, _ = MODES[mode]
        self.vad_stats = vad_stats and max_batch is not None  # the engine's stats only
        if self.vad_stats:
            target = ["benchmarks.bench_reply:vad_stats_app", "--factory"]
        env = {"BATCHRTC_CONCURRENCY": str(concurrency)}
        if max_batch is not None:
            env["BATCHRTC_VAD_MAX_BATCH"] = str(max_batch)
        if max_delay_ms is not None:
            env["BATCHRTC_VAD_MAX_DELAY_MS"] = str(max_delay_ms)
        python = None
        if mode == "fastrtc":
            env |= fastrtc_env(fastrtc_python)
            python = fastrtc_python
            start_timeout_s = max(start_timeout_s, FASTRTC_START_TIMEOUT_S)
        super().__init__([*target, "--log-level", "warning"], env, name=f"bench_reply_server_{mode}",
                         log_dir=log_dir, start_timeout_s=start_timeout_s, python=python)

    def start(self) -> ServerProcess:
        super().start()
        if "--workers" in self.argv:  # the port is bound before the workers are: wait for all
            workers = int(self.argv[self.argv.index("--workers") + 1])
            wait_for_workers(f"http://127.0.0.1:{self.port}", workers, self.start_timeout_s)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket/offer"

    @property
    def command(self) -> str:
        return self.command_line(("BATCHRTC_CONCURRENCY", "BATCHRTC_VAD_MAX_BATCH", "BATCHRTC_VAD_MAX_DELAY_MS"))

    def vad_snapshot(self) -> dict | None:
        if not self.vad_stats:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{VAD_STATS_PATH}", timeout=5) as r:
                return json.loads(r.read())
        except Exception as e:  # reported, never fatal
            return {"error": repr(e)}


# ========================================================================== client worker
@dataclass
class ClientSpec:
    idx: int
    workload: int   # index into the worker's workload list
    offset_s: float  # stagger: session timeline zero = t0 + offset_s


@dataclass
class WorkerJob:
    url: str
    frame_ms: int
    messages: list[list[str]]      # per workload
    pause_frames: list[list[int]]  # per workload (send times of these are returned)
    clients: list[ClientSpec]
    tail_s: float
    compression: str | None
    connect_concurrency: int = 32
    budget_s: float = 120.0
    prefix: str = "bench"


def _worker_main(conn: Any, job: WorkerJob) -> None:
    """Entry of a load-generator process: connect, report ready, wait for t0, stream, report."""
    child_main(conn, functools.partial(_worker_async, job=job))


class _Client:
    __slots__ = ("spec", "ws", "events", "errors", "close_code", "alive", "pause_sent", "reader")

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.ws: Any = None
        self.events: list[tuple[float, str]] = []  # (monotonic, kind)
        self.errors: list[str] = []
        self.close_code: int | None = None
        self.alive = False
        self.pause_sent: dict[int, float] = {}
        self.reader: asyncio.Task | None = None


async def _reader(c: _Client) -> None:
    import websockets

    try:
        async for raw in c.ws:
            now = time.monotonic()
            if isinstance(raw, bytes):
                c.events.append((now, "binary"))
                continue
            if raw.startswith('{"event": "media"') or raw.startswith('{"event":"media"'):
                c.events.append((now, "media"))  # payload not decoded: only the arrival counts
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                c.events.append((now, "bad_json"))
                continue
            typ = msg.get("type")
            if typ == "error":
                c.errors.append(f"error message: {str(msg.get('data') or msg.get('message'))[:200]}")
                c.events.append((now, "error"))
            elif typ == "log":
                c.events.append((now, str(msg.get("data"))))
            elif msg.get("event") == "media":
                c.events.append((now, "media"))
            else:
                c.events.append((now, str(typ or msg.get("event") or msg.get("status"))))
    except websockets.ConnectionClosed as e:
        c.close_code = e.rcvd.code if e.rcvd else None
    except Exception as e:  # noqa: BLE001 - recorded as this session's error
        c.errors.append(f"reader: {type(e).__name__}: {e}")
    finally:
        c.alive = False


async def _worker_async(conn: Any, job: WorkerJob) -> None:
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    clients = [_Client(s) for s in job.clients]
    sem = asyncio.Semaphore(job.connect_concurrency)

    async def open_one(c: _Client) -> None:
        async with sem:
            try:
                c.ws = await connect(
                    job.url, max_size=None, ping_interval=None, open_timeout=20,
                    close_timeout=3, compression=job.compression,
                )
                await c.ws.send(json.dumps({"event": "start", "websocket_id": f"{job.prefix}-{c.spec.idx}"}))
                c.alive = True
                c.reader = asyncio.create_task(_reader(c))
            except Exception as e:  # noqa: BLE001
                c.errors.append(f"connect: {type(e).__name__}: {e}")

    t_conn = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(open_one(c) for c in clients)), 60)
    conn.send(("ready", {"connected": sum(c.alive for c in clients), "connect_s": time.monotonic() - t_conn}))
    if not await loop.run_in_executor(None, conn.poll, 300):
        raise RuntimeError("no go signal from the parent in 300 s")
    kind, t0 = conn.recv()
    if kind != "go":
        raise RuntimeError(f"unexpected control message {kind!r}")

    proc_t = time.process_time()
    frame_s = job.frame_ms / 1000.0
    # One send schedule for all clients of this process, sorted by due time.
    dues, who, which = [], [], []
    for ci, c in enumerate(clients):
        n = len(job.messages[c.spec.workload])
        base = t0 + c.spec.offset_s
        dues.append(base + (np.arange(n) + 1) * frame_s)
        who.append(np.full(n, ci, dtype=np.int32))
        which.append(np.arange(n, dtype=np.int32))
    due = np.concatenate(dues)
    order = np.argsort(due, kind="stable")
    due_l = due[order].tolist()
    who_l = np.concatenate(who)[order].tolist()
    which_l = np.concatenate(which)[order].tolist()
    pause_sets = [set(p) for p in job.pause_frames]
    lateness = np.zeros(len(due_l))
    import websockets

    async def stream_all() -> None:
        i, total = 0, len(due_l)
        while i < total:
            now = time.monotonic()
            if due_l[i] > now:
                await asyncio.sleep(due_l[i] - now)
                now = time.monotonic()
            while i < total and due_l[i] <= now:
                c = clients[who_l[i]]
                fi = which_l[i]
                if c.alive:
                    try:
                        await c.ws.send(job.messages[c.spec.workload][fi])
                    except websockets.ConnectionClosed as e:
                        c.alive = False
                        c.errors.append(f"send: connection closed ({e.rcvd.code if e.rcvd else None}) at frame {fi}")
                    sent = time.monotonic()
                    lateness[i] = sent - due_l[i]
                    if fi in pause_sets[c.spec.workload]:
                        c.pause_sent[fi] = sent
                else:
                    lateness[i] = np.nan
                i += 1
                if (i & 63) == 0:
                    now = time.monotonic()  # keep "due" honest during long bursts

    end_at = (max(due_l) if due_l else t0) + job.tail_s
    budget = max(5.0, end_at - time.monotonic() + job.budget_s)
    aborted = None
    try:
        await asyncio.wait_for(stream_all(), budget)
        await asyncio.sleep(max(0.0, end_at - time.monotonic()))
    except asyncio.TimeoutError:
        aborted = f"streaming did not finish within {budget:.0f} s"
    stream_cpu = time.process_time() - proc_t

    async def finish(c: _Client) -> None:
        if c.ws is None:
            return
        with contextlib.suppress(Exception):
            if c.alive:
                await c.ws.send(json.dumps({"event": "stop"}))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.ws.close(), 5)
        if c.reader is not None:
            try:
                await asyncio.wait_for(c.reader, 5)
            except (asyncio.TimeoutError, Exception):
                c.reader.cancel()

    await asyncio.wait_for(asyncio.gather(*(finish(c) for c in clients), return_exceptions=True), 30)
    lat = lateness[~np.isnan(lateness)]
    result = {
        "aborted": aborted,
        "stream_cpu_s": stream_cpu,
        "send_lag_ms": {
            "p50": float(np.percentile(lat, 50)) * 1e3 if lat.size else None,
            "p99": float(np.percentile(lat, 99)) * 1e3 if lat.size else None,
            "max": float(lat.max()) * 1e3 if lat.size else None,
        },
        "clients": [
            {
                "idx": c.spec.idx,
                "workload": c.spec.workload,
                "offset_s": c.spec.offset_s,
                "events": c.events,
                "errors": c.errors,
                "close_code": c.close_code,
                "pause_sent": c.pause_sent,
                "connected": c.ws is not None,
            }
            for c in clients
        ],
    }
    conn.send(("done", result))


# =========================================================================== measurement
class _Sampler(threading.Thread):
    """Polls server/worker CPU times and server RSS (psutil) until stopped; also the CPU and
    RSS of `engine_pids`, processes outside the server's tree that serve it (a Ray replica)."""

    def __init__(self, server_pid: int, worker_pids: list[int], period_s: float = 0.2,
                 engine_pids: tuple[int, ...] = ()) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        import psutil

        self.psutil = psutil
        self.server = psutil.Process(server_pid)
        self.workers = []
        for pid in worker_pids:
            with contextlib.suppress(psutil.Error):
                self.workers.append(psutil.Process(pid))
        self.engines = []
        for pid in engine_pids:
            with contextlib.suppress(psutil.Error):
                self.engines.append(psutil.Process(pid))
        self.period_s = period_s
        # t, srv cpu, rss, workers cpu, sys busy, engines cpu, engines rss
        self.samples: list[tuple[float, float, float, float, float, float, float]] = []
        self._halt = threading.Event()
        self._last_worker_cpu: dict[int, float] = {}
        self._last_tree_cpu: dict[int, float] = {}
        self._last_engine: dict[int, tuple[float, float]] = {}

    def _sample(self) -> None:
        ps = self.psutil
        t = time.monotonic()
        try:
            ct = self.server.cpu_times()
            self._last_tree_cpu[self.server.pid] = ct.user + ct.system
            rss = self.server.memory_info().rss
            kids = self.server.children(recursive=True)  # uvicorn workers, the engine process
        except ps.Error:
            return
        for k in kids:  # the server's CPU is its whole process tree's
            try:
                kt = k.cpu_times()
                self._last_tree_cpu[k.pid] = kt.user + kt.system
                rss += k.memory_info().rss
            except ps.Error:
                pass
        srv = sum(self._last_tree_cpu.values())
        wsum = 0.0
        for w in self.workers:
            try:
                wt = w.cpu_times()
                self._last_worker_cpu[w.pid] = wt.user + wt.system
            except ps.Error:
                pass
            wsum += self._last_worker_cpu.get(w.pid, 0.0)
        for e in self.engines:
            try:
                et = e.cpu_times()
                self._last_engine[e.pid] = (et.user + et.system, float(e.memory_info().rss))
            except ps.Error:
                pass
        ecpu = sum(c for c, _ in self._last_engine.values())
        erss = sum(r for _, r in self._last_engine.values())
        st = ps.cpu_times()
        busy = st.user + st.system + getattr(st, "irq", 0.0) + getattr(st, "softirq", 0.0) + getattr(st, "nice", 0.0)
        self.samples.append((t, srv, float(rss), wsum, busy, ecpu, erss))

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(self.period_s)
        self._sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def window(self, t_a: float, t_b: float) -> dict[str, float | None]:
        s = [x for x in self.samples if t_a <= x[0] <= t_b]
        if len(s) < 2:
            s = self.samples[:]  # too short a window: use the whole step
        if len(s) < 2:
            return {"server_cpu_pct": None, "client_cpu_pct": None, "system_cpu_pct": None,
                    "engine_cpu_pct": None, "window_s": 0.0}
        dt = s[-1][0] - s[0][0]
        ncpu = self.psutil.cpu_count() or 1
        return {
            "server_cpu_pct": 100.0 * (s[-1][1] - s[0][1]) / dt,
            "client_cpu_pct": 100.0 * (s[-1][3] - s[0][3]) / dt,
            # whole machine, % of ONE core as well (max = 100 * cores)
            "system_cpu_pct": 100.0 * (s[-1][4] - s[0][4]) / dt if ncpu else None,
            "engine_cpu_pct": 100.0 * (s[-1][5] - s[0][5]) / dt if self.engines else None,
            "window_s": dt,
        }

    def peak_rss_mb(self) -> float | None:
        return max((x[2] for x in self.samples), default=0.0) / 2**20 or None

    def peak_engine_rss_mb(self) -> float | None:
        return max((x[6] for x in self.samples), default=0.0) / 2**20 or None


@dataclass
class StepOptions:
    stagger_s: float = 0.6
    tail_s: float = 2.5            # listen after a session's last frame
    client_procs: int = 0          # 0: auto (1 up to 100 sessions, else 2)
    compression: str | None = "deflate"
    warmup: bool = True


@dataclass
class StepResult:
    mode: str
    n: int
    frame_ms: int
    server_command: str
    compression: str | None = None  # what the clients offered ("deflate") or None
    e2r_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    detect_ms: list[float] = field(default_factory=list)
    floor_ms: list[float] = field(default_factory=list)
    # per entry of overhead_ms: the previous reply of that session was still being streamed
    # (media arrived < BARGE_IN_WINDOW_S before the pause frame was sent)
    barge_in: list[bool] = field(default_factory=list)
    replies_expected: int = 0
    replies_ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    mismatches: int = 0
    connected: int = 0
    server_cpu_pct: float | None = None
    client_cpu_pct: float | None = None
    system_cpu_pct: float | None = None
    cpu_window_s: float = 0.0
    server_rss_mb: float | None = None
    server_rss_end_mb: float | None = None
    # processes outside the server's tree that serve it (`run_step`'s engine_pids): CPU, peak RSS
    engine_cpu_pct: float | None = None
    engine_rss_mb: float | None = None
    client_procs: int = 1
    client_send_lag_ms: dict[str, float | None] = field(default_factory=dict)
    server_log_warnings: int = 0
    server_log_sample: list[str] = field(default_factory=list)
    vad_stats: dict | None = None
    wall_s: float = 0.0

    @classmethod
    def failed(cls, mode: str, n: int, frame_ms: int, server_command: str, compression: str | None,
               workloads: list[Workload], error: BaseException) -> StepResult:
        """A row that could not run: every expected reply counts as an error (reported, not
        hidden)."""
        r = cls(mode, n, frame_ms, server_command, compression)
        r.replies_expected = sum(len(workloads[i % len(workloads)].pause_frames) for i in range(n))
        r.errors = max(1, r.replies_expected)
        r.error_samples = [f"step failed: {type(error).__name__}: {str(error)[:300]}"]
        return r

    @property
    def other_cpu_pct(self) -> float | None:
        """Everything else on the machine in the window (this parent, other users' jobs): not
        the server, the load generator, or the engine processes serving it (`engine_pids`)."""
        if None in (self.system_cpu_pct, self.server_cpu_pct, self.client_cpu_pct):
            return None
        return max(0.0, self.system_cpu_pct - self.server_cpu_pct - self.client_cpu_pct
                   - (self.engine_cpu_pct or 0.0))

    def pct(self, name: str, q: float) -> float | None:
        v = getattr(self, name)
        return float(np.percentile(v, q)) if v else None

    def overhead_pct_no_barge_in(self, q: float) -> float | None:
        v = [o for o, b in zip(self.overhead_ms, self.barge_in) if not b]
        return float(np.percentile(v, q)) if v else None

    @property
    def n_no_barge_in(self) -> int:
        return sum(1 for b in self.barge_in if not b)

    @property
    def config(self) -> str:
        for name, (frame_ms, compression) in CONFIGS.items():
            if (frame_ms, compression) == (self.frame_ms, self.compression):
                return name
        return f"{self.frame_ms}ms-{self.compression or 'nodeflate'}"


def _warmup(url: str, wl: Workload, compression: str | None) -> None:
    """One unmeasured session, sent as fast as possible: loads the model, builds the resampler."""

    async def go() -> None:
        from websockets.asyncio.client import connect

        async with connect(url, max_size=None, ping_interval=None, open_timeout=30, compression=compression) as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": "warmup"}))
            n = min(len(wl.messages), int(1.5 * 1000 / wl.frame_ms))
            for m in wl.messages[:n]:
                await ws.send(m)
            await asyncio.sleep(0.3)
            await ws.send(json.dumps({"event": "stop"}))
            with contextlib.suppress(Exception):
                async for _ in ws:
                    pass

    asyncio.run(asyncio.wait_for(go(), 60))


def _diff_hist(before: dict | None, after: dict | None) -> dict | None:
    if not after or "batch_size_hist" not in after:
        return after
    b = (before or {}).get("batch_size_hist", {})
    hist = {int(k): v - b.get(k, 0) for k, v in after["batch_size_hist"].items()}
    hist = {k: v for k, v in sorted(hist.items()) if v > 0}
    batches = sum(hist.values())
    items = sum(k * v for k, v in hist.items())
    reasons_b = (before or {}).get("flush_reasons", {})
    reasons = {k: v - reasons_b.get(k, 0) for k, v in after.get("flush_reasons", {}).items()}
    return {
        "batch_size_hist": hist,
        "batches": batches,
        "mean_batch": items / batches if batches else None,
        "flush_reasons": {k: v for k, v in reasons.items() if v},
        "failed": after.get("failed", 0) - (before or {}).get("failed", 0),
        "snapshot_after": after,
    }


def run_step(
    server: ServerProcess, n: int, workloads: list[Workload], opts: StepOptions | None = None,
    engine_pids: tuple[int, ...] = (),
) -> StepResult:
    """N concurrent sessions against a running server; returns the raw + summary numbers.
    `engine_pids`: processes outside the server's tree that serve it (a Ray Serve replica),
    measured apart (`engine_cpu_pct`, `engine_rss_mb`)."""
    opts = opts or StepOptions()
    if n < 1:
        raise ValueError("n must be >= 1")
    frame_ms = workloads[0].frame_ms
    t_step = time.monotonic()
    res = StepResult(server.mode, n, frame_ms, server.command, opts.compression)
    if opts.warmup:
        _warmup(server.url, workloads[0], opts.compression)
    k = opts.client_procs or (1 if n <= 100 else 2)
    k = max(1, min(k, n))
    res.client_procs = k
    specs = [ClientSpec(i, i % len(workloads), opts.stagger_s * i / n) for i in range(n)]
    max_dur = max(w.duration_s for w in workloads)
    min_dur = min(w.duration_s for w in workloads)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    vad_before = server.vad_snapshot()
    sampler: _Sampler | None = None
    try:
        for w in range(k):
            parent, child = ctx.Pipe()
            job = WorkerJob(
                url=server.url, frame_ms=frame_ms,
                messages=[wl.messages for wl in workloads],
                pause_frames=[wl.pause_frames for wl in workloads],
                clients=specs[w::k], tail_s=opts.tail_s, compression=opts.compression,
                budget_s=60.0, prefix=f"{server.mode}-{n}-w{w}",
            )
            p = ctx.Process(target=_worker_main, args=(child, job), daemon=True, name=f"bench-client-{w}")
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        infos = []
        for c in conns:
            if not c.poll(120):
                raise RuntimeError("a client worker did not get ready in 120 s")
            kind, info = c.recv()
            if kind != "ready":
                raise RuntimeError(f"client worker failed before streaming:\n{info}")
            infos.append(info)
        res.connected = sum(i["connected"] for i in infos)
        sampler = _Sampler(server.proc.pid, [p.pid for p in procs], engine_pids=engine_pids)
        sampler.start()
        t0 = time.monotonic() + 0.5
        for c in conns:
            c.send(("go", t0))
        results = []
        limit = max_dur + opts.stagger_s + opts.tail_s + 60.0 + 45.0
        for c in conns:
            left = max(1.0, t0 + limit - time.monotonic())
            if not c.poll(left):
                raise RuntimeError(f"a client worker did not finish within {limit:.0f} s")
            kind, info = c.recv()
            if kind != "done":
                raise RuntimeError(f"client worker failed:\n{info}")
            results.append(info)
        sampler.stop()
        win = sampler.window(t0 + opts.stagger_s + 0.3, t0 + min_dur)
        res.server_cpu_pct = win["server_cpu_pct"]
        res.client_cpu_pct = win["client_cpu_pct"]
        res.system_cpu_pct = win["system_cpu_pct"]
        res.engine_cpu_pct = win["engine_cpu_pct"]
        res.engine_rss_mb = sampler.peak_engine_rss_mb()
        res.cpu_window_s = win["window_s"]
        res.server_rss_mb = sampler.peak_rss_mb()
        res.server_rss_end_mb = sampler.samples[-1][2] / 2**20 if sampler.samples else None
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()  # our own child, by its handle
                p.join(5)
        for c in conns:
            c.close()
    res.vad_stats = _diff_hist(vad_before, server.vad_snapshot())
    lags = [r["send_lag_ms"] for r in results]
    res.client_send_lag_ms = {
        "p50": max((x["p50"] for x in lags if x["p50"] is not None), default=None),
        "p99": max((x["p99"] for x in lags if x["p99"] is not None), default=None),
        "max": max((x["max"] for x in lags if x["max"] is not None), default=None),
    }
    frame_s = frame_ms / 1000.0
    for r in results:
        if r["aborted"]:
            res.errors += 1
            res.error_samples.append(r["aborted"])
        for cl in r["clients"]:
            _score_client(res, cl, workloads[cl["workload"]], t0, frame_s)
    text = server.log_text()
    bad = [ln for ln in text.splitlines() if any(w in ln for w in ("WARNING", "ERROR", "Traceback", "Exception"))]
    res.server_log_warnings = len(bad)
    res.server_log_sample = bad[:5]
    res.wall_s = time.monotonic() - t_step
    return res


def _score_client(res: StepResult, cl: dict, wl: Workload, t0: float, frame_s: float) -> None:
    base = t0 + cl["offset_s"]
    expected = len(wl.pause_frames)
    res.replies_expected += expected
    errs = list(cl["errors"])
    if not cl["connected"]:
        res.errors += expected or 1
        res.error_samples.extend(errs[:1])
        return
    ev = cl["events"]
    pause_at = [t for t, k in ev if k == "pause_detected"]
    starts = [t for t, k in ev if k == "response_starting"]
    media = [t for t, k in ev if k == "media"]
    ok = 0
    mismatch = len(pause_at) != expected
    for j, frame in enumerate(wl.pause_frames):
        sent = cl["pause_sent"].get(frame, cl["pause_sent"].get(str(frame)))
        # The reply's start: the first `response_starting` after its `pause_detected` (FastRTC
        # sends one per audio chunk of a reply, ours one per reply), else the j-th.
        if j < len(pause_at):
            start = next((t for t in starts if t >= pause_at[j]), None)
        else:
            start = starts[j] if j < len(starts) else None
        if start is None or sent is None:
            continue
        first = next((t for t in media if t >= start), None)
        if first is None:
            continue
        ok += 1
        res.overhead_ms.append((first - sent) * 1e3)
        res.e2r_ms.append((first - (base + wl.speech_end_s[j])) * 1e3)
        res.floor_ms.append((wl.pause_chunk_end_s[j] - wl.speech_end_s[j]) * 1e3)
        res.barge_in.append(any(sent - BARGE_IN_WINDOW_S <= t <= sent for t in media))
        if j < len(pause_at):
            res.detect_ms.append((pause_at[j] - sent) * 1e3)
            if pause_at[j] < sent:
                mismatch = True
    res.replies_ok += ok
    missing = expected - ok
    n_err_msgs = sum(1 for _, k in ev if k == "error")
    unexpected_close = cl["close_code"] not in (None, 1000)
    err = missing + n_err_msgs + (1 if unexpected_close and not missing else 0)
    if err:
        res.errors += err
        if missing:
            errs.append(f"{missing} of {expected} replies missing (pause_detected={len(pause_at)})")
        if unexpected_close:
            errs.append(f"closed with code {cl['close_code']}")
        res.error_samples.extend(e for e in errs[:2] if len(res.error_samples) < 10)
    if mismatch:
        res.mismatches += 1


# ================================================================================ output
def _f(v: float | None, nd: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


TABLE_HEADER = (
    "| mode | N | replies ok/expected | errors | n | e2r p50 | e2r p95 | e2r p99 | overhead p50 | overhead p95 "
    "| overhead p99 | overhead p95 w/o barge-in (n) | detect p95 (n) | server CPU % | server RSS MB | client CPU % | other CPU % | client send lag p99 ms |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(r: StepResult) -> str:
    # n: replies whose latencies the e2r/overhead percentiles are taken over.
    return (
        f"| {MODE_LABELS.get(r.mode, r.mode)} | {r.n} | {r.replies_ok}/{r.replies_expected} | {r.errors} "
        f"| {len(r.overhead_ms)} "
        f"| {_f(r.pct('e2r_ms', 50))} | {_f(r.pct('e2r_ms', 95))} | {_f(r.pct('e2r_ms', 99))} "
        f"| {_f(r.pct('overhead_ms', 50))} | {_f(r.pct('overhead_ms', 95))} | {_f(r.pct('overhead_ms', 99))} "
        f"| {_f(r.overhead_pct_no_barge_in(95))} ({r.n_no_barge_in}) "
        f"| {_f(r.pct('detect_ms', 95))} ({len(r.detect_ms)}) | {_f(r.server_cpu_pct)} | {_f(r.server_rss_mb)} "
        f"| {_f(r.client_cpu_pct)} | {_f(r.other_cpu_pct)} | {_f(r.client_send_lag_ms.get('p99'), 1)} |"
    )


def passes(r: StepResult) -> bool:
    p95 = r.pct("overhead_ms", 95)
    return (
        r.errors == 0 and r.replies_ok == r.replies_expected > 0 and p95 is not None
        and p95 < TARGET_OVERHEAD_P95_MS
    )


def target_verdict(rows: list[StepResult]) -> tuple[bool, list[str]]:
    """Per mode (rows of one client configuration): the largest N that passes and the
    verdict. Returns (whether `batched` met the target, the lines)."""
    lines = []
    met_any = False
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        good = [r.n for r in mine if passes(r)]
        best = max(good, default=None)
        # the largest N such that it and every smaller N tried passed
        clean = None
        for r in sorted(mine, key=lambda r: r.n):
            if not passes(r):
                break
            clean = r.n
        met = any(r.n >= TARGET_SESSIONS and passes(r) for r in mine)
        met_any = met_any or (met and mode == "batched")
        lines.append(
            f"- {MODE_LABELS.get(mode, mode)}: largest N passing (all replies, 0 errors, overhead p95 < "
            f"{TARGET_OVERHEAD_P95_MS:.0f} ms): "
            f"{best if best is not None else 'none'} (every N up to {clean if clean is not None else '-'} passed); "
            f"target >= {TARGET_SESSIONS} sessions: **{'MET' if met else 'NOT MET'}**"
        )
    return met_any, lines


def e2r_verdict(rows: list[StepResult]) -> list[str]:
    """Per mode, issue 16's targets at the N that were run: every reply and e2r p95 <= the
    bound (a row with missing replies does not meet it, whatever its percentiles)."""
    lines = []
    for mode in dict.fromkeys(r.mode for r in rows):
        for n, bound in E2R_TARGETS:
            row = next((r for r in rows if r.mode == mode and r.n == n), None)
            if row is None:
                continue
            p95 = row.pct("e2r_ms", 95)
            complete = row.errors == 0 and row.replies_ok == row.replies_expected
            met = complete and p95 is not None and p95 <= bound
            why = "" if complete else f", {row.replies_ok}/{row.replies_expected} replies"
            lines.append(
                f"- {MODE_LABELS.get(mode, mode)}: e2r p95 at N={n} {_f(p95)} ms{why}; target <= "
                f"{bound:,.0f} ms: **{'MET' if met else 'NOT MET'}**")
    return lines


def by_config(rows: list[StepResult]) -> dict[str, list[StepResult]]:
    out: dict[str, list[StepResult]] = {}
    for r in rows:
        out.setdefault(r.config, []).append(r)
    return out


def _config_title(rows: list[StepResult]) -> str:
    r = rows[0]
    return CONFIG_TITLES.get(
        r.config,
        f"{r.frame_ms} ms frames, permessage-deflate {'offered' if r.compression else 'off'}",
    )


def render_markdown(rows: list[StepResult], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    servers = meta.get("server_commands") or {"": meta["server_command"]}
    lines = [
        "# bench_reply: concurrent real-time ReplyOnPause sessions over WebSocket",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical), "
        f"{m.get('memory_gib', '?')} GiB; Python {m['python']}, torch {m.get('torch')}, "
        f"websockets {m.get('websockets')}, uvicorn {m.get('uvicorn')}; no GPU used; "
        f"load average when the run started {m.get('loadavg_at_start')} (the machine is shared)",
        f"- command: `{meta['command']}`; code: {meta.get('code_version', 'unknown')}"
        + ("" if meta.get("code_version_at_end", meta.get("code_version")) == meta.get("code_version")
           else f" at start, {meta['code_version_at_end']} at the end (**the code changed during the run**)"),
        *([f"- rendered again from its .json (same measurements) by `{meta['rendered_by']}`"]
          if meta.get("rendered_by") else []),
        "- servers (a fresh process per row, one unmeasured warm-up session each):",
        *[f"  - {MODE_LABELS.get(k, k) + ': ' if k else ''}`{v}`" for k, v in servers.items()],
        f"- clients: {meta['client_desc']}",
        f"- fixtures: {', '.join(meta['fixtures'])}; expected replies per session from an exact replay "
        f"of the same frames through ReplyOnPause: {meta['expected_per_fixture']}",
        f"- algorithmic floor (end of speech -> end of the 0.6 s chunk that detects the pause): "
        f"p50 {_f(meta['floor_p50'])} ms, min {_f(meta['floor_min'])}, max {_f(meta['floor_max'])} ms",
        "",
        "Modes: `batched` = the default app, every session's VAD in the shared batched engine "
        "(`BATCHRTC_VAD_MAX_BATCH=512`); `per-session onnxruntime (FastRTC)` = the same echo with "
        "`ReplyOnPause(echo, model=get_silero_model())`: Silero through one onnxruntime session "
        "(1+1 threads), called once per connection per 0.6 s chunk on a worker thread, as FastRTC "
        "runs it; `batched, max_batch_size=1` = the default app with `BATCHRTC_VAD_MAX_BATCH=1` "
        "(one worker thread runs every session's chunk in turn).",
        "",
        "Columns: `n` = replies the e2r and overhead percentiles are taken over; `e2r` = end of "
        "speech -> first reply byte (ms); `overhead` = send of the frame that completed the pause "
        "chunk -> first reply byte (ms, the server-added latency); `w/o barge-in` = overhead p95 over "
        "the utterances whose pause came while the session's previous reply was NOT still being "
        "streamed (n in brackets: there the new reply queues behind the old one's pacing); `detect` = "
        "that frame -> `pause_detected` log (ms, n in brackets); CPU in % of one core over the steady "
        "window (all sessions streaming; the machine has "
        f"{100 * m['usable_cpus']} %), `other` = the rest of the machine in that window (this driver, "
        "other jobs); RSS = peak during the row; client send lag = how late the load "
        "generator sent frames (p99, ms).",
    ]
    groups = by_config(rows)
    for cfg, mine in groups.items():
        _, verdict = target_verdict(mine)
        lines += [
            "",
            f"## {_config_title(mine)}",
            "",
            TABLE_HEADER,
            *[table_row(r) for r in mine],
            "",
            f"Target: on this machine >= {TARGET_SESSIONS} concurrent real-time ReplyOnPause sessions "
            f"with p95 overhead < {TARGET_OVERHEAD_P95_MS:.0f} ms and 0 errors "
            f"({mine[0].frame_ms} ms frames, permessage-deflate {'on' if mine[0].compression else 'off'}):",
            *verdict,
        ]
        e2r = e2r_verdict(mine)
        if e2r:
            lines += ["", "Issue 16's targets (end of speech -> first reply byte, every reply arrived):", *e2r]
    lines += [
        "",
        "Latency percentiles are over the replies that did arrive: a row with missing replies "
        "understates its latency (a missing reply was still queued in the server when its session "
        f"sent `stop`, {meta.get('listen_s', '?')} s after its last frame). `other CPU %` well above 0 means "
        "other jobs competed for the same cores during that row.",
    ]
    notes = []
    for r in rows:
        tag = f"{MODE_LABELS.get(r.mode, r.mode)} N={r.n} ({r.frame_ms} ms)"
        if r.mismatches:
            notes.append(f"- {tag}: {r.mismatches} session(s) whose pause_detected count/timing "
                         "differed from the reference replay")
        if r.error_samples:
            notes.append(f"- {tag} errors, e.g.: {'; '.join(r.error_samples[:3])}")
        if r.server_log_warnings:
            notes.append(f"- {tag}: {r.server_log_warnings} server log warning/error line(s), e.g. "
                         f"`{(r.server_log_sample or [''])[0][:160]}`")
        if r.vad_stats and r.vad_stats.get("batch_size_hist"):
            vs = r.vad_stats
            notes.append(
                f"- {tag} VAD batches: {vs['batches']}, mean size {_f(vs['mean_batch'], 1)}, "
                f"flush reasons {vs['flush_reasons']}"
            )
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def step_to_json(r: StepResult) -> dict[str, Any]:
    d = asdict(r)
    for name in ("e2r_ms", "overhead_ms", "detect_ms"):
        d[name.replace("_ms", "_pcts_ms")] = {
            q: r.pct(name, p) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        }
        d[name] = [round(x, 2) for x in d[name]]
    d["floor_ms"] = [round(x, 2) for x in d["floor_ms"]]
    d["other_cpu_pct"] = r.other_cpu_pct
    d["label"] = MODE_LABELS.get(r.mode, r.mode)
    d["config"] = r.config
    d["n_latency_samples"] = len(r.overhead_ms)
    d["n_no_barge_in"] = r.n_no_barge_in
    d["overhead_no_barge_in_pcts_ms"] = {
        q: r.overhead_pct_no_barge_in(p) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
    }
    d["passes_target_criteria"] = passes(r)
    return d


def plot(rows: list[StepResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (cfg, mode) in dict.fromkeys((r.config, r.mode) for r in rows):
        mine = sorted((r for r in rows if r.mode == mode and r.config == cfg), key=lambda r: r.n)
        ns = [r.n for r in mine]
        label = f"{MODE_LABELS.get(mode, mode)}, {mine[0].frame_ms} ms" + ("" if mine[0].compression else ", no deflate")
        style = "o-" if cfg == "default" else "s--"
        axes[0].plot(ns, [r.pct("overhead_ms", 95) or np.nan for r in mine], style, label=label)
        axes[1].plot(ns, [r.pct("e2r_ms", 95) or np.nan for r in mine], style, label=label)
    axes[0].axhline(TARGET_OVERHEAD_P95_MS, color="gray", ls="--", lw=1, label="target")
    axes[0].set_title("p95 server overhead (pause chunk sent -> first reply byte)")
    axes[1].set_title("p95 end of speech -> first reply byte")
    for ax in axes:
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ================================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default=None, help=f"comma-separated N list (default {DEFAULT_SESSIONS})")
    ap.add_argument("--modes", default=DEFAULT_MODES,
                    help=f"comma-separated, of {', '.join(MODES)} (default: all, in that order)")
    ap.add_argument("--frame-ms", type=int, default=None,
                    help="client media frame length: run this one configuration only (default: two "
                    "tables, 20 ms with permessage-deflate, then 100 ms without)")
    ap.add_argument("--fixtures", default="all", help="'all' (cycle over the four) or comma-separated WAV names")
    ap.add_argument("--tail-s", type=float, default=1.5, help="silence appended to each fixture (s)")
    ap.add_argument("--listen-s", type=float, default=2.5, help="keep listening after a session's last frame (s)")
    ap.add_argument("--max-audio-s", type=float, default=None, help="truncate fixtures to this many seconds")
    ap.add_argument("--stagger-s", type=float, default=0.6, help="session starts spread over this (s)")
    ap.add_argument("--client-procs", type=int, default=0, help="load-generator processes (0 = auto: 1 up to N=100, else 2)")
    ap.add_argument("--no-compression", action="store_true",
                    help="do not offer permessage-deflate (one configuration only, see --frame-ms)")
    ap.add_argument("--max-delay-ms", type=float, default=None, help="BATCHRTC_VAD_MAX_DELAY_MS for the server")
    ap.add_argument("--vad-stats", action="store_true",
                    help="serve through benchmarks.bench_reply:vad_stats_app (adds a GET route with batcher stats)")
    ap.add_argument("--fastrtc-python", default=os.environ.get("BATCHRTC_BENCH_FASTRTC_PYTHON"),
                    help='mode "fastrtc": the python of an environment with pip install '
                    '"fastrtc[vad]==0.0.34" (default $BATCHRTC_BENCH_FASTRTC_PYTHON)')
    ap.add_argument("--stop-after-fail", type=int, default=0,
                    help="skip larger N in a mode after this many consecutive failing rows (0 = never)")
    ap.add_argument("--quick", action="store_true", help="< 60 s smoke: N=1,10, one fixture, 4 s of it")
    ap.add_argument("--out", default=None,
                    help="markdown output, .json/.png next to it (default benchmarks/results/bench_reply.md, "
                    "bench_reply_quick.md with --quick)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--render-from", default=None, metavar="JSON",
                    help="measure nothing: write the markdown of an earlier run's .json again "
                    "(next to it), with this version's verdict lines")
    a = ap.parse_args(argv)
    if a.quick:
        a.sessions = a.sessions or QUICK_SESSIONS
        if a.fixtures == "all":
            a.fixtures = FIXTURES[0]
        a.max_audio_s = a.max_audio_s or 3.5
        a.listen_s = min(a.listen_s, 1.5)
    a.out = a.out or str(RESULTS_DIR / ("bench_reply_quick.md" if a.quick else "bench_reply.md"))
    a.sessions = [int(x) for x in (a.sessions or DEFAULT_SESSIONS).split(",") if x.strip()]
    a.modes = [MODE_ALIASES.get(m.strip(), m.strip()) for m in a.modes.split(",") if m.strip()]
    for m in a.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    if "fastrtc" in a.modes and not a.fastrtc_python:
        ap.error('mode "fastrtc" needs --fastrtc-python (an environment with fastrtc[vad]==0.0.34)')
    if a.frame_ms is None and not a.no_compression:
        a.configs = [CONFIGS["default"], CONFIGS["frame100-nodeflate"]]
    else:
        a.configs = [(a.frame_ms or 20, None if a.no_compression else "deflate")]
    a.fixtures = list(FIXTURES) if a.fixtures == "all" else [f.strip() for f in a.fixtures.split(",")]
    return a


def render_again(path: Path, command: str) -> Path:
    """The markdown of an earlier run, from its .json: same rows and metadata, this version's
    verdict lines. Returns the markdown's path (next to the .json)."""
    raw = json.loads(path.read_text())
    names = {f.name for f in fields(StepResult)}
    rows = [StepResult(**{k: v for k, v in d.items() if k in names}) for d in raw["rows"]]
    meta = dict(raw["meta"], rendered_by=f"{command}; code {code_version()}")
    out = path.with_suffix(".md")
    out.write_text(render_markdown(rows, meta))
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = " ".join(["python -m benchmarks.bench_reply", *(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    if a.render_from:
        print(f"wrote {render_again(Path(a.render_from), command)}")
        return 0
    t_all = time.monotonic()
    code_version_at_start = code_version()
    # Workloads per (frame length, VAD kind): the per-call model's pauses are replayed with it.
    workloads: dict[tuple[int, str], list[Workload]] = {}
    for frame_ms, _ in a.configs:
        for vad in dict.fromkeys(MODES[m][2] for m in a.modes):
            print(f"building workloads ({len(a.fixtures)} fixture(s), {frame_ms} ms frames, {vad} VAD) ...", flush=True)
            wls = build_workloads(a.fixtures, frame_ms=frame_ms, tail_s=a.tail_s, max_audio_s=a.max_audio_s, vad=vad)
            workloads[frame_ms, vad] = wls
            for w in wls:
                print(f"  {w.name}: {w.duration_s:.2f} s, {w.n_frames} frames, pauses at frames {w.pause_frames} "
                      f"(speech ends {w.speech_end_s}, spans {len(w.spans)})", flush=True)
                if not w.pause_frames:
                    print(f"  WARNING: {w.name} has no detectable pause with these settings", flush=True)
    concurrency = max(a.sessions) + 16
    rows: list[StepResult] = []
    server_commands: dict[str, str] = {}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for frame_ms, compression in a.configs:
            print(f"\n{frame_ms} ms frames, permessage-deflate {'offered' if compression else 'off'}", flush=True)
            print(TABLE_HEADER, flush=True)
            opts = StepOptions(stagger_s=a.stagger_s, tail_s=a.listen_s, client_procs=a.client_procs,
                               compression=compression)
            for mode in a.modes:
                wls = workloads[frame_ms, MODES[mode][2]]
                fails = 0
                for n in a.sessions:
                    if a.stop_after_fail and fails >= a.stop_after_fail:
                        print(f"| {MODE_LABELS[mode]} | {n} | skipped after {fails} failing rows |", flush=True)
                        continue
                    srv = ServerProcess(mode, concurrency=concurrency, max_delay_ms=a.max_delay_ms,
                                        vad_stats=a.vad_stats, fastrtc_python=a.fastrtc_python)
                    try:
                        with srv:
                            server_commands[mode] = srv.command
                            r = run_step(srv, n, wls, opts)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # a row that could not run is reported, not hidden
                        r = StepResult.failed(mode, n, frame_ms, srv.command, compression, wls, e)
                        print(f"  step failed: {e}\n{srv.log_tail(10)}", file=sys.stderr, flush=True)
                    finally:
                        srv.stop()
                        srv.cleanup_log()
                    rows.append(r)
                    fails = 0 if passes(r) else fails + 1
                    print(table_row(r), flush=True)
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far", file=sys.stderr, flush=True)
    floors = [x for r in rows for x in r.floor_ms] or [
        (ce - se) * 1e3 for wls in workloads.values() for w in wls
        for ce, se in zip(w.pause_chunk_end_s, w.speech_end_s)
    ]
    verdicts = {cfg: target_verdict(mine) for cfg, mine in by_config(rows).items()}
    kdesc = "auto (1 process up to N=100, else 2)" if not a.client_procs else str(a.client_procs)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": command,
        "code_version": code_version_at_start,
        "server_command": next(iter(server_commands.values()), "python -m uvicorn server.echo_app:stream --port P --log-level warning"),
        "server_commands": server_commands,
        "client_desc": f"{kdesc} spawn process(es), one {client_loop()} loop each, websockets client; "
        f"mu-law media at 48 kHz; starts staggered over {a.stagger_s} s, listening {a.listen_s} s "
        "after the last frame",
        "configs": [{"frame_ms": f, "compression": c} for f, c in a.configs],
        "frame_ms": a.configs[0][0],
        "listen_s": a.listen_s,
        "fixtures": a.fixtures,
        "expected_per_fixture": {
            f"{vad}, {f} ms": {w.name: len(w.pause_frames) for w in wls} for (f, vad), wls in workloads.items()
        },
        "floor_p50": float(np.median(floors)) if floors else None,
        "floor_min": float(np.min(floors)) if floors else None,
        "floor_max": float(np.max(floors)) if floors else None,
        "verdict_lines": {cfg: v[1] for cfg, v in verdicts.items()},
        "target_met": {cfg: v[0] for cfg, v in verdicts.items()},
        "wall_s": round(time.monotonic() - t_all, 1),
        "code_version_at_end": code_version(),
    }
    md = render_markdown(rows, meta)
    print()
    for cfg, (_, lines) in verdicts.items():
        print(f"{CONFIG_TITLES.get(cfg, cfg)}:")
        print("\n".join(lines))
    out.write_text(md)
    raw = {
        "meta": meta,
        "workloads": {
            f"{vad}, {f} ms": [
                {k: v for k, v in asdict(w).items() if k != "messages"} | {"n_frames": w.n_frames} for w in wls
            ]
            for (f, vad), wls in workloads.items()
        },
        "rows": [step_to_json(r) for r in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    if not a.no_plot and rows and plot(rows, out.with_suffix(".png")):
        print(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    else:
        print(f"wrote {out}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
